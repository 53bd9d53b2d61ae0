"""`ernie45 bench`: prefill / batch-1 decode throughput, time to first token and peak RSS, side by side.

The same random-weight checkpoint runs through ernie45 and each installed peer (transformers `generate`,
llama.cpp via llama-cpp-python on a GGUF exported by ernie45). Every configuration runs in its own process
(so peak RSS and allocator state do not leak between rows); each row reports the median of several runs and
its ratio to the memory-bandwidth floor, which the bench measures on the machine it runs on.

`--isa native,avx2` repeats every row at each x86 instruction-set level: the worker process runs with
`ERNIE45_ISA=<level>` (ernie45's C kernels) and, below native, with PyTorch's ATen / oneDNN / MKL capped at the same
level, so an AVX-512 machine also measures what an AVX2-only CPU would get. llama.cpp fixes its level when it is
compiled, so each non-native level needs its own llama-cpp-python build (`--llama-cpp avx2=DIR`).

`--shape a3b` is ERNIE-4.5-21B-A3B's layers (one dense layer, then MoE layers of 64 experts top-6 + 2 shared), with
its 103,424-token vocabulary; `--layers N` sets how many (default 3, 28 is the whole model). Its checkpoint is bf16 on
disk, like the released one, and is written tensor by tensor, so the full model can be generated on a machine with
less memory than the model. The wint8/wint4 rows of ernie45 load a checkpoint quantized once into the work
directory, as llama.cpp loads a q8_0/q4_0 GGUF (output head and token embedding quantized too, as in those files);
every row reports its load time beside its peak RSS.

`--vs gguf` adds ernie45 reading the very GGUF file llama.cpp reads (engine `gguf`: f32 / f16 / q8_0 / q4_0, held as
`ernie45.gguf_load` holds them), so both engines run one file side by side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from ernie45.bench_checkpoints import (
    FULL_LAYERS,
    SHAPES,
    export_gguf,
    gguf_path,
    make_checkpoint,
    quantized_checkpoint,
    shape_config,
    shape_label,
)
from ernie45.bench_isa import (
    _ISA_VARS,
    _isa_meaning,
    _vector_flags,
    check_isa,
    isa_env,
    normalize_isa,
    parse_llama_cpp,
)
from ernie45.commands import add_max_new_tokens_arg, dtype_name
from ernie45.errors import ErnieError

ENGINES = ("ernie45", "transformers", "llama.cpp", "gguf")  # gguf: ernie45 on llama.cpp's file
DTYPES = ("fp32", "bf16", "wint8", "wint4")
_BYTES = {"fp32": 4.0, "bf16": 2.0, "wint8": 1.0, "wint4": 0.5}
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}  # wint8/wint4: the worker's resolve_dtype("auto")
_ACT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ---- measurements -----------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM on Linux (mapped file pages included), else getrusage's."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB elsewhere


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
    from ernie45.checkpoint import hugepage_buffer
    from ernie45.native_abi import W_BF16, _Linear, _Model

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
    layer), the lm_head, one embedding row (left out: a few KB). The bench quantizes lm_head and the token embedding
    too in wint8/wint4, as llama.cpp's q8_0/q4_0 files do."""
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
    """`ckpt` is the float checkpoint for fp32/bf16 and, for wint8/wint4, the checkpoint `quantized_checkpoint`
    wrote (the output head and the token embedding quantized too, like q8_0 / q4_0 GGUF files): loading is all this
    process does."""
    import torch

    from ernie45 import native
    from ernie45.checkpoint import load_checkpoint
    from ernie45.fast import optimize_for_inference
    from ernie45.generation import generate

    if dtype in _TORCH_DTYPE:
        act = getattr(torch, _TORCH_DTYPE[dtype])
    else:  # quantized weights: activations in what `auto` picks here, at this process's ISA level
        from ernie45.device import resolve_dtype

        act = resolve_dtype("auto", torch.device("cpu"))
    native.load("decode")  # a first-ever run compiles the C kernels: an install cost, not a load cost
    t_load = time.perf_counter()
    model = load_checkpoint(ckpt, dtype=act, device="cpu")
    if (dtype in ("wint8", "wint4") and not ckpt.endswith(".gguf")
            and (model.config.quantization_config or {}).get("mode") != dtype):
        raise ErnieError(f"{ckpt} is not a {dtype} checkpoint")
    optimize_for_inference(model)
    load_s = time.perf_counter() - t_load
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
                decode_tok_s=statistics.median(decode[1:]), load_s=load_s, act_dtype=_ACT.get(str(act)[6:], str(act)))


def run_transformers(ckpt: str, dtype: str, prompt_len: int, gen_len: int, runs: int) -> dict[str, Any]:
    import torch
    import transformers

    if dtype not in ("fp32", "bf16"):
        raise ErnieError("transformers runs fp32 and bf16 only in this bench")
    t_load = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, _TORCH_DTYPE[dtype]))
    model.eval()
    load_s = time.perf_counter() - t_load
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
                decode_tok_s=statistics.median(decode[1:]), load_s=load_s)


def run_llama_cpp(ckpt: str, dtype: str, prompt_len: int, gen_len: int, runs: int, threads: int,
                  llama_dir: str | None = None) -> dict[str, Any]:
    if llama_dir:  # a llama-cpp-python built for this ISA level; numpy stays the environment's own
        import numpy  # noqa: F401

        sys.path.insert(0, llama_dir)
    import llama_cpp  # (optional peer)

    from ernie45.config import ErnieConfig

    gguf = gguf_path(ckpt, dtype)
    if not os.path.exists(gguf):  # normally written beforehand (`prepare`), so that its memory is not this row's
        export_gguf(ckpt, dtype)
    t_load = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=prompt_len + gen_len + 8, n_threads=threads, n_batch=512,
                          verbose=False)
    load_s = time.perf_counter() - t_load
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
                decode_tok_s=statistics.median(decode[1:]), load_s=load_s,
                llama_cpp_version=getattr(llama_cpp, "__version__", "unknown"))


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    fn = {"ernie45": run_ernie45, "gguf": run_ernie45, "transformers": run_transformers}.get(spec["engine"])
    args = (spec["ckpt"], spec["dtype"], spec["prompt_len"], spec["gen_len"], spec["runs"])
    if spec["engine"] == "llama.cpp":
        res = run_llama_cpp(*args, spec["threads"], spec.get("llama_dir"))
    else:
        res = fn(*args)
    res["peak_rss_mb"] = peak_rss_mb()
    res["env"] = {k: os.environ.get(k) for k in _ISA_VARS}  # what this process ran under
    res["aten_capability"] = torch.backends.cpu.get_cpu_capability()
    return res


def _prepare(spec: dict[str, Any]) -> str:
    if spec["what"] == "quantize":
        return quantized_checkpoint(spec["ckpt"], spec["dtype"])
    return export_gguf(spec["ckpt"], spec["dtype"])


def prepare(what: str, ckpt: str, dtype: str) -> tuple[str | None, str]:
    """Run `quantized_checkpoint` / `export_gguf` in a process of its own (its memory is nobody's row): (path, "")
    or (None, the reason it failed)."""
    r = subprocess.run([sys.executable, "-m", "ernie45.bench", "--prepare",
                        json.dumps(dict(what=what, ckpt=ckpt, dtype=dtype))], capture_output=True, text=True)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode == 0 and last:
        return last, ""
    return None, (r.stderr.strip().splitlines() or [f"{what} failed"])[-1][:200]


def _llama_cpp_installed(llama_dir: str | None) -> bool:
    import importlib.util

    return bool(llama_dir) or importlib.util.find_spec("llama_cpp") is not None


# ---- orchestration ---------------------------------------------------------------------------------
def bench(shapes: list[str], dtypes: list[str], engines: list[str], prompt_len: int = 512, gen_len: int = 128,
          runs: int = 3, threads: int | None = None, workdir: str | None = None,
          rounds: int = 1, isas: list[str] | None = None,
          llama_dirs: dict[str, str] | None = None, layers: int | None = None) -> list[dict[str, Any]]:
    """Run every (shape, dtype, isa, engine) in its own process and return the result rows.

    With `rounds` > 1 the engines of a (shape, dtype, isa) take turns, round after round, and each row reports the
    median over rounds: on a shared machine whose memory bandwidth drifts over minutes, interleaving keeps the
    comparison side by side. `isas` are ISA levels (default: ERNIE45_ISA's, else native); `llama_dirs` maps a
    level to a directory holding a llama_cpp package built for it (native falls back to the installed one).
    `layers`: the depth of the a3b shape (default 3).
    """
    from ernie45.device import isa_level

    isas = [normalize_isa(i) for i in (isas or [isa_level()])]
    for level in isas:
        check_isa(level)
    llama_dirs = llama_dirs or {}
    threads = threads or os.cpu_count() or 1
    workdir = workdir or os.path.join(tempfile.gettempdir(), "ernie45-bench")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for shape in shapes:
        cfg = shape_config(shape, layers)
        ckpt = make_checkpoint(shape, workdir, layers)
        for dtype in dtypes:
            # measured right before each group: a shared machine's bandwidth drifts from minute to minute
            bw = measure_bandwidth_gbs(threads)
            floor = bw * 1e9 / decode_bytes_per_token(cfg, dtype)
            # what the engines load, written once beforehand, each in a process of its own
            sources: dict[str, str] = {e: ckpt for e in engines}
            failed: dict[str, str] = {}
            if "ernie45" in engines and dtype in ("wint8", "wint4"):
                path, why = prepare("quantize", ckpt, dtype)
                if path:
                    sources["ernie45"] = path
                else:
                    failed["ernie45"] = f"quantizing the checkpoint failed: {why}"
            gguf_peers = [e for e in ("llama.cpp", "gguf") if e in engines]
            if "gguf" in engines or ("llama.cpp" in engines
                                     and any(_llama_cpp_installed(llama_dirs.get(i)) for i in isas)):
                path, why = prepare("gguf", ckpt, dtype)
                if path:
                    if "gguf" in engines:
                        sources["gguf"] = path
                else:
                    failed.update((e, f"GGUF export failed: {why}") for e in gguf_peers)
            for isa in isas:
                rows += _bench_group(sources, shape, dtype, isa, engines, floor, bw, prompt_len, gen_len, runs,
                                     threads, rounds, llama_dirs.get(isa), failed, cfg.num_hidden_layers)
    return rows


def _bench_group(sources: dict[str, str], shape: str, dtype: str, isa: str, engines: list[str], floor: float,
                 bw: float, prompt_len: int, gen_len: int, runs: int, threads: int, rounds: int,
                 llama_dir: str | None, failed: dict[str, str] | None = None,
                 layers: int | None = None) -> list[dict[str, Any]]:
    """The rows of one (shape, dtype, isa): the engines take turns for `rounds` rounds, each in its own process.
    `sources`: the checkpoint each engine loads; `failed`: engines whose preparation failed (skipped)."""
    base = dict(shape=shape, dtype=dtype, isa=isa, floor_decode_tok_s=floor, bandwidth_gbs=bw)
    if layers is not None:
        base["layers"] = layers
    results: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    skipped: dict[str, str] = dict(failed or {})
    if "llama.cpp" in engines and isa != "native" and not llama_dir:
        skipped["llama.cpp"] = f"no llama.cpp built for {isa}: pass --llama-cpp {isa}=DIR"
    for engine in engines:
        if engine in skipped:
            print(_fmt_row(dict(engine=engine, **base, skipped=skipped[engine])), file=sys.stderr, flush=True)
    env = isa_env(isa)
    for rnd in range(rounds):
        for engine in engines:
            if engine in skipped:
                continue
            spec = dict(engine=engine, ckpt=sources[engine], dtype=dtype, prompt_len=prompt_len, gen_len=gen_len,
                        runs=runs, threads=threads, llama_dir=llama_dir if engine == "llama.cpp" else None)
            r = subprocess.run([sys.executable, "-m", "ernie45.bench", "--worker", json.dumps(spec)],
                               capture_output=True, text=True, env=env)
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
            row = dict(engine=engine, **base)
            if r.returncode == 0 and last.startswith("{"):
                row.update(json.loads(last))
                results[engine].append(row)
            else:
                skipped[engine] = (r.stderr.strip().splitlines() or ["failed"])[-1][:200]
                row["skipped"] = skipped[engine]
            tag = f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""
            print(_fmt_row(row) + tag, file=sys.stderr, flush=True)
    rows = []
    for engine in engines:
        got = results[engine]
        if engine in skipped and not got:
            rows.append(dict(engine=engine, **base, skipped=skipped[engine]))
            continue
        row = dict(got[0], rounds=len(got))
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s"):
            row[key] = statistics.median(g[key] for g in got)
        row["peak_rss_mb"] = max(g["peak_rss_mb"] for g in got)
        rows.append(row)
    return rows


def _shape_cell(r: dict[str, Any]) -> str:
    """`tiny`, or `a3b (3 layers)` for a shape whose depth `--layers` sets."""
    return shape_label(r["shape"], r.get("layers"))


def _dtype_cell(r: dict[str, Any]) -> str:
    """`wint4`, or `wint4 (fp32 act)` where a quantized row's activations are not bf16."""
    act = r.get("act_dtype")
    return f"{r['dtype']} ({act} act)" if r["dtype"] in ("wint8", "wint4") and act and act != "bf16" else r["dtype"]


def _fmt_row(r: dict[str, Any]) -> str:
    head = f"{_shape_cell(r):>5} {_dtype_cell(r):>5} {r.get('isa', 'native'):>7} {r['engine']:>12}"
    if "skipped" in r:
        return f"{head}  skipped: {r['skipped']}"
    return (f"{head}  prefill {r['prefill_tok_s']:8.1f} tok/s  "
            f"decode {r['decode_tok_s']:6.1f} tok/s ({r['decode_tok_s'] / r['floor_decode_tok_s']:.0%} of the bandwidth bound)  "
            f"TTFT {r['ttft_s'] * 1e3:7.1f} ms  load {_load_cell(r):>5} s  RSS {r['peak_rss_mb']:6.0f} MB")


def _load_cell(r: dict[str, Any]) -> str:
    return f"{r['load_s']:.1f}" if r.get("load_s") is not None else "—"


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    bws = sorted({round(r["bandwidth_gbs"], 1) for r in rows if r.get("bandwidth_gbs")}) or [meta["bandwidth_gbs"]]
    bw_text = f"{bws[0]:.1f}" if len(bws) == 1 else f"{bws[0]:.1f}–{bws[-1]:.1f}"
    lines = [f"Machine: {meta['machine']}; {meta['threads']} threads; torch {meta['torch']}; measured read bandwidth "
             f"{bw_text} GB/s (before each shape and dtype); prompt {meta['prompt_len']} tokens, {meta['gen_len']} generated, "
             f"median of {meta['runs']} runs" + (f" in each of {meta['rounds']} interleaved rounds (median over rounds)"
                                                if meta.get("rounds", 1) > 1 else "") + f", {meta['date']}."]
    if meta.get("isa"):
        lines.append("ISA levels: " + "; ".join(f"{k} = {v}" for k, v in meta["isa"].items()) + ".")
    lines += ["",
              "| shape | dtype | isa | engine | prefill tok/s | decode tok/s | vs ernie45 | ÷ bandwidth bound | TTFT ms "
              "| load s | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["shape"], r["dtype"], r.get("isa", "native"))  # noqa: E731
    ours = {key(r): r for r in rows if r["engine"] == "ernie45" and "skipped" not in r}
    for r in rows:
        cells = f"| {_shape_cell(r)} | {_dtype_cell(r)} | {r.get('isa', 'native')} | {r['engine']} |"
        if "skipped" in r:
            lines.append(f"{cells} — | — | — | — | — | — | skipped: {r['skipped'][:60]} |")
            continue
        o = ours.get(key(r))
        ratio = f"{o['decode_tok_s'] / r['decode_tok_s']:.2f}×" if o and r["engine"] != "ernie45" else "—"
        lines.append(f"{cells} {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {ratio} | "
                     f"{r['decode_tok_s'] / r['floor_decode_tok_s']:.0%} | {r['ttft_s'] * 1e3:.0f} | "
                     f"{_load_cell(r)} | {r['peak_rss_mb']:.0f} |")
    lines.append("")
    lines.append("`÷ bandwidth bound` is decode tokens/s divided by the read bandwidth measured before the group over "
                 "the bytes of weights one token reads (every weight once): the share of the memory-bound limit "
                 "reached. Above 100 % means the bandwidth moved between the measurement and the run, or some "
                 "weights stayed in cache.")
    lines.append("`vs ernie45` is ernie45's decode tokens/s divided by the peer's of the same shape, dtype and isa "
                 "(> 1 means ernie45 is faster). `load s` runs from the start of loading to a model ready to "
                 "generate (ernie45's wint8/wint4 rows load a checkpoint quantized beforehand, as llama.cpp loads its "
                 "q8_0/q4_0 GGUF; llama.cpp maps the file and reads pages as they are first used).")
    llama = {key(r): r for r in rows if r["engine"] == "llama.cpp" and "skipped" not in r}
    same_file = [(r, llama[key(r)]) for r in rows
                 if r["engine"] == "gguf" and "skipped" not in r and key(r) in llama]
    if same_file:
        lines.append("`gguf` is ernie45 running the GGUF file llama.cpp runs; on the same file, ernie45 ÷ llama.cpp: "
                     + "; ".join(f"{_shape_cell(g)} {g['dtype']} ({g.get('isa', 'native')}) decode "
                                 f"{g['decode_tok_s'] / ll['decode_tok_s']:.2f}×, prefill "
                                 f"{g['prefill_tok_s'] / ll['prefill_tok_s']:.2f}×, peak RSS "
                                 f"{g['peak_rss_mb'] / ll['peak_rss_mb']:.2f}×" for g, ll in same_file) + ".")
    builds = {r.get("isa", "native"): r["llama_cpp_version"] for r in rows if r.get("llama_cpp_version")}
    if builds:
        lines.append("llama.cpp: " + "; ".join(f"llama-cpp-python {v} built for {k}" for k, v in builds.items())
                     + ".")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    """CPU model and the vector extensions that decide the kernels, e.g. "AMD EPYC (avx512f, avx512_bf16)"."""
    from ernie45.device import cpu_info

    isa = _vector_flags()
    name = cpu_info().get("model name") or platform.processor() or platform.machine()
    return name + (f" ({', '.join(isa)})" if isa else "")


def recorded_command(name: str, argv: list[str]) -> str:
    """The command line a results file records, without this machine's paths (`--workdir DIR`)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workdir":
            skip = True
        elif not a.startswith("--workdir="):
            kept.append(a)
    return " ".join([f"ernie45 bench {name}", *kept])


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ErnieError(f"unknown {what} {', '.join(bad) or value!r}; choose from {', '.join(allowed)}")
    return items


# `ernie45 bench <name>`: the benchmarks with their own options -> their module (`build_parser`, `main`)
SUBCOMMANDS = {
    "serve": "ernie45.bench_serve",  # the server under concurrent and multi-turn load
    "grammar": "ernie45.bench_grammar",  # structured output's cost per token
    "speculative": "ernie45.bench_speculative",  # speculative decoding: cost of a pass, acceptance, speedup
}


def row_dtypes(value: str) -> str:
    """The benchmarks' --dtype: a comma list of row names (fp32, bf16, wint8, wint4) in any spelling `--dtype`
    takes elsewhere (float32 = fp32, ...), `auto` being what loading picks on this CPU. Unknown names are kept, for
    `_csv` to refuse with the list of row names."""
    from ernie45.device import cpu_has_fast_bf16

    names = [dtype_name(v, short=True) for v in value.split(",") if v.strip()]
    return ",".join(("bf16" if cpu_has_fast_bf16() else "fp32") if n == "auto" else n for n in names)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45 bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="`ernie45 bench serve --help`: the server under concurrent and multi-turn load; "
                                       "`ernie45 bench grammar --help`: structured output's cost per token; "
                                       "`ernie45 bench --speculative mtp,ngram` (`ernie45 bench speculative --help`): "
                                       "speculative decoding's cost per pass, acceptance and speedup.")
    p.add_argument("--shape", default="0.3b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--dtype", type=row_dtypes, default="fp32,bf16",
                   help=f"comma list of {', '.join(DTYPES)} (or float32, bfloat16, auto)")
    p.add_argument("--vs", default="transformers",
                   help="peers: comma list of transformers, llama.cpp, gguf (ernie45 running llama.cpp's GGUF file), "
                        "or none")
    p.add_argument("--prompt-len", type=int, default=512)
    add_max_new_tokens_arg(p, 128, "tokens generated per run (the end-of-text token is ignored)", old=("--gen-len",))
    p.add_argument("--runs", type=int, default=3, help="measured runs per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per configuration, the engines taking turns; rows report the median")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--json", dest="json_out", default=None, help="write the result rows as JSON here")
    p.add_argument("--out", default=None, help="write a Markdown table here (e.g. bench/results.md)")
    p.add_argument("--layers", type=int, default=None,
                   help="layers of the a3b shape: 3 (default) = one dense and two MoE layers, 28 = the whole "
                        "ERNIE-4.5-21B-A3B")
    p.add_argument("--workdir", default=None,
                   help="where the random checkpoints (and their quantized copies and GGUF files) are cached")
    p.add_argument("--isa", default=None,
                   help="comma list of ISA levels to run every row at: native (this CPU's best), avx2 (x86-64-v3: "
                        "ernie45's kernels and PyTorch's ATen/oneDNN/MKL capped at AVX2, AVX-512 off), generic "
                        "(x86-64-v2, SSE4.2) (default: $ERNIE45_ISA, else native)")
    p.add_argument("--llama-cpp", dest="llama_cpp", action="append", default=None, metavar="LEVEL=DIR",
                   help="llama.cpp for an ISA level: DIR holds a llama_cpp package built for LEVEL (pip install "
                        "--target DIR); repeatable. Without one, a non-native level's llama.cpp rows are skipped; "
                        "native uses the installed llama_cpp")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["speculative"] and any(a == "--speculative" or a.startswith("--speculative=") for a in argv):
        argv = ["speculative", *argv]  # `ernie45 bench --speculative mtp,ngram` = `ernie45 bench speculative ...`
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    p = build_parser()
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(json.loads(a.worker))))
        return 0
    if a.prepare:
        print(_prepare(json.loads(a.prepare)))
        return 0
    shapes = _csv(a.shape, tuple(SHAPES), "shape")
    if a.layers is not None:
        layered = [s for s in shapes if s in FULL_LAYERS]
        if not layered:
            raise ErnieError(f"--layers applies to --shape {', '.join(FULL_LAYERS)} only")
        for shape in layered:
            shape_config(shape, a.layers)  # checks the range
    dtypes = _csv(a.dtype, DTYPES, "dtype")
    peers = [] if a.vs == "none" else _csv(a.vs, ENGINES[1:], "peer")
    if a.prompt_len < 1 or a.max_new_tokens < 2 or a.runs < 1 or a.rounds < 1:
        raise ErnieError("--prompt-len must be >= 1, --max-new-tokens (--gen-len) >= 2, --runs >= 1 and --rounds >= 1")
    from ernie45.device import isa_level

    levels = a.isa or isa_level()  # isa_level: ERNIE45_ISA, the level ernie45 runs at here
    isas = list(dict.fromkeys(normalize_isa(v) for v in levels.split(",") if v.strip()))
    if not isas:
        raise ErnieError("--isa wants a comma list of native, avx2, generic")
    llama_dirs = parse_llama_cpp(a.llama_cpp)
    for level in llama_dirs:
        if level not in isas:
            print(f"note: --llama-cpp {level}=... is unused: --isa does not include {level}", file=sys.stderr)
    import torch

    rows = bench(shapes, dtypes, ["ernie45", *peers], a.prompt_len, a.max_new_tokens, a.runs, a.threads, a.workdir,
                 a.rounds, isas, llama_dirs, a.layers)
    meta = dict(machine=f"{_cpu_name()}, {os.cpu_count()} cores", torch=torch.__version__,
                threads=a.threads or os.cpu_count(), bandwidth_gbs=rows[0]["bandwidth_gbs"] if rows else 0.0,
                prompt_len=a.prompt_len, gen_len=a.max_new_tokens, runs=a.runs, rounds=a.rounds,
                layers={s: shape_config(s, a.layers).num_hidden_layers for s in shapes if s in FULL_LAYERS},
                isa={level: _isa_meaning(level) for level in isas},
                llama_cpp={r["isa"]: r["llama_cpp_version"] for r in rows if r.get("llama_cpp_version")},
                date=time.strftime("%Y-%m-%d"))
    write_results(rows, meta, to_markdown(rows, meta), a.json_out, a.out)
    return 0


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any], table: str, json_out: str | None,
                  out: str | None) -> None:
    """Rows and meta as JSON to `json_out`, the Markdown `table` to `out` (each written whole or not at all), and
    the table to stdout."""
    from ernie45.utils import atomic_write_text

    if json_out:
        atomic_write_text(json_out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if out:
        atomic_write_text(out, table)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
