"""`ernie45 loadtest`: a bounded asyncio load generator for an OpenAI-compatible server.

Reports vLLM `bench serve`'s metric set and names (ECOSYSTEM.md §6.6): request/output/total-token throughput
and mean/median/std/p50/p90/p99 of TTFT, TPOT, ITL and E2E latency, as a table and as JSON. It streams
`/v1/completions` with random token-id prompts of a fixed length (from the server's vocabulary), so input and
output lengths (`--input-len`, `--max-new-tokens`) are exact with `--ignore-eos`. Loopback only unless
`--allow-remote`; the number of requests and the total time are capped.

The client is aiohttp, as in vLLM's benchmark: on the one machine that also runs the server, each streamed event
costs the load generator CPU time the server then lacks, and httpx's asyncio stack took 4-5x aiohttp's per event
(one event every 2 ms: 170-300 against 36-74 us). Events are only timestamped as they arrive and parsed when the
request ends, for the same reason.

`--turns N` replays multi-turn conversations as an agent sends them: each of `--num-prompts` conversations
starts with `--input-len` tokens, and every next turn re-sends the whole history (earlier prompts and the
model's answers, as exact token ids) plus `--turn-len` new tokens. It reports TTFT per turn and the prefix-cache
hit rate (the share of prompt tokens the server reports as `cached_tokens`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ernie45.commands import add_max_new_tokens_arg, add_out_arg
from ernie45.errors import ErnieError

MAX_PROMPTS = 100_000
MAX_CONCURRENCY = 1024
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first streamed token
    itl: list[float] = field(default_factory=list)  # gaps between consecutive token events
    latency: float = 0.0
    status: int = 0
    error: str = ""
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    output_ids: list[int] = field(default_factory=list)  # with return_tokens_as_token_ids
    turn: int = 0


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _one(session, url: str, payload: dict[str, Any], timeout: float) -> RequestResult:
    """Send one streaming completion and time every token event (parsed once the stream has ended)."""
    res = RequestResult(prompt_tokens=len(payload["prompt"]) if isinstance(payload["prompt"], list) else 0)
    start = time.perf_counter()
    events: list[tuple[float, bytes]] = []  # (arrival, the event's JSON)

    async def stream() -> None:
        async with session.post(url, json=payload) as resp:
            res.status = resp.status
            if resp.status != 200:
                body = (await resp.read()).decode("utf-8", "replace")
                try:
                    res.error = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    res.error = body[:200]
                return
            async for line in resp.content:  # one SSE line at a time
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                events.append((time.perf_counter(), data))
        res.latency = time.perf_counter() - start
        res.ok = _read_events(res, events, start)

    try:
        await asyncio.wait_for(stream(), timeout)
    except asyncio.TimeoutError:
        res.error = f"no complete response within {timeout:g} s"
    except Exception as e:  # a refused connection, a reset, malformed SSE: recorded, the run goes on
        res.error = f"{type(e).__name__}: {e}"
    return res


def _read_events(res: RequestResult, events: list[tuple[float, bytes]], start: float) -> bool:
    """Fill `res` from a stream's events: token timings, usage, token ids; False at an error event."""
    last = start
    for now, data in events:
        obj = json.loads(data)
        if "error" in obj:
            res.error = str(obj["error"].get("message", obj["error"]))
            return False
        if obj.get("usage"):
            res.prompt_tokens = obj["usage"]["prompt_tokens"]
            res.output_tokens = obj["usage"]["completion_tokens"]
            res.cached_tokens = (obj["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        if obj.get("choices"):  # one event per token (its text may be empty), as vLLM's bench counts
            lp = obj["choices"][0].get("logprobs") or {}
            res.output_ids += [int(t.removeprefix("token_id:")) for t in lp.get("tokens") or []]
            if res.ttft == 0.0:
                res.ttft = now - start
            else:
                res.itl.append(now - last)
            last = now
    return True


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    v = np.asarray(values_s, dtype=np.float64) * 1000.0 if values_s else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(v.mean()),
        f"median_{name}_ms": float(np.median(v)),
        f"std_{name}_ms": float(v.std()),
    }
    out.update({f"p{p}_{name}_ms": float(np.percentile(v, p)) for p in PERCENTILES})
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM `bench serve` metrics from per-request results."""
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    summary.update(_stats("ttft", [r.ttft for r in ok]))
    summary.update(_stats("tpot", tpots))
    summary.update(_stats("itl", [x for r in ok for x in r.itl]))
    summary.update(_stats("e2el", [r.latency for r in ok]))
    prompt_total = sum(r.prompt_tokens for r in ok)
    summary["prefix_cache_hit_rate"] = (
        sum(r.cached_tokens for r in ok) / prompt_total if prompt_total else 0.0
    )
    turns = sorted({r.turn for r in ok})
    if len(turns) > 1:
        summary["ttft_by_turn"] = {
            str(t + 1): _stats("ttft", [r.ttft for r in ok if r.turn == t]) for t in turns
        }
    summary["status_counts"] = {str(k): v for k, v in sorted(Counter(r.status for r in results).items())}
    summary["errors"] = dict(Counter(r.error for r in results if r.error).most_common(10))
    return summary


async def run_load(
    base_url: str,
    num_prompts: int,
    max_concurrency: int,
    request_rate: float = math.inf,
    input_len: int = 128,
    output_len: int = 128,
    ignore_eos: bool = False,
    seed: int = 0,
    api_key: str | None = None,
    timeout: float = 300.0,
    max_duration: float = 1800.0,
    allow_remote: bool = False,
    turns: int = 1,
    turn_len: int = 32,
) -> dict[str, Any]:
    """Send `num_prompts` streaming completions, at most `max_concurrency` at once, arriving as a Poisson
    process of `request_rate` per second (all at once when infinite); returns the summary dict.

    With `turns` > 1, `num_prompts` conversations of `turns` requests each: turn k re-sends turn k-1's prompt
    and answer plus `turn_len` new tokens (at most `max_concurrency` conversations at once)."""
    import aiohttp

    if not 1 <= num_prompts <= MAX_PROMPTS:
        raise ErnieError(f"--num-prompts must be between 1 and {MAX_PROMPTS}")
    if not 1 <= max_concurrency <= MAX_CONCURRENCY:
        raise ErnieError(f"--max-concurrency must be between 1 and {MAX_CONCURRENCY}")
    if input_len < 1 or output_len < 1 or request_rate <= 0 or timeout <= 0 or max_duration <= 0:
        raise ErnieError(
            "--input-len, --max-new-tokens, --request-rate, --timeout and --max-duration must be > 0"
        )
    if not 1 <= turns <= 1000 or turn_len < 1:
        raise ErnieError("--turns must be between 1 and 1000 and --turn-len > 0")
    if not allow_remote and not _is_loopback(base_url):
        raise ErnieError(
            f"{base_url} is not a loopback address; pass --allow-remote to load-test another host"
        )
    base = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(limit=max_concurrency),
        read_bufsize=1 << 20,  # an event with many logprobs is one long line
    ) as client:
        try:
            async with client.get(f"{base}/v1/models", raise_for_status=True) as r:
                model = (await r.json())["data"][0]["id"]
            async with client.get(f"{base}/tokenizer_info") as r:
                vocab = int((await r.json()).get("vocab_size", 0)) if r.status == 200 else 0
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as e:
            raise ErnieError(f"cannot query the server at {base}: {e or type(e).__name__}") from None
        rng = random.Random(seed)
        # Random ids above the special tokens; without a vocabulary size, a plain-text prompt of ~input_len tokens.
        prompts: list[Any] = (
            [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(num_prompts)]
            if vocab > 100
            else [" ".join(["hello"] * input_len)] * num_prompts
        )
        sem = asyncio.Semaphore(max_concurrency)

        async def request(prompt, turn: int = 0) -> RequestResult:
            payload = {
                "model": model,
                "prompt": prompt,
                "max_tokens": output_len,
                "temperature": 0.0,
                "ignore_eos": ignore_eos,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if turns > 1:  # the answer's exact ids go into the next turn's history
                payload.update(logprobs=0, return_tokens_as_token_ids=True)
            res = await _one(client, f"{base}/v1/completions", payload, timeout)
            res.turn = turn
            return res

        async def limited(prompt) -> RequestResult:
            async with sem:
                return await request(prompt)

        async def conversation(prompt) -> list[RequestResult]:
            out: list[RequestResult] = []
            async with sem:
                for turn in range(turns):
                    if turn:
                        if not isinstance(prompt, list) or not out[-1].ok:
                            break
                        prompt = (
                            prompt + out[-1].output_ids + [rng.randrange(100, vocab) for _ in range(turn_len)]
                        )
                    out.append(await request(prompt, turn))
            return out

        tasks: list[asyncio.Task] = []

        async def drive() -> None:
            for p in prompts:
                tasks.append(asyncio.create_task(conversation(p) if turns > 1 else limited(p)))
                if math.isfinite(request_rate):
                    await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)

        start = time.perf_counter()
        try:
            await asyncio.wait_for(drive(), max_duration)
        except asyncio.TimeoutError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - start
    stopped = RequestResult(error="stopped: --max-duration")
    results: list[RequestResult] = []
    for t in tasks:
        r = t.result() if t.done() and not t.cancelled() else [stopped] * turns
        results += r if isinstance(r, list) else [r]
    results += [stopped] * ((num_prompts - len(tasks)) * turns)
    summary = summarize(results, duration)
    summary.update(
        {
            "backend": "openai-completions",
            "base_url": base,
            "model": model,
            "num_prompts": num_prompts,
            "max_concurrency": max_concurrency,
            "request_rate": "inf" if math.isinf(request_rate) else request_rate,
            "input_len": input_len,
            "output_len": output_len,
            "ignore_eos": ignore_eos,
            "turns": turns,
            "turn_len": turn_len if turns > 1 else 0,
        }
    )
    return summary


def format_table(s: dict[str, Any]) -> str:
    """The summary as a text table in the layout of vLLM's `bench serve` report."""
    rows = [
        ("Successful requests:", s["completed"]),
        ("Failed requests:", s["failed"]),
        ("Maximum request concurrency:", s["max_concurrency"]),
        ("Benchmark duration (s):", f"{s['duration']:.2f}"),
        ("Total input tokens:", s["total_input_tokens"]),
        ("Total generated tokens:", s["total_output_tokens"]),
        ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}"),
    ]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k:<40}{v:<10}" for k, v in rows]
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        for stat in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES)):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<40}{s[f'{stat}_{name}_ms']:<10.2f}")
    lines.append(f"{'Prefix cache hit rate:':<40}{s['prefix_cache_hit_rate']:<10.1%}")
    for turn, st in (s.get("ttft_by_turn") or {}).items():
        lines.append(
            f"{f'Turn {turn} TTFT mean / median (ms):':<40}{st['mean_ttft_ms']:.2f} / {st['median_ttft_ms']:.2f}"
        )
    lines.append("=" * 50)
    if s["errors"]:
        lines.append("errors: " + "; ".join(f"{n} x {msg}" for msg, n in s["errors"].items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 loadtest",
        description="Concurrent streaming load test against an "
        "OpenAI-compatible server (vLLM `bench serve` metrics).",
    )
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server address (default: %(default)s)"
    )
    p.add_argument("--num-prompts", type=int, default=64, help="requests to send (default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrival rate in requests/s (default: inf, all at once)",
    )
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    add_max_new_tokens_arg(p, 128, "max_tokens per request (default: %(default)s)", old=("--output-len",))
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument(
        "--turns",
        type=int,
        default=1,
        help="turns per conversation: each turn re-sends the history plus --turn-len new tokens "
        "(--num-prompts conversations; default: 1, independent requests)",
    )
    p.add_argument("--turn-len", type=int, default=32, help="new prompt tokens per later turn (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    p.add_argument(
        "--api-key", default=os.environ.get("ERNIE45_API_KEY"), help="bearer key, if the server wants one"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-duration", type=float, default=1800.0, help="seconds for the whole run")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --base-url")
    add_out_arg(p, "write the metrics as JSON here", metavar="FILE", required=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = asyncio.run(
        run_load(
            args.base_url,
            args.num_prompts,
            args.max_concurrency,
            args.request_rate,
            args.input_len,
            args.max_new_tokens,
            args.ignore_eos,
            args.seed,
            args.api_key,
            args.timeout,
            args.max_duration,
            args.allow_remote,
            args.turns,
            args.turn_len,
        )
    )
    print(format_table(summary))
    if args.out:
        from ernie45.utils import atomic_write_text

        atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    return 0 if summary["failed"] == 0 else 1
