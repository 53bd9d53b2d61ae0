"""`ernie45 bench serve`: the server under load, beside `generate` in the same run.

For each dtype it starts `ernie45 serve` on a random checkpoint of a bench shape (a process of its own, on a free
loopback port) and measures, with the `loadtest` client:

- concurrency rows (c1, c4, c8, c16 by default): aggregate and per-stream decode tok/s, TTFT and inter-token
  latency percentiles, and the server's peak RSS, next to `generate`'s decode tok/s (the `bench` worker, same
  checkpoint, same threads) measured just before;
- multi-turn rows: conversations whose every turn re-sends a long history plus a few new tokens (an agent),
  with the prefix cache on and off: TTFT of the first and later turns, and the hit rate;
- a stall row: four streams decode while one request prefills a long prompt; the streams' worst inter-token
  gap during that prefill against their idle gap (chunked prefill keeps it small);
- context rows (`--context`): the C decode step's time at 1K-128K cached positions over a paged KV cache in the
  model dtype and in int8 (pages filled with random values: no 128K prefill needed), which isolates what
  attention costs per token as the context grows.

Results go to a Markdown table (`--out`) and JSON (`--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from ernie45.bench import (
    DTYPES,
    _cpu_name,
    _csv,
    prepare,
    row_dtypes,
    write_results,
)
from ernie45.bench_checkpoints import make_checkpoint, shape_config
from ernie45.bench_isa import isa_env
from ernie45.commands import add_max_new_tokens_arg
from ernie45.errors import ErnieError

SERVE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "wint8": "auto", "wint4": "auto"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ernie45 serve` in a subprocess; `peak_rss_mb()` reads its high-water mark (VmHWM)."""

    def __init__(self, ckpt: str, dtype: str, threads: int | None, max_model_len: int, max_num_seqs: int,
                 prefix_caching: bool = True, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ernie45", "serve", "--model", ckpt, "--dtype", SERVE_DTYPE[dtype],
               "--port", str(self.port), "--max-model-len", str(max_model_len),
               "--max-num-seqs", str(max_num_seqs),
               "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 900.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ErnieError(f"the server exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling a subprocess's readiness, not synchronising threads
        raise ErnieError("the server did not become ready in time")

    def peak_rss_mb(self) -> float:
        """The server's peak resident memory (VmHWM); 0 where /proc is not there (not Linux)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-600:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def generate_baseline(ckpt: str, dtype: str, input_len: int, output_len: int, threads: int,
                      env: dict[str, str]) -> dict[str, Any]:
    """`generate`'s decode tok/s and peak RSS (the `bench` worker in its own process)."""
    spec = dict(engine="ernie45", ckpt=ckpt, dtype=dtype, prompt_len=input_len, gen_len=output_len, runs=2,
                threads=threads, llama_dir=None)
    r = subprocess.run([sys.executable, "-m", "ernie45.bench", "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0 or not last.startswith("{"):
        raise ErnieError(f"the generate baseline failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return json.loads(last)


def concurrency_row(base: str, c: int, input_len: int, output_len: int) -> dict[str, Any]:
    from ernie45.serve.loadtest import run_load

    s = asyncio.run(run_load(base, num_prompts=2 * c, max_concurrency=c, input_len=input_len,
                             output_len=output_len, ignore_eos=True))
    if s["failed"]:
        raise ErnieError(f"c{c}: {s['failed']} requests failed: {s['errors']}")
    return dict(kind="concurrency", concurrency=c, output_tok_s=s["output_throughput"],
                per_stream_tok_s=1000.0 / s["median_tpot_ms"], ttft_p50_ms=s["median_ttft_ms"],
                ttft_p90_ms=s["p90_ttft_ms"], itl_p50_ms=s["median_itl_ms"], itl_p99_ms=s["p99_itl_ms"])


def multi_turn_row(base: str, turns: int, prefix: int, turn_len: int, output_len: int) -> dict[str, Any]:
    from ernie45.serve.loadtest import run_load

    s = asyncio.run(run_load(base, num_prompts=2, max_concurrency=1, input_len=prefix, output_len=output_len,
                             ignore_eos=True, turns=turns, turn_len=turn_len))
    if s["failed"]:
        raise ErnieError(f"multi-turn: {s['failed']} requests failed: {s['errors']}")
    by_turn = s["ttft_by_turn"]
    first = by_turn["1"]["median_ttft_ms"]
    later = statistics.median(by_turn[str(t)]["median_ttft_ms"] for t in range(2, turns + 1))
    return dict(kind="multi-turn", turns=turns, prefix=prefix, turn_len=turn_len, first_ttft_ms=first,
                later_ttft_ms=later, hit_rate=s["prefix_cache_hit_rate"])


async def _stall(base: str, streams: int, long_len: int, output_len: int) -> dict[str, Any]:
    """`streams` streams decode; once each has a few tokens, one request prefills `long_len` tokens. Returns the
    streams' median gap before it and their largest gap while it prefilled."""
    import random

    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
        vocab = int((await client.get(f"{base}/tokenizer_info")).json().get("vocab_size", 1000))
        rng = random.Random(0)
        stamps: list[list[float]] = [[] for _ in range(streams)]
        window: list[float] = []
        warm = asyncio.Event()

        async def stream(i: int, prompt: list[int], n: int, out: list[float]) -> None:
            payload = dict(model=model, prompt=prompt, max_tokens=n, temperature=0.0, ignore_eos=True, stream=True)
            async with client.stream("POST", f"{base}/v1/completions", json=payload) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and "[DONE]" not in line:
                        out.append(time.perf_counter())
                        if i >= 0 and len(out) == 16 and all(len(s) >= 16 for s in stamps):
                            warm.set()

        async def long_request() -> None:
            await warm.wait()
            window.append(time.perf_counter())
            done: list[float] = []
            await stream(-1, [rng.randrange(100, vocab) for _ in range(long_len)], 1, done)
            window.append(done[0])

        tasks = [stream(i, [rng.randrange(100, vocab) for _ in range(32)], output_len, stamps[i])
                 for i in range(streams)]
        await asyncio.gather(*tasks, long_request())
    t0, t1 = window
    idle = [b - a for s in stamps for a, b in zip(s, s[1:]) if b < t0]
    during = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1]
    during = sorted(during or [0.0])
    return dict(idle_itl_ms=1000 * statistics.median(idle), max_itl_during_ms=1000 * during[-1],
                p90_itl_during_ms=1000 * during[int(0.9 * (len(during) - 1))], prefill_s=t1 - t0)


def stall_row(base: str, long_len: int, output_len: int) -> dict[str, Any]:
    r = asyncio.run(_stall(base, 4, long_len, output_len))
    return dict(kind="stall", streams=4, long_prompt=long_len, **r,
                ratio=r["max_itl_during_ms"] / r["idle_itl_ms"])


def context_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In its own process: the batch-1 C step's median time at each position of `spec["positions"]`."""
    import torch

    from ernie45.bench import peak_rss_mb
    from ernie45.checkpoint import load_checkpoint
    from ernie45.fast import optimize_for_inference
    from ernie45.serve.kv import PagedKVCache

    torch.set_num_threads(spec["threads"])
    model = load_checkpoint(spec["ckpt"], dtype=getattr(torch, spec["torch_dtype"]), device="cpu")
    optimize_for_inference(model)
    fast = getattr(model, "fast_decoder", None)
    if fast is None or not hasattr(fast, "step_batch"):
        raise ErnieError("no C decode step on this machine")
    bs, top = 16, max(spec["positions"])
    cache = PagedKVCache(model, top // bs + 2, bs, spec["kv_dtype"])
    g = torch.Generator().manual_seed(0)
    for pages in cache.k + cache.v:  # random keys/values: what attention costs does not depend on them
        if pages.dtype == torch.int8:
            pages.copy_(torch.randint(-127, 128, pages.shape, generator=g, dtype=torch.int8))
        else:
            for blk in pages.split(4096):
                blk.copy_(torch.randn(blk.shape, generator=g))
    for scales in (cache.k_scale or []) + (cache.v_scale or []):
        scales.fill_(0.01)
    table = torch.arange(top // bs + 2, dtype=torch.int32)[None]
    out = {}
    for pos in spec["positions"]:
        times = []
        for _ in range(6):
            t = time.perf_counter()
            fast.step_batch([5], [pos], table, cache.k, cache.v,
                            **({} if cache.k_scale is None else {"k_scales": cache.k_scale, "v_scales": cache.v_scale}))
            times.append(time.perf_counter() - t)
        out[str(pos)] = 1000 * statistics.median(times[1:])
    return dict(step_ms=out, kv_bytes=cache.nbytes, peak_rss_mb=peak_rss_mb())


def context_rows(ckpt: str, dtype: str, positions: list[int], threads: int, env: dict[str, str]) -> list[dict]:
    rows = []
    for kv in ("auto", "int8"):
        spec = dict(ckpt=ckpt, torch_dtype=SERVE_DTYPE[dtype] if dtype in ("fp32", "bf16") else "bfloat16",
                    kv_dtype=kv, positions=positions, threads=threads)
        r = subprocess.run([sys.executable, "-m", "ernie45.bench_serve", "--context-worker", json.dumps(spec)],
                           capture_output=True, text=True, env=env)
        last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if r.returncode != 0 or not last.startswith("{"):
            raise ErnieError(f"context run failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        res = json.loads(last)
        rows.append(dict(kind="context", kv_dtype=kv, **res))
    return rows


def bench_serve(shape: str, dtypes: list[str], concurrency: list[int], input_len: int, output_len: int,
                threads: int | None, workdir: str | None, turns: int, turn_prefix: int, turn_len: int,
                long_prompt: int, layers: int | None = None, context: list[int] | None = None
                ) -> list[dict[str, Any]]:
    cfg = shape_config(shape, layers)
    threads = threads or os.cpu_count() or 1
    workdir = workdir or os.path.join(tempfile.gettempdir(), "ernie45-bench")
    os.makedirs(workdir, exist_ok=True)
    ckpt = make_checkpoint(shape, workdir, layers)
    env = isa_env("native")
    max_len = min(cfg.max_position_embeddings, max(input_len + output_len, long_prompt + 64,
                                                   turn_prefix + turns * (turn_len + 16) + 16))
    rows = []
    for dtype in dtypes:
        path = ckpt
        if dtype in ("wint8", "wint4"):
            path, why = prepare("quantize", ckpt, dtype)
            if not path:
                raise ErnieError(f"quantizing the checkpoint failed: {why}")
        base = dict(shape=shape, dtype=dtype, threads=threads)
        gen = generate_baseline(path, dtype, input_len, output_len, threads, env)
        rows.append(dict(base, kind="generate", decode_tok_s=gen["decode_tok_s"], peak_rss_mb=gen["peak_rss_mb"]))
        gen_row = rows[-1]
        with Server(path, dtype, threads, max_len, max(concurrency + [5]), env=env) as srv:  # 4 streams + 1
            for i, c in enumerate(concurrency):
                rows.append(dict(base, **concurrency_row(srv.base, c, input_len, output_len)))
                if i == 0:
                    # generate again right after the first row, the server idle: this VM's bandwidth drifts by
                    # +-30 % within minutes, so the rows compare with the mean of the runs on either side
                    again = generate_baseline(path, dtype, input_len, output_len, threads, env)
                    gen_row["decode_tok_s_runs"] = [gen["decode_tok_s"], again["decode_tok_s"]]
                    gen_row["decode_tok_s"] = (gen["decode_tok_s"] + again["decode_tok_s"]) / 2
                    print(_fmt(gen_row), file=sys.stderr, flush=True)
                rows[-1]["generate_tok_s"] = gen_row["decode_tok_s"]
                print(_fmt(rows[-1]), file=sys.stderr, flush=True)
            if long_prompt:
                rows.append(dict(base, **stall_row(srv.base, long_prompt, 256)))
                print(_fmt(rows[-1]), file=sys.stderr, flush=True)
            if turns > 1:
                rows.append(dict(base, **multi_turn_row(srv.base, turns, turn_prefix, turn_len, 16),
                                 prefix_caching=True))
                print(_fmt(rows[-1]), file=sys.stderr, flush=True)
            rss = srv.peak_rss_mb()
        for r in rows:
            if r["dtype"] == dtype and r["kind"] != "generate":
                r["server_peak_rss_mb"] = rss
        if turns > 1:
            with Server(path, dtype, threads, max_len, 4, prefix_caching=False, env=env) as srv:
                rows.append(dict(base, **multi_turn_row(srv.base, turns, turn_prefix, turn_len, 16),
                                 prefix_caching=False, server_peak_rss_mb=None))
                rows[-1]["server_peak_rss_mb"] = srv.peak_rss_mb()
                print(_fmt(rows[-1]), file=sys.stderr, flush=True)
        if context:
            for r in context_rows(path, dtype, context, threads, env):
                rows.append(dict(base, **r))
                print(_fmt(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _fmt(r: dict[str, Any]) -> str:
    head = f"{r['shape']} {r['dtype']:>5} {r['kind']:>12}"
    if r["kind"] == "generate":
        return f"{head}  decode {r['decode_tok_s']:.1f} tok/s  RSS {r['peak_rss_mb']:.0f} MB"
    if r["kind"] == "concurrency":
        return (f"{head}  c{r['concurrency']:<3} {r['output_tok_s']:7.1f} tok/s ({r['per_stream_tok_s']:.1f} per "
                f"stream)  TTFT p50 {r['ttft_p50_ms']:.0f} ms  ITL p50 {r['itl_p50_ms']:.1f} ms p99 "
                f"{r['itl_p99_ms']:.1f} ms")
    if r["kind"] == "context":
        steps = ", ".join(f"{int(p) // 1024}K {ms:.1f} ms" for p, ms in r["step_ms"].items())
        return f"{head}  KV {r['kv_dtype']}: decode step at {steps}"
    if r["kind"] == "stall":
        return (f"{head}  idle ITL {r['idle_itl_ms']:.1f} ms, worst during a {r['long_prompt']}-token prefill "
                f"{r['max_itl_during_ms']:.1f} ms ({r['ratio']:.1f}×)")
    return (f"{head}  prefix cache {'on' if r['prefix_caching'] else 'off'}: TTFT turn 1 {r['first_ttft_ms']:.0f} "
            f"ms, later {r['later_ttft_ms']:.0f} ms, hit rate {r['hit_rate']:.0%}")


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Machine: {meta['machine']}; {meta['threads']} threads; torch {meta['torch']}; {meta['date']}. "
             f"Concurrency rows: {meta['input_len']}-token prompts, {meta['output_len']} tokens generated, "
             "2 × c requests per row.", "",
             "| shape | dtype | concurrency | tok/s (all streams) | tok/s per stream | vs generate | TTFT p50 / p90 ms "
             "| ITL p50 / p99 ms | server peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "generate":
            lines.append(f"| {r['shape']} | {r['dtype']} | generate | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_tok_s']:.1f} | — | — | — | {r['peak_rss_mb']:.0f} |")
        elif r["kind"] == "concurrency":
            lines.append(f"| {r['shape']} | {r['dtype']} | c{r['concurrency']} | {r['output_tok_s']:.1f} | "
                         f"{r['per_stream_tok_s']:.1f} | {r['per_stream_tok_s'] / r['generate_tok_s']:.2f}× | "
                         f"{r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} | {r['itl_p50_ms']:.1f} / "
                         f"{r['itl_p99_ms']:.1f} | {r['server_peak_rss_mb']:.0f} |")
    stalls = [r for r in rows if r["kind"] == "stall"]
    if stalls:
        lines += ["", "Chunked prefill: 4 streams decode while one request prefills a long prompt.", "",
                  "| shape | dtype | long prompt | prefill s | idle ITL ms | p90 ITL during the prefill ms "
                  "| worst ITL during the prefill ms | worst ÷ idle |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['dtype']} | {r['long_prompt']} | {r['prefill_s']:.1f} | "
                  f"{r['idle_itl_ms']:.1f} | "
                  + (f"{r['p90_itl_during_ms']:.1f}" if "p90_itl_during_ms" in r else "—")
                  + f" | {r['max_itl_during_ms']:.1f} | {r['ratio']:.1f}× |" for r in stalls]
    turns = [r for r in rows if r["kind"] == "multi-turn"]
    if turns:
        t = turns[0]
        lines += ["", f"Multi-turn (agent) conversations: a {t['prefix']}-token first prompt, then {t['turns'] - 1} "
                  f"turns each re-sending the history plus {t['turn_len']} new tokens; 2 conversations.", "",
                  "| shape | dtype | prefix cache | TTFT turn 1 ms | TTFT later turns ms | later ÷ first | hit rate "
                  "| server peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['dtype']} | {'on' if r['prefix_caching'] else 'off'} | "
                  f"{r['first_ttft_ms']:.0f} | {r['later_ttft_ms']:.0f} | "
                  f"{r['later_ttft_ms'] / r['first_ttft_ms']:.2f} | {r['hit_rate']:.0%} | "
                  f"{r['server_peak_rss_mb']:.0f} |" for r in turns]
    ctx = [r for r in rows if r["kind"] == "context"]
    if ctx:
        pos = list(ctx[0]["step_ms"])
        lines += ["", "Long context: the batch-1 C decode step at each cached position (paged KV cache, random "
                  "contents); the growth over the shortest is what attention costs.", "",
                  "| shape | dtype | KV cache | " + " | ".join(f"step ms at {int(p) // 1024}K" for p in pos)
                  + " | KV bytes for the longest | peak RSS MB |",
                  "|---|---|---|" + "---|" * len(pos) + "---|---|"]
        lines += [f"| {r['shape']} | {r['dtype']} | {r['kv_dtype']} | "
                  + " | ".join(f"{r['step_ms'][p]:.1f}" for p in pos)
                  + f" | {r['kv_bytes'] / 2**30:.2f} GiB | {r['peak_rss_mb']:.0f} |" for r in ctx]
    lines += ["", "`vs generate`: the per-stream decode rate over `ernie45 generate`'s on the same checkpoint in the "
              "same run (the `generate` row: the mean of a run just before the server and one right after its first "
              "concurrency row, the server idle). `later ÷ first`: median TTFT of turns 2.. over turn 1's."]
    return "\n".join(lines) + "\n"


def _ints(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or any(v < 1 or v > 256 for v in out):
        raise ErnieError(f"{what} wants a comma list of integers in 1..256, got {value!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45 bench serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="0.3b", help="a bench shape (see `ernie45 bench --help`)")
    p.add_argument("--layers", type=int, default=None, help="depth of the a3b shape")
    p.add_argument("--dtype", type=row_dtypes, default="bf16",
                   help=f"comma list of {', '.join(DTYPES)} (or float32, bfloat16, auto)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma list of concurrent streams")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens of the concurrency rows")
    add_max_new_tokens_arg(p, 128, "tokens generated per request", old=("--output-len",))
    p.add_argument("--turns", type=int, default=4, help="turns per multi-turn conversation (1: no such rows)")
    p.add_argument("--turn-prefix", type=int, default=1500, help="first prompt of a conversation, tokens")
    p.add_argument("--turn-len", type=int, default=10, help="new tokens per later turn")
    p.add_argument("--long-prompt", type=int, default=4000,
                   help="prompt prefilled while 4 streams decode (0: no stall row)")
    p.add_argument("--context", default="",
                   help="comma list of positions (e.g. 1024,8192,32768,131072) to time the decode step at")
    p.add_argument("--context-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--workdir", default=None, help="where the random checkpoints are kept")
    p.add_argument("--json", dest="json_out", default=None, help="write the rows as JSON here")
    p.add_argument("--out", default=None, help="write a Markdown table here (e.g. bench/results-serve.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.context_worker:
        print(json.dumps(context_worker(json.loads(a.context_worker))))
        return 0
    try:
        context = [int(v) for v in a.context.split(",") if v.strip()]
    except ValueError:
        context = [0]
    if any(v < 1 for v in context):
        raise ErnieError(f"--context wants a comma list of positive positions, got {a.context!r}")
    dtypes = _csv(a.dtype, DTYPES, "dtype")
    conc = _ints(a.concurrency, "--concurrency")
    if (a.input_len < 1 or a.max_new_tokens < 2 or a.turns < 1 or a.turn_prefix < 1 or a.turn_len < 1
            or a.long_prompt < 0):
        raise ErnieError("--input-len, --turns, --turn-prefix, --turn-len must be >= 1, --max-new-tokens "
                         "(--output-len) >= 2 and --long-prompt >= 0")
    import torch

    rows = bench_serve(a.shape, dtypes, conc, a.input_len, a.max_new_tokens, a.threads, a.workdir, a.turns,
                       a.turn_prefix, a.turn_len, a.long_prompt, a.layers, context)
    meta = dict(machine=f"{_cpu_name()}, {os.cpu_count()} cores", torch=torch.__version__,
                threads=a.threads or os.cpu_count(), input_len=a.input_len, output_len=a.max_new_tokens,
                date=time.strftime("%Y-%m-%d"))
    write_results(rows, meta, to_markdown(rows, meta), a.json_out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
