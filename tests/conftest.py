"""Shared pytest fixtures. Each section belongs to one part of the project; append yours below."""

# ============================================================================================
# kernels (kernels/*/triton_kernels.py): without a GPU, run Triton kernels in Triton's interpreter.
# Must happen before any test module imports a kernel: triton.jit reads TRITON_INTERPRET when it
# decorates. On a CUDA machine the real compiled kernels run.
# ============================================================================================
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

# ============================================================================================
# assets + data (quantize/assets.py, quantize/data.py): the real prepared cache
# ============================================================================================
from pathlib import Path

import pytest

SMOLLM2 = "models/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def gq_cache() -> Path:
    """The real asset cache (``$GQ_CACHE`` or ``~/.cache/gq-serve``); may be unprepared."""
    from gq_serve.util import cache_root

    return cache_root()


@pytest.fixture(scope="session")
def smollm2_dir(gq_cache: Path) -> Path:
    """The prepared fp16 SmolLM2-135M-Instruct HF directory; skips the test when absent."""
    d = gq_cache / SMOLLM2
    if not (d / "config.json").is_file():
        pytest.skip(f"real model not prepared at {d}: run `gq prepare` (or set GQ_CACHE)")
    return d


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    """SmolLM2's tokenizer, loaded once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def real_corpora(gq_cache: Path) -> Path:
    """The cache root, after checking SOTU and Brown are prepared; skips otherwise."""
    for sub in ("corpora/sotu", "corpora/brown"):
        if not (gq_cache / sub / "gq_asset.json").is_file():
            pytest.skip(f"corpus not prepared at {gq_cache / sub}: run `gq prepare` (or set GQ_CACHE)")
    return gq_cache


# ============================================================================================
# (end of assets + data section)
# ============================================================================================


# ============================================================================================
# serving (gq_serve/engine.py, server.py, bench.py): a tiny random Llama + offline tokenizer,
# and OpenAI-compatible servers running in background threads on 127.0.0.1
# ============================================================================================
import socket as _socket
import threading as _threading
import time as _time

TINY_MODEL_NAME = "tiny-llama"
TINY_API_KEY = "test-key"
_TINY_WORDS = (
    "the a cat dog bird sat ran flew on under over mat tree house red blue green big small "
    "one two three four five hello world is was and or not yes no why how when today night"
).split()
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tiny_lm(out_dir: Path, max_position_embeddings: int = 128) -> Path:
    """Save a random 2-layer LlamaForCausalLM and a trained WordLevel tokenizer to out_dir."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(_TINY_WORDS), "system user assistant : . , ! ?"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, initializer_range=0.2, architectures=["LlamaForCausalLM"],
    )
    LlamaForCausalLM(config).eval().save_pretrained(out_dir)
    return out_dir


def write_tiny_corpus(path: Path, seed: int = 0) -> Path:
    """Four documents of 200 random words of the tiny tokenizer's vocabulary: calibration text."""
    import random

    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choices(_TINY_WORDS, k=200)) for _ in range(4)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A tiny calibration corpus (:func:`write_tiny_corpus`, seed 0) per test module."""
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    """(model, tokenizer) loaded once per session, fp32 on the CPU."""
    from gq_serve.checkpoint import load_model, load_tokenizer

    return load_model(str(tiny_lm_dir), "cpu", "float32"), load_tokenizer(str(tiny_lm_dir))


class ThreadedServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app, engine) -> None:
        import uvicorn

        self.engine = engine
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # bind first: no race for the port between picking and serving
        self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = _threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = _time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or _time.monotonic() > deadline:
                raise RuntimeError("test server did not start within 30 s")
            _time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()


class Gate:
    """Wraps a model's forward so tests can hold the engine (gate closed) or slow it (delay)."""

    def __init__(self, model) -> None:
        self.open = _threading.Event()
        self.open.set()
        self.delay = 0.0
        self.calls = 0
        inner = model.forward

        def forward(*args, **kwargs):
            self.calls += 1
            self.open.wait(30)  # bounded: a broken test cannot hang the session forever
            if self.delay:
                _time.sleep(self.delay)
            return inner(*args, **kwargs)

        model.forward = forward  # instance attribute: nn.Module.__call__ picks it up


@pytest.fixture(scope="session")
def tiny_server(tiny_lm):
    """Main test server: API key required, queue of 8."""
    from gq_serve.engine import Engine
    from gq_serve.server import create_app

    model, tokenizer = tiny_lm
    engine = Engine(model, tokenizer, device="cpu", max_queue=8)
    srv = ThreadedServer(create_app(engine, TINY_MODEL_NAME, api_key=TINY_API_KEY), engine)
    srv.model_name, srv.api_key = TINY_MODEL_NAME, TINY_API_KEY
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def gated_server(tiny_lm_dir):
    """A second server with a queue of 1 over its own model copy whose forward a Gate controls."""
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine
    from gq_serve.server import create_app

    model = load_model(str(tiny_lm_dir), "cpu", "float32")
    gate = Gate(model)
    engine = Engine(model, load_tokenizer(str(tiny_lm_dir)), device="cpu", max_queue=1)
    srv = ThreadedServer(create_app(engine, TINY_MODEL_NAME), engine)
    srv.model_name, srv.gate = TINY_MODEL_NAME, gate
    yield srv
    gate.open.set()
    srv.stop()


def trellis_random_layer(m: int, n: int, bits: int, code: str, seed: int = 0, blocks: int = 1, device: str = "cpu"):
    """Random packed tensors of a valid trellis linear (any stream is a valid circular chain) and
    its format params."""
    from gq_kernels.hadamard import random_signs
    from gq_kernels.registry import get_format
    from gq_kernels.trellis.codes import default_tlut

    g = _torch.Generator().manual_seed(seed)
    words = _torch.randint(-32768, 32768, ((m // 16) * (n // 16), 16 * bits), generator=g, dtype=_torch.int32)
    t = {"trellis": words.to(_torch.int16), "SU": random_signs(n, g).half(), "SV": random_signs(m, g).half(),
         "Wscale": _torch.tensor([0.05])}
    if code == "hyb":
        t["tlut"] = default_tlut()
    params = get_format("trellis").params(bits=bits, trellis_code=code, out_rht_blocks=blocks)
    return {k: v.to(device) for k, v in t.items()}, params


def greedy_tokens(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens of a plain HF model, one full forward per token (no cache, no EOS stop):
    the reference every engine's greedy output is compared with."""
    import torch

    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


@pytest.fixture(scope="session")
def quantized_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny Llama with every linear but lm_head as a random 3-bit LUT (GQLinear) checkpoint."""
    import json

    import torch

    from gq_kernels.lut.format import LutQuant
    from gq_quantize.config import QuantizeConfig
    from gq_quantize.export import export_checkpoint, linear_shapes

    g = torch.Generator().manual_seed(0)
    quantized = {
        name: LutQuant(torch.randint(0, 8, (o, i), generator=g).to(torch.uint8),
                       (torch.randn(o, 8, generator=g) * 0.2).half(), 3)
        for name, (o, i, _) in linear_shapes(json.loads((tiny_lm_dir / "config.json").read_text())).items()
        if name != "lm_head"
    }
    out = tmp_path_factory.mktemp("quantized") / "q"
    return export_checkpoint(tiny_lm_dir, quantized, QuantizeConfig(method="squeezellm", bits=3), out)


# ============================================================================================
# (end of serving section)
# ============================================================================================
