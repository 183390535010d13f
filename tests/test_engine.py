"""Engine: decode loop correctness, sampling, stop strings, queue bound, cancellation."""

import threading
import time

import pytest
import torch

from gq_serve.checkpoint import load_model, load_tokenizer
from gq_serve.engine import ContextTooLong, Engine, QueueFull
from gq_serve.textstream import IncrementalDetokenizer, StopStringFilter


@pytest.fixture(scope="module")
def engine(tiny_lm):
    model, tokenizer = tiny_lm
    eng = Engine(model, tokenizer, device="cpu", max_queue=4)
    yield eng
    eng.shutdown()


def _ids(tokenizer, text="the cat sat on the mat"):
    return tokenizer(text).input_ids


def test_greedy_matches_hf_generate(engine, tiny_lm):
    model, tokenizer = tiny_lm
    prompt = _ids(tokenizer)
    ours = [ev.token_id for ev in engine.generate(prompt, max_tokens=16, temperature=0.0, ignore_eos=True)]
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                             do_sample=False, pad_token_id=0)
    assert ours == ref[0, len(prompt):].tolist()
    assert len(ours) == 16


def test_events_shape_and_length_finish(engine, tiny_lm):
    _, tokenizer = tiny_lm
    events = list(engine.generate(_ids(tokenizer), max_tokens=5, ignore_eos=True))
    assert len(events) == 5
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
    text = "".join(e.text for e in events)
    assert text == tokenizer.decode([e.token_id for e in events], skip_special_tokens=True)


def test_seeded_sampling_reproducible(engine, tiny_lm):
    _, tokenizer = tiny_lm
    prompt = _ids(tokenizer)

    def run(seed):
        return [e.token_id for e in engine.generate(prompt, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed,
                                                     ignore_eos=True)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_string_cuts_and_is_not_emitted(engine, tiny_lm):
    _, tokenizer = tiny_lm
    prompt = _ids(tokenizer)
    full = "".join(e.text for e in engine.generate(prompt, max_tokens=20, ignore_eos=True))
    words = full.split()
    stop = " " + words[len(words) // 2]
    expected = full[: full.find(stop)]
    events = list(engine.generate(prompt, max_tokens=20, stop=[stop], ignore_eos=True))
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == "stop"


def test_context_limit_names_numbers(engine, tiny_lm):
    _, tokenizer = tiny_lm
    with pytest.raises(ContextTooLong, match=r"maximum context length is 128.*130.*\(10 in the prompt \+ 120"):
        engine.submit(list(range(3, 13)), max_tokens=120)


def test_stop_filter_holds_partial_match():
    f = StopStringFilter(["STOP"])
    assert f.feed("abc ST") == "abc "  # "ST" might start the stop string: held
    assert f.feed("ep") == "STep"  # not a match after all: released
    assert f.feed(" xSTO") == " x"
    assert f.feed("P tail") == "" and f.stopped
    assert f.flush() == ""
    g = StopStringFilter(["zz"])
    assert g.feed("az") == "a" and g.flush() == "z"


def test_incremental_detokenizer_concatenates_to_full_decode(tiny_lm):
    _, tokenizer = tiny_lm
    ids = _ids(tokenizer, "hello world , the big red dog ran !")
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture
def gated_engine(tiny_lm_dir):
    from conftest import Gate

    model = load_model(str(tiny_lm_dir), "cpu", "float32")
    gate = Gate(model)
    eng = Engine(model, load_tokenizer(str(tiny_lm_dir)), device="cpu", max_queue=1)
    yield eng, gate
    gate.open.set()
    eng.shutdown()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_queue_full_and_fifo(gated_engine):
    eng, gate = gated_engine
    gate.open.clear()
    first = eng.submit([3, 4, 5], max_tokens=2)
    _wait(lambda: gate.calls >= 1)  # the worker is inside first's prefill, blocked
    second = eng.submit([3, 4, 5], max_tokens=2)
    with pytest.raises(QueueFull, match="--max-queue"):
        eng.submit([3, 4, 5], max_tokens=2)
    gate.open.set()
    assert len(list(first)) == 2 and len(list(second)) == 2
    assert first.finished_at <= second.started_at


def test_cancel_stops_generation(gated_engine):
    eng, gate = gated_engine
    gate.delay = 0.02
    before = eng.cancelled_total
    handle = eng.submit([3, 4, 5], max_tokens=100, ignore_eos=True)
    it = iter(handle)
    next(it), next(it)
    it.close()  # the consumer walks away: the handle is cancelled
    _wait(lambda: eng.cancelled_total == before + 1)
    assert handle.cancelled and handle.completion_tokens < 100
    # the worker is free again
    gate.delay = 0.0
    assert len(list(eng.generate([3, 4], max_tokens=3, ignore_eos=True))) == 3


def test_worker_serves_threads_in_order(engine, tiny_lm):
    _, tokenizer = tiny_lm
    prompt = _ids(tokenizer)
    expected = [e.token_id for e in engine.generate(prompt, max_tokens=6, ignore_eos=True)]
    results = [None] * 3

    def client(i):
        results[i] = [e.token_id for e in engine.generate(prompt, max_tokens=6, ignore_eos=True)]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [expected] * 3
