"""`ernie45 bench grammar`: what structured output (JSON schema, forced tool calls, regex) costs per token.

Mask rows: for each grammar and vocabulary, a walk of `--steps` tokens (a random allowed token each step) times
compiling the grammar and, per token, computing the allowed-token mask (llguidance) and applying it to a row of
fp32 logits, as the sampling path does. Vocabularies: the bundled model's 4,096 tokens, and one of ERNIE 4.5's
103,424 tokens (the bundled pieces plus generated Chinese/ASCII pieces: the released SentencePiece model is not
bundled; mask cost depends on the vocabulary's size and shape, not on which model uses it).

Decode rows: `generate`'s decode tokens/s on a bench checkpoint (`--shape`, random weights) without and with a JSON
schema, same prompt and seed, sampled, in one process, alternating; peak RSS of the process.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from ernie45.commands import add_max_new_tokens_arg
from ernie45.errors import ErnieError

ERNIE_VOCAB = 103424
PEOPLE = {  # a realistic constrained answer: a list of small records
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "minItems": 16,
    "maxItems": 16,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 40},
                                         "top_k": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["query"]}}},
]


class _SyntheticVocab:
    """The bundled tokenizer's pieces padded to `size` with generated 1-4 character Chinese/ASCII pieces."""

    def __init__(self, tokenizer: Any, size: int, seed: int = 0):
        from ernie45.generation.structured import token_bytes

        self._tok = tokenizer
        base = token_bytes(tokenizer)
        seen, rng = set(base), random.Random(seed)
        ascii_chars = [chr(c) for c in range(0x21, 0x7F)]
        words = []
        while len(base) + len(words) < size:
            n = rng.choice((1, 2, 2, 3, 4))
            if rng.random() < 0.6:
                piece = "".join(chr(rng.randrange(0x4E00, 0x9FA6)) for _ in range(min(n, 3)))
            else:
                piece = (" " if rng.random() < 0.5 else "") + "".join(rng.choice(ascii_chars) for _ in range(n))
            b = piece.encode()
            if b not in seen:
                seen.add(b)
                words.append(b)
        self.tokens = base + words
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text)


def _grammars() -> dict[str, str]:
    from ernie45.generation import structured

    return {
        "json_schema (16 records)": structured.json_schema_grammar(PEOPLE),
        "forced tool call (2 tools)": structured.tool_call_grammar(TOOLS),
        "json_object": structured.json_schema_grammar(None),
        "regex (date)": structured.regex_grammar(r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    }


def mask_rows(steps: int, seed: int = 0) -> list[dict[str, Any]]:
    import llguidance
    import torch

    from ernie45.generation.structured import Guide
    from ernie45.models import bundled_path
    from ernie45.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(bundled_path())
    eos = [tok.eos_token_id]
    vocabs = {
        f"{tok.vocab_size:,} (bundled)": llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SyntheticVocab(tok, 0)),
                                                                eos_token=eos),
        f"{ERNIE_VOCAB:,} (ERNIE 4.5 size)": llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_SyntheticVocab(tok, ERNIE_VOCAB)), eos_token=eos),
    }
    rows = []
    for vname, lltok in vocabs.items():
        width = lltok.vocab_size
        for gname, source in _grammars().items():
            rng = random.Random(seed)
            t0 = time.perf_counter()
            matcher = llguidance.LLMatcher(lltok, source, log_level=0)
            compile_ms = (time.perf_counter() - t0) * 1e3
            if matcher.is_error():
                raise ErnieError(f"{gname}: {matcher.get_error()}")
            guide, times, n = Guide(matcher), [], 0
            logits = torch.randn(width)
            while n < steps:
                t = time.perf_counter()
                banned = guide.disallowed(width)  # as the sampling path (`mask_rows_`) does it
                logits.masked_fill(banned, float("-inf"))
                times.append(time.perf_counter() - t)
                ids = (~banned).nonzero().flatten().tolist()
                choice = rng.choice(ids)
                n += 1
                if choice in eos or guide.finished:
                    matcher.reset()  # start the grammar again: keep walking
                    continue
                if not guide.accept(choice):
                    raise ErnieError(f"{gname}: the walk left the grammar: {guide.error}")
            times.sort()
            rows.append(dict(kind="mask", vocab=vname, grammar=gname, compile_ms=compile_ms,
                             mean_us=statistics.fmean(times) * 1e6, p99_us=times[int(0.99 * (len(times) - 1))] * 1e6,
                             steps=steps))
    return rows


def decode_rows(shape: str, dtype: str, gen_len: int, runs: int, workdir: str | None, seed: int = 0
                ) -> list[dict[str, Any]]:
    import os
    import tempfile

    import torch

    from ernie45.bench import _ACT, _TORCH_DTYPE, peak_rss_mb
    from ernie45.bench_checkpoints import make_checkpoint
    from ernie45.checkpoint import load_checkpoint
    from ernie45.fast import optimize_for_inference
    from ernie45.generation import stream_generate, structured
    from ernie45.tokenizer import Tokenizer

    workdir = workdir or os.path.join(tempfile.gettempdir(), "ernie45-bench")
    os.makedirs(workdir, exist_ok=True)
    ckpt = make_checkpoint(shape, workdir)
    model = load_checkpoint(ckpt, dtype=getattr(torch, _TORCH_DTYPE[dtype]), device="cpu")
    optimize_for_inference(model)
    tok = Tokenizer.from_pretrained(ckpt)
    grammar = structured.compile_grammar(tok, structured.json_schema_grammar(PEOPLE), [tok.eos_token_id])
    prompt = tok.encode("List 16 people as JSON:")
    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    tokens: dict[str, int] = {}
    for r in range(runs + 1):  # the first round warms up
        for mode in ("free", "json_schema"):
            stamps = []
            for _ in stream_generate(model, tok, prompt, max_new_tokens=gen_len, do_sample=True, seed=seed + r,
                                     grammar=grammar if mode == "json_schema" else None,
                                     min_new_tokens=gen_len if mode == "free" else None):
                stamps.append(time.perf_counter())
            if r and len(stamps) > 2:
                rates[mode].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
                tokens[mode] = len(stamps)
    act = _ACT.get(_TORCH_DTYPE[dtype], dtype)
    return [dict(kind="decode", shape=shape, dtype=act, mode=mode, decode_tok_s=statistics.median(v),
                 tokens=tokens[mode], peak_rss_mb=peak_rss_mb()) for mode, v in rates.items()]


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Structured output: cost per token ({meta['cpu']}, {meta['threads']} threads, {meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
        "## Mask per token (llguidance mask + applying it to a row of fp32 logits)",
        "",
        "| vocabulary | grammar | compile (ms) | mask mean (µs) | mask p99 (µs) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "mask":
            lines.append(f"| {r['vocab']} | {r['grammar']} | {r['compile_ms']:.1f} | {r['mean_us']:.0f} | "
                         f"{r['p99_us']:.0f} |")
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        free = next(r for r in dec if r["mode"] == "free")["decode_tok_s"]
        lines += ["", "## Decode with and without a JSON schema (`generate`, sampled)", "",
                  "| shape | dtype | mode | decode tok/s | ÷ free | tokens | peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
        for r in dec:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_tok_s'] / free:.2f} | {r['tokens']} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from ernie45.bench import row_dtypes

    p = argparse.ArgumentParser(prog="ernie45 bench grammar", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="tokens walked per grammar and vocabulary")
    p.add_argument("--shape", default="0.3b", help="bench shape of the decode rows ('none': no decode rows)")
    p.add_argument("--dtype", type=row_dtypes, default="bf16",
                   help="weights of the decode rows: fp32 or bf16 (or float32, bfloat16, auto)")
    add_max_new_tokens_arg(p, 128, "tokens generated per decode run", old=("--gen-len",))
    p.add_argument("--runs", type=int, default=3, help="measured decode runs per mode (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--workdir", default=None, help="where the random checkpoints are kept")
    p.add_argument("--json", dest="json_out", default=None, help="write the rows as JSON here")
    p.add_argument("--out", default=None, help="write a Markdown table here (e.g. bench/results-structured.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    import datetime
    import sys

    import torch

    from ernie45.bench import _cpu_name, recorded_command, write_results

    args = build_parser().parse_args(argv)
    if args.steps < 10:
        raise ErnieError(f"--steps must be at least 10, got {args.steps}")
    if args.runs < 1 or args.max_new_tokens < 8:
        raise ErnieError("--runs must be at least 1 and --max-new-tokens (--gen-len) at least 8")
    if args.dtype not in ("fp32", "bf16"):
        raise ErnieError(f"unknown dtype {args.dtype!r} for the decode rows; choose from fp32, bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = mask_rows(args.steps)
    if args.shape != "none":
        rows += decode_rows(args.shape, args.dtype, args.max_new_tokens, args.runs, args.workdir)
    meta = dict(cpu=_cpu_name(), threads=torch.get_num_threads(), date=datetime.date.today().isoformat(),
                command=recorded_command("grammar", sys.argv[3:] if argv is None else argv))
    write_results(rows, meta, to_markdown(rows, meta), args.json_out, args.out)
    return 0
