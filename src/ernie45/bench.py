"""`ernie45 bench`: prefill / batch-1 decode throughput, time to first token and peak RSS, side by side.

The same random-weight checkpoint runs through ernie45 and each installed peer (transformers `generate`,
llama.cpp via llama-cpp-python on a GGUF exported by ernie45). Every configuration runs in its own process
(so peak RSS and allocator state do not leak between rows); each row reports the median of several runs and
its ratio to the memory-bandwidth floor, which the bench measures on the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from ernie45.errors import ErnieError

SHAPES: dict[str, dict[str, Any]] = {
    "0.3b": dict(model_type="ernie4_5"),
    # a scaled MoE: first layer dense, 64 experts top-6 of width 512, 2 shared experts
    "moe": dict(model_type="ernie4_5_moe", hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, head_dim=128, moe_num_experts=64, moe_k=6,
                moe_intermediate_size=512, moe_num_shared_experts=2, moe_layer_start_index=1,
                moe_layer_end_index=7, tie_word_embeddings=True),
    "tiny": dict(model_type="ernie4_5", vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}
ENGINES = ("ernie45", "transformers", "llama.cpp")
DTYPES = ("fp32", "bf16", "wint8", "wint4")
_BYTES = {"fp32": 4.0, "bf16": 2.0, "wint8": 1.0, "wint4": 0.5}
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "wint8": "bfloat16", "wint4": "bfloat16"}
_GGUF_TYPE = {"fp32": "f32", "bf16": "f16", "wint8": "q8_0", "wint4": "q4_0"}


# ---- measurements -----------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def measure_bandwidth_gbs(threads: int) -> float:
    """Best sustained read bandwidth: the fastest of MKL's fp32 GEMV, oneDNN's pre-packed fp32 GEMV and ernie45's
    C bf16 GEMV (on huge pages), each streaming a 480 MB set of 3072x1024 matrices (out of cache) per pass."""
    import torch

    torch.set_num_threads(threads)
    ws = [torch.randn(3072, 1024) for _ in range(40)]
    x = torch.randn(1, 1024)
    kernels = [lambda w: torch.mv(w, x[0])]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws}
        kernels.append(lambda w: torch.ops.mkldnn._linear_pointwise(x, packed[id(w)], None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        for _ in range(3):
            t = time.perf_counter()
            for w in ws:
                kernel(w)
            best = min(best, time.perf_counter() - t)
    gbs = sum(w.numel() for w in ws) * 4 / best / 1e9
    return max(gbs, _native_bandwidth_gbs(threads, len(ws) * 2))


def _native_bandwidth_gbs(threads: int, n: int) -> float:
    import ctypes

    import torch

    from ernie45 import native
    from ernie45.fast import W_BF16, _Linear, _Model, hugepage_buffer

    lib = native.load("decode")
    per = 3072 * 1024 * 2
    arena = hugepage_buffer(per * n) if lib is not None else None
    if arena is None:
        return 0.0
    arena.random_(0, 127)  # small positive bf16 bit patterns: finite values
    m = _Model(hidden=1024, n_layers=0, n_heads=1, n_kv=1, head_dim=1024, vocab=1, n_threads=threads,
               max_width=3072, max_experts=1)
    layers = [_Linear(kind=W_BF16, out=3072, in_=1024, w=arena[i * per:].data_ptr()) for i in range(n)]
    x, y = torch.randn(1024), torch.empty(3072)
    lib.ernie_gemv.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Linear), ctypes.c_void_p, ctypes.c_void_p]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for L in layers:
            lib.ernie_gemv(ctypes.byref(m), ctypes.byref(L), x.data_ptr(), y.data_ptr())
        best = min(best, time.perf_counter() - t)
    lib.ernie_release(ctypes.byref(m))
    return per * n / best / 1e9


def decode_bytes_per_token(cfg, dtype: str) -> float:
    """Weight bytes read per decode token: every projection once (only the K routed + shared experts of a MoE
    layer), the lm_head, one embedding row. The bench quantizes lm_head too in wint8/wint4, as llama.cpp's
    q8_0/q4_0 files do (its tied token embedding doubles as the output matrix)."""
    H, d = cfg.hidden_size, cfg.head_dim
    attn = H * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    n, router = 0, 0.0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            mlp = 3 * H * cfg.moe_intermediate_size * (cfg.moe_k + cfg.moe_num_shared_experts)
            router += H * cfg.moe_num_experts * 4.0  # the router stays fp32
        else:
            mlp = 3 * H * cfg.intermediate_size
        n += attn + mlp
    head_bytes = cfg.vocab_size * H * _BYTES[dtype]
    return n * _BYTES[dtype] + head_bytes + router


# ---- one configuration per process ---------------------------------------------------------------------
class _Clock:
    """A streamer (HF protocol: put() with the prompt, then once per new token) that records timestamps."""

    def __init__(self, stamps: list[float]):
        self.stamps = stamps

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _prompt(vocab: int, n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run_ernie45(ckpt: str, dtype: str, prompt_len: int, gen_len: int, runs: int) -> dict[str, Any]:
    import torch

    from ernie45.checkpoint import load_checkpoint
    from ernie45.generation import generate

    model = load_checkpoint(ckpt, dtype=_TORCH_DTYPE[dtype], device="cpu")
    if dtype in ("wint8", "wint4"):
        from ernie45.quant import quantize_model

        quantize_model(model, dtype, progress=False, quantize_lm_head=True)  # like q8_0 / q4_0 GGUF files
    from ernie45.fast import optimize_for_inference

    optimize_for_inference(model)
    ids = torch.tensor([_prompt(model.config.vocab_size, prompt_len)])
    prefill, ttft, decode = [], [], []
    for _ in range(runs + 1):  # the first run warms up
        with torch.inference_mode():
            cache = model.new_cache(1, prompt_len + 1)
            t = time.perf_counter()
            model(ids, cache=cache, logits_to_keep=1)
            prefill.append(prompt_len / (time.perf_counter() - t))
        stamps: list[float] = []
        t0 = time.perf_counter()
        out = generate(model, ids, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False,
                       streamer=_Clock(stamps))
        end = time.perf_counter()
        assert out.shape[1] == prompt_len + gen_len
        # put() is called with the prompt first, then once per new token (HF streamer protocol)
        first = stamps[1] if len(stamps) > 1 else end
        ttft.append(first - t0)
        decode.append((gen_len - 1) / (end - first))
    return dict(prefill_tok_s=statistics.median(prefill[1:]), ttft_s=statistics.median(ttft[1:]),
                decode_tok_s=statistics.median(decode[1:]))


def run_transformers(ckpt: str, dtype: str, prompt_len: int, gen_len: int, runs: int) -> dict[str, Any]:
    import torch
    import transformers

    if dtype not in ("fp32", "bf16"):
        raise ErnieError("transformers runs fp32 and bf16 only in this bench")
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, _TORCH_DTYPE[dtype]))
    model.eval()
    ids = torch.tensor([_prompt(model.config.vocab_size, prompt_len)])
    prefill, ttft, decode = [], [], []
    for _ in range(runs + 1):
        with torch.inference_mode():
            t = time.perf_counter()
            model(ids, logits_to_keep=1)
            prefill.append(prompt_len / (time.perf_counter() - t))
        stamps: list[float] = []
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
                       do_sample=False, streamer=_Clock(stamps), pad_token_id=0)
        end = time.perf_counter()
        first = stamps[1] if len(stamps) > 1 else end
        ttft.append(first - t0)
        decode.append((gen_len - 1) / (end - first))
    return dict(prefill_tok_s=statistics.median(prefill[1:]), ttft_s=statistics.median(ttft[1:]),
                decode_tok_s=statistics.median(decode[1:]))


def run_llama_cpp(ckpt: str, dtype: str, prompt_len: int, gen_len: int, runs: int, threads: int) -> dict[str, Any]:
    import llama_cpp  # noqa: F401  (optional peer)

    from ernie45.config import ErnieConfig

    gguf = os.path.join(ckpt, f"bench-{_GGUF_TYPE[dtype]}.gguf")
    if not os.path.exists(gguf):
        from ernie45.convert.gguf_export import main as export_main

        export_main([ckpt, gguf, "--outtype", _GGUF_TYPE[dtype], "--quiet"])
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=prompt_len + gen_len + 8, n_threads=threads, n_batch=512,
                          verbose=False)
    vocab = ErnieConfig.from_pretrained(ckpt).vocab_size
    ids = _prompt(vocab, prompt_len)
    prefill, ttft, decode = [], [], []
    for _ in range(runs + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill.append(prompt_len / (time.perf_counter() - t))
        ttft.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(gen_len - 1):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
        decode.append((gen_len - 1) / (time.perf_counter() - t))
    return dict(prefill_tok_s=statistics.median(prefill[1:]), ttft_s=statistics.median(ttft[1:]),
                decode_tok_s=statistics.median(decode[1:]))


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    fn = {"ernie45": run_ernie45, "transformers": run_transformers}.get(spec["engine"])
    args = (spec["ckpt"], spec["dtype"], spec["prompt_len"], spec["gen_len"], spec["runs"])
    res = run_llama_cpp(*args, spec["threads"]) if spec["engine"] == "llama.cpp" else fn(*args)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


# ---- orchestration ---------------------------------------------------------------------------------
def make_checkpoint(shape: str, directory: str) -> str:
    """Write (once) a random-weight fp32 checkpoint of `shape`, with a tiny tokenizer for tools that want one."""
    import torch

    from ernie45.checkpoint import build_model, save_checkpoint
    from ernie45.config import ErnieConfig

    path = os.path.join(directory, f"ernie45-bench-{shape}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from ernie45.models import bundled_path
    from ernie45.tokenizer import Tokenizer

    model = build_model(ErnieConfig(**SHAPES[shape]), torch.float32)
    model.init_weights(seed=0)
    # the bundled tokenizer rides along so GGUF export (llama.cpp) has a vocabulary to embed
    save_checkpoint(model, path, max_shard_size="20GB", tokenizer=Tokenizer.from_pretrained(bundled_path()))
    return path


def bench(shapes: list[str], dtypes: list[str], engines: list[str], prompt_len: int = 512, gen_len: int = 128,
          runs: int = 3, threads: int | None = None, workdir: str | None = None,
          rounds: int = 1) -> list[dict[str, Any]]:
    """Run every (shape, dtype, engine) in its own process and return the result rows.

    With `rounds` > 1 the engines of a (shape, dtype) take turns, round after round, and each row reports the
    median over rounds: on a shared machine whose memory bandwidth drifts over minutes, interleaving keeps the
    comparison side by side.
    """
    from ernie45.config import ErnieConfig

    threads = threads or os.cpu_count() or 1
    workdir = workdir or os.path.join(tempfile.gettempdir(), "ernie45-bench")
    os.makedirs(workdir, exist_ok=True)
    bw = measure_bandwidth_gbs(threads)
    rows = []
    for shape in shapes:
        ckpt = make_checkpoint(shape, workdir)
        cfg = ErnieConfig(**SHAPES[shape])
        for dtype in dtypes:
            floor = bw * 1e9 / decode_bytes_per_token(cfg, dtype)
            results: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
            skipped: dict[str, str] = {}
            for rnd in range(rounds):
                for engine in engines:
                    if engine in skipped:
                        continue
                    spec = dict(engine=engine, ckpt=ckpt, dtype=dtype, prompt_len=prompt_len, gen_len=gen_len,
                                runs=runs, threads=threads)
                    r = subprocess.run([sys.executable, "-m", "ernie45.bench", "--worker", json.dumps(spec)],
                                       capture_output=True, text=True)
                    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
                    row = dict(engine=engine, shape=shape, dtype=dtype, floor_decode_tok_s=floor, bandwidth_gbs=bw)
                    if r.returncode == 0 and last.startswith("{"):
                        row.update(json.loads(last))
                        results[engine].append(row)
                    else:
                        skipped[engine] = (r.stderr.strip().splitlines() or ["failed"])[-1][:200]
                        row["skipped"] = skipped[engine]
                    tag = f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""
                    print(_fmt_row(row) + tag, file=sys.stderr, flush=True)
            for engine in engines:
                got = results[engine]
                if engine in skipped and not got:
                    rows.append(dict(engine=engine, shape=shape, dtype=dtype, floor_decode_tok_s=floor,
                                     bandwidth_gbs=bw, skipped=skipped[engine]))
                    continue
                row = dict(got[0], rounds=len(got))
                for key in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
                    row[key] = statistics.median(g[key] for g in got)
                row["peak_rss_mb"] = max(g["peak_rss_mb"] for g in got)
                rows.append(row)
    return rows


def _fmt_row(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"{r['shape']:>5} {r['dtype']:>5} {r['engine']:>12}  skipped: {r['skipped']}"
    return (f"{r['shape']:>5} {r['dtype']:>5} {r['engine']:>12}  prefill {r['prefill_tok_s']:8.1f} tok/s  "
            f"decode {r['decode_tok_s']:6.1f} tok/s ({r['decode_tok_s'] / r['floor_decode_tok_s']:.0%} of floor)  "
            f"TTFT {r['ttft_s'] * 1e3:7.1f} ms  RSS {r['peak_rss_mb']:6.0f} MB")


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Machine: {meta['machine']}; {meta['threads']} threads; torch {meta['torch']}; measured read bandwidth "
             f"{meta['bandwidth_gbs']:.1f} GB/s; prompt {meta['prompt_len']} tokens, {meta['gen_len']} generated, "
             f"median of {meta['runs']} runs" + (f" in each of {meta['rounds']} interleaved rounds (median over rounds)"
                                                if meta.get("rounds", 1) > 1 else "") + f", {meta['date']}.", "",
             "| shape | dtype | engine | prefill tok/s | decode tok/s | vs ernie45 | % of floor | TTFT ms | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    ours = {(r["shape"], r["dtype"]): r for r in rows if r["engine"] == "ernie45" and "skipped" not in r}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['engine']} | — | — | — | — | — | skipped: "
                         f"{r['skipped'][:60]} |")
            continue
        o = ours.get((r["shape"], r["dtype"]))
        ratio = f"{o['decode_tok_s'] / r['decode_tok_s']:.2f}×" if o and r["engine"] != "ernie45" else "—"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['engine']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {ratio} | {r['decode_tok_s'] / r['floor_decode_tok_s']:.0%} | "
                     f"{r['ttft_s'] * 1e3:.0f} | {r['peak_rss_mb']:.0f} |")
    lines.append("")
    lines.append("`vs ernie45` is ernie45's decode tokens/s divided by the peer's (> 1 means ernie45 is faster).")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    """CPU model and the vector extensions that decide the kernels, e.g. "AMD EPYC (avx512f, avx512_bf16)"."""
    from ernie45.device import cpu_info

    info = cpu_info()
    have = set(info.get("flags", "").split())
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in have] or (
        ["avx2"] if "avx2" in have else [])
    name = info.get("model name") or platform.processor() or platform.machine()
    return name + (f" ({', '.join(isa)})" if isa else "")


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ErnieError(f"unknown {what} {', '.join(bad) or value!r}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ernie45 bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="0.3b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--dtype", default="fp32,bf16", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--vs", default="transformers", help="peers: comma list of transformers, llama.cpp, or none")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="measured runs per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per configuration, the engines taking turns; rows report the median")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--json", dest="json_out", default=None, help="write the result rows as JSON here")
    p.add_argument("--out", default=None, help="write a Markdown table here (e.g. bench/results.md)")
    p.add_argument("--workdir", default=None, help="where the random checkpoints are cached")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(json.loads(a.worker))))
        return 0
    shapes = _csv(a.shape, tuple(SHAPES), "shape")
    dtypes = _csv(a.dtype, DTYPES, "dtype")
    peers = [] if a.vs == "none" else _csv(a.vs, ENGINES[1:], "peer")
    if a.prompt_len < 1 or a.gen_len < 2 or a.runs < 1 or a.rounds < 1:
        raise ErnieError("--prompt-len must be >= 1, --gen-len >= 2, --runs >= 1 and --rounds >= 1")
    import torch

    rows = bench(shapes, dtypes, ["ernie45", *peers], a.prompt_len, a.gen_len, a.runs, a.threads, a.workdir,
                 a.rounds)
    meta = dict(machine=f"{_cpu_name()}, {os.cpu_count()} cores", torch=torch.__version__,
                threads=a.threads or os.cpu_count(), bandwidth_gbs=rows[0]["bandwidth_gbs"] if rows else 0.0,
                prompt_len=a.prompt_len, gen_len=a.gen_len, runs=a.runs, rounds=a.rounds,
                date=time.strftime("%Y-%m-%d"))
    from ernie45.utils import atomic_write_text

    if a.json_out:
        atomic_write_text(a.json_out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = to_markdown(rows, meta)
    if a.out:
        atomic_write_text(a.out, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
