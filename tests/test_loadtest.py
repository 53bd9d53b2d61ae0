"""`ernie45 loadtest` (vLLM `bench serve` metrics) and the commands of docs/serve.md, run as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess

import pytest
from conftest import make_hf_model, save_hf
from test_serve import cli_server, make_app, metric, running

from ernie45.cli import main as cli_main
from ernie45.errors import ErnieError
from ernie45.serve.loadtest import RequestResult, format_table, main, run_load, summarize

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "serve.md")
VLLM_KEYS = [
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "duration",
] + [
    f"{s}_{m}_ms"
    for m in ("ttft", "tpot", "itl", "e2el")
    for s in ("mean", "median", "std", "p50", "p90", "p99")
]


def test_summary_formulas():
    rs = [
        RequestResult(
            ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, itl=[0.1, 0.2, 0.1, 0.2], latency=0.7
        ),
        RequestResult(ok=True, prompt_tokens=10, output_tokens=3, ttft=0.3, itl=[0.2, 0.2], latency=0.7),
        RequestResult(status=429, error="queue full"),
    ]
    s = summarize(rs, duration=2.0)
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (2, 1, 20, 8)
    assert (
        s["request_throughput"] == 1.0
        and s["output_throughput"] == 4.0
        and s["total_token_throughput"] == 14.0
    )
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_e2el_ms"] == pytest.approx(700.0)
    assert s["mean_tpot_ms"] == pytest.approx((150.0 + 200.0) / 2)  # (e2el - ttft) / (out - 1)
    assert s["mean_itl_ms"] == pytest.approx(1000 * 1.0 / 6) and s["p50_itl_ms"] == pytest.approx(200.0)
    assert s["errors"] == {"queue full": 1} and s["status_counts"] == {"0": 2, "429": 1}
    s.update(max_concurrency=1)
    assert "Successful requests:" in format_table(s) and "P99 ITL (ms):" in format_table(s)


def test_loadtest_against_server(tmp_path, tokenizer_dir):
    hf = make_hf_model("dense", max_position_embeddings=1024)
    app, *_ = make_app(save_hf(hf, tmp_path / "tiny", tokenizer_dir), max_num_seqs=4, max_model_len=256)
    with running(app) as base:
        before = metric(base, "ernie45_generation_tokens_total")
        out = tmp_path / "results.json"
        rc = main(
            [
                "--base-url",
                base,
                "--num-prompts",
                "16",
                "--max-concurrency",
                "4",
                "--input-len",
                "12",
                "--output-len",
                "8",
                "--ignore-eos",
                "--out",
                str(out),
            ]
        )
        s = json.loads(out.read_text())
        assert rc == 0 and all(k in s for k in VLLM_KEYS)
        assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (
            16,
            0,
            192,
            128,
        )
        assert metric(base, "ernie45_generation_tokens_total") - before == 128
        for m in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < s[f"p50_{m}_ms"] <= s[f"p90_{m}_ms"] <= s[f"p99_{m}_ms"]
        assert s["mean_ttft_ms"] < s["mean_e2el_ms"]
        # Poisson arrivals, through the `ernie45` dispatcher
        assert (
            cli_main(
                [
                    "loadtest",
                    "--base-url",
                    base,
                    "--num-prompts",
                    "4",
                    "--max-concurrency",
                    "2",
                    "--request-rate",
                    "50",
                    "--input-len",
                    "4",
                    "--output-len",
                    "2",
                ]
            )
            == 0
        )


def test_loadtest_multi_turn_reports_prefix_hits(tmp_path, tokenizer_dir):
    """--turns: each turn re-sends the history (with the answer's exact ids) plus new tokens; the server's
    `cached_tokens` count exactly the full blocks of the previous turn's prompt and answer."""
    hf = make_hf_model("dense", max_position_embeddings=1024)
    app, *_ = make_app(save_hf(hf, tmp_path / "tiny", tokenizer_dir), max_num_seqs=4, max_model_len=512,
                       block_size=16)
    with running(app) as base:
        out = tmp_path / "turns.json"
        args = ["--base-url", base, "--num-prompts", "2", "--max-concurrency", "2", "--input-len", "40",
                "--output-len", "6", "--ignore-eos", "--turns", "3", "--turn-len", "10", "--out", str(out)]
        assert main(args) == 0
        s = json.loads(out.read_text())
        assert (s["completed"], s["failed"], s["turns"]) == (6, 0, 3)
        # prompts per conversation: 40, 40+6+10 = 56, 56+6+10 = 72 tokens; a turn finds every full block of
        # the previous prompt + answer but the last token's (46 -> 32 cached, 62 -> 48 cached)
        assert s["total_input_tokens"] == 2 * (40 + 56 + 72)
        assert s["prefix_cache_hit_rate"] == pytest.approx(2 * (32 + 48) / s["total_input_tokens"])
        assert set(s["ttft_by_turn"]) == {"1", "2", "3"}
        assert metric(base, "ernie45_prefix_cache_hits_total") == 2 * (32 + 48)
    assert "Prefix cache hit rate:" in format_table(s) and "Turn 3 TTFT" in format_table(s)


def test_loadtest_refuses_remote_and_bad_args():
    with pytest.raises(ErnieError, match="loopback"):
        main(["--base-url", "http://192.0.2.1:8000", "--num-prompts", "1"])
    with pytest.raises(ErnieError, match="--num-prompts"):
        main(["--num-prompts", "0"])
    with pytest.raises(ErnieError, match="--max-concurrency"):
        main(["--max-concurrency", "100000"])
    with pytest.raises(ErnieError, match="--turns"):
        main(["--turns", "0"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    with pytest.raises(ErnieError, match="cannot query"):
        import asyncio

        asyncio.run(run_load(f"http://127.0.0.1:{sock.getsockname()[1]}", 1, 1))
    sock.close()


def _bash_blocks(path: str) -> list[str]:
    text = open(path, encoding="utf-8").read()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_chinese_guide_has_the_same_commands():
    assert _bash_blocks(DOCS.replace("serve.md", "serve_zh.md")) == _bash_blocks(DOCS)


@pytest.mark.slow
def test_docs_commands_run(tmp_path, tokenizer_dir):
    """Run docs/serve.md's bash blocks: serve (a subprocess), the curl calls, the load tests (one of multi-turn
    conversations, which the prefix cache serves); then Ctrl-C."""
    serve_cmd, curls, load_cmd, turns_cmd = _bash_blocks(DOCS)
    hf = make_hf_model("dense", max_position_embeddings=4096)
    model_dir = save_hf(hf, tmp_path / "ERNIE-4.5-0.3B-PT", tokenizer_dir)
    with cli_server(serve_cmd, model_dir) as server:
        port = server.port
        outputs = []
        for line in curls.replace("8000", port).splitlines():
            r = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            outputs.append(r.stdout)
        assert json.loads(outputs[0]) == {"status": "ok"}
        assert json.loads(outputs[1])["data"][0]["id"] == "ERNIE-4.5-0.3B-PT"
        assert json.loads(outputs[2])["choices"][0]["message"]["role"] == "assistant"
        events = [e for e in outputs[3].split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] <= 16
        assert len(json.loads(outputs[4])["choices"][0]["logprobs"]["tokens"]) <= 16
        load = shlex.split(load_cmd.replace("8000", port).replace("results.json", str(tmp_path / "r.json")))
        load = [{"64": "8", "128": "8"}.get(a, a) for a in load]
        assert cli_main(load[1:]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["completed"] == 8
        turns = shlex.split(turns_cmd.replace("8000", port))
        turns = [{"1500": "100", "32": "8"}.get(a, a) for a in turns] + ["--out", str(tmp_path / "t.json")]
        assert cli_main(turns[1:]) == 0
        t = json.loads((tmp_path / "t.json").read_text())
        assert t["completed"] == 16 and t["prefix_cache_hit_rate"] > 0.5
    assert '"path": "/v1/chat/completions", "status": 200' in server.output  # the JSON access log
