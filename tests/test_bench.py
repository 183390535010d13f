"""Benchmarks at toy scale: offline decode rows, online sweep JSON + PNG, CLI wiring."""

import json

from gq_serve.bench import bench_offline
from gq_serve.bench_online import bench_online, plot_online
from gq_serve.cli import build_parser


def test_bench_offline_rows(tiny_lm):
    model, tokenizer = tiny_lm
    rows = bench_offline({"base": (model, tokenizer), "same": (model, tokenizer)}, new_tokens=8, runs=2)
    assert [r["label"] for r in rows] == ["base", "same"]
    for r in rows:
        assert r["new_tokens"] == 8 and r["runs"] == 2 and len(r["tok_per_s_runs"]) == 2
        assert r["tok_per_s"] > 0 and r["e2e_tok_per_s"] > 0 and r["prefill_ms"] > 0
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["baseline"] == "base"
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0


def test_bench_online_writes_json_and_png(tiny_server, tmp_path):
    result = bench_online(tiny_server.base_url, tiny_server.model_name, api_key=tiny_server.api_key,
                          concurrency=[1, 2], requests_per_level=3, max_tokens=6, prompt="the cat",
                          ignore_eos=True, timeout=30, level_time_limit=60, progress=False)
    levels = result["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["ok"] == 3 and lv["errors"] == 0 and lv["output_tokens"] == 18
        assert lv["req_per_s"] > 0 and lv["output_tok_per_s"] > 0
        assert 0 < lv["ttft_p50_ms"] <= lv["ttft_p99_ms"] and 0 < lv["tpot_p50_ms"] <= lv["tpot_p99_ms"]
    png = plot_online(result, tmp_path / "online.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_online_and_errors_counted(tiny_server, tmp_path):
    parser = build_parser()
    out = tmp_path / "sweep.json"
    args = parser.parse_args(["bench", "online", "--base-url", tiny_server.base_url + "/v1",
                              "--model", tiny_server.model_name, "--concurrency", "1,2",
                              "--requests", "2", "--max-tokens", "3", "--no-progress", "-o", str(out)])
    args.func(args)  # no API key: every request is a 401, counted, not raised
    data = json.loads(out.read_text())
    assert [lv["error_kinds"] for lv in data["levels"]] == [{"http_401": 2}] * 2
    assert (tmp_path / "sweep.png").is_file()


def test_bench_cli_offline(tiny_lm_dir, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "offline.json"
    args = parser.parse_args(["bench", "offline", f"tiny={tiny_lm_dir}", "--new-tokens", "4",
                              "--runs", "1", "--dtype", "float32", "-o", str(out)])
    rows = args.func(args)
    assert rows[0]["label"] == "tiny" and json.loads(out.read_text())["rows"][0]["new_tokens"] == 4
    assert "tok/s" in capsys.readouterr().out


def test_bench_cli_offline_static_compile(tiny_lm_dir, tmp_path):
    """--decode static --compile reaches the static decoder (its compiled step is what runs)."""
    from unittest import mock

    from gq_serve import static_decode

    seen = {}
    real = static_decode.StaticDecoder.__init__

    def spy(self, *a, **kw):
        seen["compile"] = kw.get("compile")
        real(self, *a, **{**kw, "compile": False})  # the flag's route is the test; compiling takes minutes here

    args = build_parser().parse_args(["bench", "offline", f"tiny={tiny_lm_dir}", "--new-tokens", "3", "--runs", "1",
                                      "--dtype", "float32", "--decode", "static", "--compile",
                                      "-o", str(tmp_path / "o.json")])
    with mock.patch.object(static_decode.StaticDecoder, "__init__", spy):
        rows = args.func(args)
    assert seen["compile"] is True and rows[0]["decode"].startswith("static")
