"""`bench_kernels()`: every kernel of `ernie45.quant.kernels` timed side by side on one projection.

The measurements behind `choose_kernel`'s rules (the tables in kernels.py's docstring and docs/quantize.md).
Apart from kernels.py because it quantizes its weights with `ernie45.quant.linear`, which imports kernels.py.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ernie45.quant.kernels import (
    CPU_INT4_LAYOUT,
    KERNELS,
    ROWMAJOR_INT4_LAYOUT,
    choose_kernel,
    int4_scales_and_zeros,
    int4_weight_mm,
    int4pack_usable,
    int8_int8_mm,
    int8_weight_mm,
    quantize_rows_int8,
    to_cpu_int4_layout,
    use_kernel,
)
from ernie45.quant.linear import quantize_int4_groupwise, quantize_int8_per_channel


def bench_kernels(
    n: int = 3072,
    k: int = 1024,
    rows: tuple[int, ...] = (1, 8, 64),
    copies: int = 16,
    reps: int = 5,
    threads: int | None = None,
    group_size: int = 128,
) -> list[dict]:
    """Time every kernel on a (n, k) projection, cycling `copies` weights so they stream from memory.

    Returns one dict per (op, kernel, dtype, rows): milliseconds per call (best of `reps`) and the weight bytes
    read per second. Not a test: numbers depend on the machine and its load.
    """
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.02 for _ in range(copies)]
    bf16 = [w.bfloat16() for w in ws]
    i8 = [quantize_int8_per_channel(w, torch.bfloat16) for w in ws]
    cpu4 = int4pack_usable(torch.device("cpu"), n, k, group_size)
    layout4 = CPU_INT4_LAYOUT if cpu4 else ROWMAJOR_INT4_LAYOUT
    i4 = []
    for w in ws:
        packed, scale, zero = quantize_int4_groupwise(w, group_size, torch.bfloat16)
        sz = int4_scales_and_zeros(scale, zero, torch.bfloat16)
        i4.append((to_cpu_int4_layout(packed) if cpu4 else packed, scale, zero, sz))

    def run_fp32(i: int, x: Tensor) -> Tensor:
        return F.linear(x.float(), ws[i])

    def run_bf16(i: int, x: Tensor) -> Tensor:
        return F.linear(x, bf16[i])

    def run_wint8(i: int, x: Tensor) -> Tensor:
        return int8_weight_mm(x, i8[i][0], i8[i][1])

    def run_wint4(i: int, x: Tensor) -> Tensor:
        return int4_weight_mm(x, i4[i][0], layout4, i4[i][1], i4[i][2], group_size, i4[i][3])

    def run_llm_int8(i: int, x: Tensor) -> Tensor:
        xq, step = quantize_rows_int8(x)
        return int8_int8_mm(xq, i8[i][0]).float() * step[:, None] * i8[i][1].float()

    cases = [("fp32", "F.linear", 4.0, run_fp32), ("bf16", "F.linear", 2.0, run_bf16)]
    cases += [("wint8", kern, 1.0, run_wint8) for kern in KERNELS["wint8"]]
    cases += [("wint4", kern, 0.5, run_wint4) for kern in KERNELS["wint4"]]
    cases += [("llm.int8", kern, 1.0, run_llm_int8) for kern in KERNELS["llm.int8"]]
    results: list[dict] = []
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for m in rows:
                x = torch.randn(m, k, generator=g).bfloat16()
                for op, kern, bytes_per_weight, fn in cases:
                    forced = use_kernel(op, kern) if op in KERNELS else contextlib.nullcontext()
                    with forced:
                        if op in KERNELS and choose_kernel(op, x, n, k, group_size) != kern:
                            continue  # not usable here (device, dtype or shape)
                        fn(0, x)
                        best = float("inf")
                        for _ in range(reps):
                            t0 = time.perf_counter()
                            for i in range(copies):
                                fn(i, x)
                            best = min(best, (time.perf_counter() - t0) / copies)
                    results.append(
                        {
                            "op": op,
                            "kernel": kern,
                            "dtype": "bfloat16" if op != "fp32" else "float32",
                            "rows": m,
                            "ms": best * 1e3,
                            "gb_s": n * k * bytes_per_weight / best / 1e9,
                            "shape": [n, k],
                        }
                    )
    finally:
        torch.set_num_threads(prev_threads)
    return results


def format_bench(results: list[dict]) -> str:
    """A plain-text table of `bench_kernels()` results."""
    lines = [f"{'op':<9} {'kernel':<9} {'dtype':<9} {'rows':>5} {'ms':>9} {'GB/s':>7}"]
    for r in results:
        lines.append(
            f"{r['op']:<9} {r['kernel']:<9} {r['dtype']:<9} {r['rows']:>5} {r['ms']:>9.3f} {r['gb_s']:>7.1f}"
        )
    return "\n".join(lines)
