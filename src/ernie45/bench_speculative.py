"""`ernie45 bench --speculative mtp,ngram`: what speculative decoding buys at batch 1, measured as its two factors.

Speedup = (1 + accepted drafts per pass) / (cost of a pass relative to a plain step). The two factors are real in
different places, so each is measured where it is:
- cost: on the bench shapes (0.3b, moe, a3b; random weights, `optimize_for_inference`), the time to score the
  current token plus k drafts in one pass (the C step's rows of one sequence, else the PyTorch forward) against one
  plain decode step, at a `--prompt-len` context; for mtp plus k runs of the MTP layer (one decoder layer and
  lm_head, one C call: `ernie45.fast.MTPStep`) per pass; `--layers 28` times the whole ERNIE-4.5-21B-A3B (a3b);
- acceptance: on the bundled models (too small to be bandwidth-bound, but trained on real text): greedy decoding of
  held-out poem prompts, mtp on ernie-tiny-moe (its MTP head) and ngram on ernie-tiny with a repeat-this-text
  prompt, as accepted drafts per pass; the same drafts through the serving engine too (`ernie45 serve
  --speculative`, where the MTP layer is fed by the engine's own model calls).
The projected speedup combines them; the measured one is decode tokens/s with and without speculation on the same
rows (bundled models for acceptance, bench shapes for ngram, whose random weights repeat themselves).
`--draft-vocab-size` adds mtp rows whose draft scores only that many tokens: on the bench shapes the MTP layer over
the first N rows of the head (the cost does not depend on which), on the bundled model the same fraction of its
own vocabulary, chosen by `ernie45.mtp.draft_ids`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from ernie45.bench_checkpoints import shape_label
from ernie45.errors import ErnieError

# held-out lines (not in the bundled models' training poems) and a repeat-this-text prompt for prompt lookup
HELD_OUT = [
    "秋风吹渭水，落叶满长安。",
    "海上生明月，天涯共此时。",
    "野旷天低树，江清月近人。",
    "大漠孤烟直，长河落日圆。",
]
ERNIE_VOCAB = 103424  # the released models' vocabulary: draft vocabulary sizes are fractions of it
REPEAT = "请照抄下面的诗：\n海上生明月，天涯共此时。情人怨遥夜，竟夕起相思。\n照抄：\n海上生明月，"


def _interleaved_medians(fns: dict, n: int) -> dict[str, float]:
    """Median seconds of each function over n rounds, the functions taking turns in every round (so drift of a
    shared machine's bandwidth hits them alike); one warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


DTYPES = ("fp32", "bf16", "wint8", "wint4")


def _bench_model(shape: str, dtype: str, workdir: str, layers: int | None = None):
    """The bench shape's model as `ernie45 bench` runs it: the float checkpoint in fp32 / bf16, or the one
    `quantized_checkpoint` writes for wint8 / wint4 (head and embedding quantized) in the dtype loading picks --
    read from the work directory without its float source where that was deleted (the whole 21B-A3B: 44 GB)."""
    import torch

    from ernie45.bench import _TORCH_DTYPE
    from ernie45.bench_checkpoints import (
        checkpoint_name,
        make_checkpoint,
        quantized_checkpoint,
        quantized_path,
    )
    from ernie45.checkpoint import load_checkpoint

    if dtype not in _TORCH_DTYPE:
        done = quantized_path(os.path.join(workdir, checkpoint_name(shape, layers)), dtype)
        if os.path.isfile(os.path.join(done, "config.json")):
            return load_checkpoint(done, device="cpu")
    ckpt = make_checkpoint(shape, workdir, layers)
    if dtype in _TORCH_DTYPE:
        return load_checkpoint(ckpt, dtype=getattr(torch, _TORCH_DTYPE[dtype]), device="cpu")
    return load_checkpoint(quantized_checkpoint(ckpt, dtype), device="cpu")



def attach_random_mtp(model) -> None:
    """A random MTP layer (its cost, not its guesses), quantized as `ernie45 quantize` quantizes a checkpoint's
    layer when the model is quantized."""
    from ernie45.mtp import MTP_PREFIX, attach_mtp
    from ernie45.quant import _swap, quantizable_linears, quantize_linear

    model.config.extra["num_nextn_predict_layers"] = 1
    attach_mtp(model)
    qc = model.config.quantization_config
    if not qc:
        return
    for name, lin in quantizable_linears(model, qc.get("modules_to_not_convert", ()), qc["mode"]).items():
        if name.startswith(MTP_PREFIX):
            _swap(model, name, quantize_linear(lin, qc["mode"], model.dtype, group_size=qc.get("group_size") or 128)[0])


def cost_rows(shape: str, dtype: str, ks: list[int], prompt_len: int, steps: int, workdir: str,
              vocabs: list[int | None] = (None,), layers: int | None = None) -> list[dict]:
    """Seconds of a plain step and of a (k + 1)-position pass on a bench shape, and of one MTP-layer run per draft
    vocabulary size (None: the full head)."""
    import torch

    from ernie45.fast import optimize_for_inference
    from ernie45.generation.speculative import score
    from ernie45.mtp import MTPHead

    model = _bench_model(shape, dtype, workdir, layers)
    optimize_for_inference(model)
    path = "C" if getattr(model, "fast_decoder", None) is not None else "PyTorch"
    V, K = model.config.vocab_size, max(ks)
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, prompt_len + K + 2)
    attach_random_mtp(model)
    heads = {v: MTPHead(model, None if v is None else torch.arange(min(v, V))) for v in vocabs}
    mcache = heads[vocabs[0]].new_cache(prompt_len + 2)
    hidden = torch.randn(1, 1, model.config.hidden_size, dtype=model.dtype)
    with torch.inference_mode():
        model(torch.randint(0, V, (1, prompt_len), generator=g), cache=cache)
        toks = torch.randint(0, V, (K + 1,), generator=g).tolist()
        tok = torch.tensor([[toks[0]]])

        def run(n, need_hidden=False):  # need_hidden: mtp's pass, which also returns the rows' hidden states
            cache.length = prompt_len
            score(model, toks[:n], cache, need_hidden=need_hidden)

        def draft(head):
            mcache.length = prompt_len
            head(tok, hidden, mcache)

        fns = {"step": lambda: run(1)}
        for v, head in heads.items():
            fns[f"d{v}"] = lambda head=head: draft(head)
        for k in ks:
            fns[f"c{k}"] = lambda k=k: run(k + 1)
            fns[f"t{k}"] = lambda k=k: run(k + 1, True)
        med = _interleaved_medians(fns, steps)
    step = med["step"]
    verify = {k: med[f"c{k}"] for k in ks}
    verify_hidden = {k: med[f"t{k}"] for k in ks}
    return [dict(kind="cost", shape=shape_label(shape, layers), dtype=dtype, path=path, k=k, draft_vocab=_label(v), vocab=V,
                 step_ms=step * 1e3, verify_ms=verify[k] * 1e3, verify_hidden_ms=verify_hidden[k] * 1e3,
                 draft_ms=med[f"d{v}"] * 1e3, verify_cost=verify[k] / step,
                 mtp_cost=(verify_hidden[k] + k * med[f"d{v}"]) / step) for k in ks for v in vocabs]


def _label(v: int | None) -> str:
    return "all" if v is None else str(v)


def _decode_rate(model, ids, gen_len: int, spec, tokenizer=None) -> tuple[float, Any]:
    """Decode tokens/s of one greedy run (after the first token) and its token ids."""
    from ernie45.generation import generate_step

    stamps, out = [], []
    for step in generate_step(model, ids, max_new_tokens=gen_len, do_sample=False, eos_token_id=[],
                              repetition_penalty=1.0, speculative=spec, tokenizer=tokenizer):
        stamps.append(time.perf_counter())
        out.append(step.tokens[0])
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def acceptance_rows(methods: list[str], ks: list[int], gen_len: int, runs: int,
                    vocabs: list[int | None] = (None,)) -> list[dict]:
    """Accepted drafts per pass and measured speedup on the bundled models (greedy, held-out prompts); mtp once per
    draft vocabulary size, scaled to the bundled model's vocabulary (the fraction of ERNIE's 103,424 tokens)."""
    import torch

    from ernie45 import load
    from ernie45.fast import optimize_for_inference
    from ernie45.generation.speculative import Speculative
    from ernie45.mtp import draft_ids, has_mtp

    rows = []
    for method in methods:
        name = "ernie-tiny-moe" if method == "mtp" else "ernie-tiny"
        model, tok = load(name, dtype="float32", device="cpu")
        if method == "mtp" and not has_mtp(model):
            print(f"note: {name} has no MTP head here: no mtp acceptance rows", file=sys.stderr)
            continue
        optimize_for_inference(model)
        prompts = HELD_OUT if method == "mtp" else [REPEAT]
        V = model.config.vocab_size
        for k, v in [(k, v) for k in ks for v in (vocabs if method == "mtp" else [None])]:
            small = None if v is None else max(1, round(v / ERNIE_VOCAB * V))
            if small is not None:
                try:
                    draft_ids(tok, small, V)
                except ErnieError as e:
                    print(f"note: no acceptance row for a draft vocabulary of {v}: {e}", file=sys.stderr)
                    continue
            plain, fast, acc, drafted, passes = [], [], 0, 0, 0
            for _r in range(runs):
                for text in prompts:
                    ids = torch.tensor([tok.encode(text)])
                    rate0, want = _decode_rate(model, ids, gen_len, None)
                    sp = Speculative(method, k, small)
                    rate1, got = _decode_rate(model, ids, gen_len, sp, tok)
                    if got != want:
                        raise ErnieError(f"speculative {method} changed the greedy tokens of {name}")
                    plain.append(rate0)
                    fast.append(rate1)
                    acc, drafted, passes = acc + sp.accepted, drafted + sp.drafted, passes + sp.steps
            s_drafted, s_acc, s_passes = _server_counts(model, tok, method, k, small, prompts * runs, gen_len)
            rows.append(dict(kind="acceptance", method=method, model=name, k=k, draft_vocab=_label(v),
                             model_draft_vocab=small or V, accepted=acc, drafted=drafted,
                             passes=passes, per_pass=acc / max(passes, 1), rate=acc / max(drafted, 1),
                             plain_tok_s=statistics.median(plain), spec_tok_s=statistics.median(fast),
                             server_accepted=s_acc, server_drafted=s_drafted, server_passes=s_passes))
    return rows


def _server_counts(model, tok, method: str, k: int, small: int | None, prompts: list[str],
                   gen_len: int) -> tuple[int, int, int]:
    """(drafted, accepted, passes) of the serving engine (`ernie45 serve --speculative`) on `prompts`, one request
    at a time, greedy: how its drafts fare where the drafter is fed by the engine's own model calls."""
    import asyncio

    from ernie45.serve.engine import Engine
    from ernie45.serve.request import EngineArgs, SamplingParams

    ids = [tok.encode(p) for p in prompts]
    args = EngineArgs(max_num_seqs=1, max_model_len=max(map(len, ids)) + gen_len + 8, speculative=method,
                      num_speculative_tokens=k, draft_vocab_size=small)
    engine = Engine(model, tok, args)
    engine.start()

    async def go() -> None:
        for p in ids:
            async for _ in engine.submit([p], [SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)]):
                pass

    try:
        asyncio.run(go())
    finally:
        engine.shutdown(0.0)
    spec = engine._spec
    return spec.drafted, spec.accepted, spec.steps


def measured_rows(shape: str, dtype: str, ks: list[int], gen_len: int, workdir: str,
                  layers: int | None = None) -> list[dict]:
    """ngram on a bench shape: decode tokens/s with and without it (random weights repeat themselves)."""
    import torch

    from ernie45.fast import optimize_for_inference
    from ernie45.generation.speculative import Speculative

    model = _bench_model(shape, dtype, workdir, layers)
    optimize_for_inference(model)
    g = torch.Generator().manual_seed(0)
    part = torch.randint(3, model.config.vocab_size, (1, 48), generator=g)
    ids = torch.cat([part, part], 1)
    rate0, want = _decode_rate(model, ids, gen_len, None)
    rows = []
    for k in ks:
        sp = Speculative("ngram", k)
        rate1, got = _decode_rate(model, ids, gen_len, sp)
        if got != want:
            raise ErnieError(f"speculative ngram changed the greedy tokens of the {shape} shape")
        rows.append(dict(kind="measured", shape=shape_label(shape, layers), dtype=dtype, k=k,
                         per_pass=sp.accepted / max(sp.steps, 1), plain_tok_s=rate0, spec_tok_s=rate1))
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Speculative decoding at batch 1 ({meta['cpu']}, {meta['threads']} threads, {meta['date']})", "",
             f"`{meta['command']}`", "",
             "Speedup = (1 + accepted drafts per pass) / cost, cost = one pass over the current token and k drafts "
             "(mtp: plus k MTP-layer runs) relative to one plain decode step. Noisy on a shared machine.", "",
             "## Cost of a pass (bench shapes, random weights, context of "
             f"{meta['prompt_len']} tokens)", "",
             "Both methods score the k + 1 positions as rows of one C step; mtp's pass also returns the rows' last "
             "hidden states, which feed the MTP layer (one C call: its input norms and projection, one dense decoder "
             "layer and the head). It costs one decoder layer plus the lm_head (or, with a draft vocabulary, an int8 "
             "copy of that many of its rows where the head is float), so its share falls with model size; the a3b "
             "shape holds 3 of ERNIE-4.5-21B-A3B's 28 layers unless `--layers` says otherwise, so its plain step is "
             "far shorter than the real model's and the MTP share is overstated there.", "",
             "| shape | dtype | path | k | draft vocab | plain step (ms) | pass of k+1 (ms) | pass with hidden states "
             "(ms) | MTP layer (ms) | cost ngram | cost mtp |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "cost":
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['path']} | {r['k']} | {r.get('draft_vocab', 'all')} | "
                         f"{r['step_ms']:.2f} | {r['verify_ms']:.2f} | {r['verify_hidden_ms']:.2f} | "
                         f"{r['draft_ms']:.2f} | {r['verify_cost']:.2f}x | {r['mtp_cost']:.2f}x |")
    acc = [r for r in rows if r["kind"] == "acceptance"]
    costs = {(r["shape"], r["dtype"], r["k"], r.get("draft_vocab", "all")): r for r in rows if r["kind"] == "cost"}
    dtypes = meta.get("dtypes") or sorted({r["dtype"] for r in rows if r["kind"] == "cost"})
    targets = [(s, d) for s in meta["shapes"] for d in dtypes]  # a projection column per shape and dtype
    if acc:
        lines += ["", "## Acceptance (bundled models, greedy, held-out prompts) and projected speedup", "",
                  "| method | model | k | draft vocab (model's) | accepted / drafted | per pass | tiny model tok/s "
                  "plain → spec | " + " | ".join(f"projected on {s}" + (f" {d}" if len(dtypes) > 1 else "")
                                                  for s, d in targets) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(targets)]
        for r in acc:
            proj = []
            for s, d in targets:
                c = costs.get((s, d, r["k"], r.get("draft_vocab", "all")))
                cost = None if c is None else c["mtp_cost" if r["method"] == "mtp" else "verify_cost"]
                proj.append("–" if cost is None else f"{(1 + r['per_pass']) / cost:.2f}x")
            vocab = r.get("draft_vocab", "all")
            vocab = vocab if vocab == "all" else f"{vocab} ({r['model_draft_vocab']})"
            lines.append(f"| {r['method']} | {r['model']} | {r['k']} | {vocab} | {r['accepted']} / {r['drafted']} "
                         f"({r['rate']:.0%}) | {r['per_pass']:.2f} | {r['plain_tok_s']:.0f} → {r['spec_tok_s']:.0f} | "
                         + " | ".join(proj) + " |")
    served = [r for r in acc if "server_drafted" in r]
    if served:
        lines += ["", "The same drafts through the serving engine (`ernie45 serve --speculative`: the drafter fed by the "
                  "engine's own model calls, one request at a time, greedy):", "",
                  "| method | model | k | draft vocab | accepted / drafted | per pass |", "|---|---|---|---|---|---|"]
        for r in served:
            lines.append(f"| {r['method']} | {r['model']} | {r['k']} | {r.get('draft_vocab', 'all')} | "
                         f"{r['server_accepted']} / {r['server_drafted']} "
                         f"({r['server_accepted'] / max(r['server_drafted'], 1):.0%}) | "
                         f"{r['server_accepted'] / max(r['server_passes'], 1):.2f} |")
    meas = [r for r in rows if r["kind"] == "measured"]
    if meas:
        lines += ["", "## Measured: ngram on the bench shapes (repeated random prompt, greedy)", "",
                  "| shape | dtype | k | accepted per pass | projected | tok/s plain | tok/s ngram | measured |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in meas:
            c = costs.get((r["shape"], r["dtype"], r["k"], "all"))
            proj = "–" if c is None else f"{(1 + r['per_pass']) / c['verify_cost']:.2f}x"
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['k']} | {r['per_pass']:.2f} | {proj} | "
                         f"{r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['spec_tok_s'] / r['plain_tok_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from ernie45.bench import row_dtypes
    from ernie45.commands import add_max_new_tokens_arg

    p = argparse.ArgumentParser(prog="ernie45 bench speculative", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--speculative", default="mtp,ngram", help="comma list of mtp, ngram")
    p.add_argument("--num-speculative-tokens", default="1,2,3", metavar="K", help="comma list of draft counts k")
    p.add_argument("--shape", default="0.3b,moe,a3b", help="bench shapes of the cost rows ('none': no cost rows)")
    p.add_argument("--dtype", type=row_dtypes, default="bf16",
                   help="weights of the cost and measured rows, a comma list of fp32, bf16, wint8, wint4 (the "
                        "checkpoint's MTP layer quantized with the model, as `ernie45 quantize` writes it)")
    p.add_argument("--draft-vocab-size", default="all", metavar="N",
                   help="comma list of mtp draft vocabulary sizes ('all': the full head), e.g. all,32768,16384")
    p.add_argument("--layers", type=int, default=None,
                   help="depth of the a3b shape: 3 (default), 28 = the whole ERNIE-4.5-21B-A3B (wint4: a 12 GB "
                        "checkpoint, made from a 44 GB bf16 one)")
    p.add_argument("--prompt-len", type=int, default=256, help="context length at which a pass is timed")
    p.add_argument("--steps", type=int, default=20, help="timed passes per cost cell (median)")
    add_max_new_tokens_arg(p, 64, "tokens generated per acceptance / measured run", old=("--gen-len",))
    p.add_argument("--runs", type=int, default=1, help="acceptance runs over the held-out prompts")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--workdir", default=None, help="where the random checkpoints are kept")
    p.add_argument("--json", dest="json_out", default=None, help="write the rows as JSON here")
    p.add_argument("--out", default=None, help="write a Markdown table here (e.g. bench/results-speculative.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    import datetime

    import torch

    from ernie45.bench import _cpu_name, _csv, recorded_command, write_results
    from ernie45.bench_checkpoints import SHAPES
    from ernie45.generation.speculative import MAX_SPECULATIVE_TOKENS, METHODS

    args = build_parser().parse_args(argv)
    methods = _csv(args.speculative, METHODS, "speculative method")
    try:
        ks = [int(k) for k in args.num_speculative_tokens.split(",") if k.strip()]
    except ValueError:
        raise ErnieError(f"--num-speculative-tokens wants a comma list of integers, got {args.num_speculative_tokens!r}"
                         ) from None
    if not ks or not all(1 <= k <= MAX_SPECULATIVE_TOKENS for k in ks):
        raise ErnieError(f"--num-speculative-tokens: each k must be in [1, {MAX_SPECULATIVE_TOKENS}]")
    shapes = [] if args.shape == "none" else _csv(args.shape, tuple(SHAPES), "shape")
    try:
        vocabs = [None if v.strip() == "all" else int(v) for v in args.draft_vocab_size.split(",") if v.strip()]
    except ValueError:
        raise ErnieError(f"--draft-vocab-size wants a comma list of 'all' and integers, got {args.draft_vocab_size!r}"
                         ) from None
    if not vocabs or any(v is not None and v < 1 for v in vocabs):
        raise ErnieError("--draft-vocab-size: each size must be 'all' or a positive integer")
    dtypes = _csv(args.dtype, DTYPES, "dtype")
    if args.steps < 1 or args.runs < 1 or args.max_new_tokens < 4 or args.prompt_len < 1:
        raise ErnieError("--steps and --runs must be >= 1, --max-new-tokens >= 4 and --prompt-len >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or os.path.join(tempfile.gettempdir(), "ernie45-bench")
    os.makedirs(workdir, exist_ok=True)
    if args.layers is not None:
        from ernie45.bench_checkpoints import shape_config

        shape_config("a3b", args.layers)  # ErnieError for a depth out of range
    rows: list[dict] = []
    for shape in shapes:
        for dtype in dtypes:
            rows += cost_rows(shape, dtype, ks, args.prompt_len, args.steps, workdir, vocabs, args.layers)
    rows += acceptance_rows(methods, ks, args.max_new_tokens, args.runs, vocabs)
    if "ngram" in methods:
        for shape in shapes:
            for dtype in dtypes:
                rows += measured_rows(shape, dtype, ks, args.max_new_tokens, workdir, args.layers)
    meta = dict(cpu=_cpu_name(), threads=torch.get_num_threads(), date=datetime.date.today().isoformat(),
                prompt_len=args.prompt_len, shapes=[shape_label(s, args.layers) for s in shapes], dtypes=dtypes,
                command=recorded_command("speculative", sys.argv[3:] if argv is None else argv))
    write_results(rows, meta, to_markdown(rows, meta), args.json_out, args.out)
    return 0
