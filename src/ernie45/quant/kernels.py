"""Matrix-product kernels for the quantized Linears, chosen per device, dtype, shape and batch rows.

Each operation has a fast kernel where PyTorch ships one and a pure-torch dequantise+matmul fallback that runs
anywhere (CUDA, CPUs without AVX2, autograd). `ernie45.quant.kernel_bench.bench_kernels()` times them side by
side; the rules in `choose_kernel` come from those measurements on a 2-core AVX-512 (AVX512-BF16, VNNI) CPU, one
thread, bf16 activations, weights streamed from memory (a 0.3B MLP projection, 3072x1024, ms per call):

    rows  fp32 linear  bf16 linear  int8pack  int8 dequant  int4pack  int4 dequant  int8 x int8 (_int_mm)
      1       0.92         0.66        0.46       0.67        0.17        5.0            0.36
      8       1.84         0.84        1.00       0.85        0.61        5.4            0.58
     64       5.97         2.59        5.67       2.66        4.74        7.2            1.53
    256      19.0          7.8        21.9        8.6        18.7        12.8            5.1

So: `torch._weight_int8pack_mm` for up to 4 rows (decoding) and dequantise + bf16 matmul above that;
`aten._weight_int4pack_mm_for_cpu` up to 128 rows (its fp32-activation path is ~50x slower, so fp32 inputs run
it in bf16: the int4 weight error is ~20x the bf16 rounding); `torch._int_mm` for LLM.int8().

CPUs without AVX512-BF16/AMX (AVX2-only ones, AVX-512 ones before Cooper Lake / Zen 4) emulate bf16 matmuls, so
there the fallback multiplies in fp32 (`matmul_dtype`), and always one tile of output rows at a time
(`tiled_mm`: at most TILE_WEIGHTS weights in float, never a whole fp32 copy of a 103k-row lm_head). The same
CPU acting as an AVX2-only one (ERNIE45_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2), one thread, same projection, bf16 activations:

    rows  fp32 linear  bf16 linear  int8pack  int8 bf16 dequant  int8 fp32 tiles  int4 bf16 dequant  int4 fp32 tiles
      1       0.73         0.27       0.26          0.57              0.34              2.80              1.66
      4       1.39         0.97       0.47          1.24              0.77              3.36              2.13
     64       4.49        14.6        5.32         16.3               4.59             17.6               6.23
    512      30.5        117         42.4         120                31.0             116                31.7

int8pack with fp32 inputs is unvectorised there (2.0 ms at 1 row, 1076 ms at 512), hence bf16/fp16 only; AVX2
has no int4 kernel (`_int4pack_probe` fails). Where it exists but bf16 is emulated (ATEN_CPU_CAPABILITY=avx512
ONEDNN_MAX_CPU_ISA=AVX512_CORE), 512 rows take 19.4 ms in int4pack against 33.9 in fp32 tiles (natively: 22.9
against 35.1, and 11.8 for the bf16 dequant), so int4pack also takes every row count that the fallback would
multiply in fp32.
`_weight_int8pack_mm` (torch 2.13) reads out of bounds for bf16 inputs whose width is not a multiple of 32, and
segfaults on weights that are not 16-byte aligned (a tensor memory-mapped from safetensors usually is not), hence
the shape and alignment guards below, which no runtime probe could catch safely.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ernie45.device import cpu_has_fast_bf16
from ernie45.native_abi import W_I4, W_I8, dequant_rows, qmm, qmm_simd, tile_buffer

KERNELS = {
    "wint8": ("int8pack", "qmm", "dequant"),
    "wint4": ("int4pack", "qmm", "dequant"),
    "llm.int8": ("int_mm", "float"),
}
INT8PACK_MAX_ROWS = 4
INT4PACK_MAX_ROWS = 128
QMM_MAX_ROWS_FAST_BF16 = 32  # where bf16 matmuls are fast, qmm still beats dequantising a whole weight up to here
ALIGNMENT = 64  # bytes; `_weight_int8pack_mm` crashes on weights that are not 16-byte aligned (4+ rows)
TILE_WEIGHTS = 1 << 20  # weights per dequantised tile: 4 MB in fp32 (1024 rows of a 1024-wide layer)
CPU_INT4_LAYOUT = "cpu_int4pack"  # the layout `_convert_weight_to_int4pack_for_cpu` produces
ROWMAJOR_INT4_LAYOUT = "rowmajor"  # the on-disk layout: byte k//2 of row n = q[n, k] | q[n, k+1] << 4

_forced: dict[str, str] = {}


@contextlib.contextmanager
def use_kernel(op: str, name: str) -> Iterator[None]:
    """Force kernel `name` for `op` where its shape/device guards allow it (tests and benchmarks)."""
    if op not in KERNELS or name not in KERNELS[op]:
        raise ValueError(f"unknown kernel {name!r} for {op!r}; choose from {KERNELS.get(op)}")
    prev = _forced.get(op)
    _forced[op] = name
    try:
        yield
    finally:
        if prev is None:
            _forced.pop(op, None)
        else:
            _forced[op] = prev


def wants_autograd(x: Tensor) -> bool:
    """The fused kernels have no backward; a frozen quantized base must still pass gradients to its input."""
    return torch.is_grad_enabled() and x.requires_grad


@functools.lru_cache(maxsize=1)
def cpu_vector_isa() -> bool:
    """True when ATen's CPU kernels were dispatched to AVX2/AVX-512 code (the int8/int4 fast paths need it)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


# ---- int4 layouts ---------------------------------------------------------------------------------
def pack_int4_rowmajor(q: Tensor) -> Tensor:
    """(N, K) integers in [0, 15] -> (N, K/2) uint8, low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4_rowmajor(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)  # (N, K/2, 2) -> (N, K)


def to_cpu_int4_layout(packed: Tensor) -> Tensor:
    """Row-major packed int4 -> the CPU kernel's layout (same shape and size, nibbles permuted)."""
    q = unpack_int4_rowmajor(packed).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)


def unpack_cpu_int4_layout(packed: Tensor) -> Tensor:
    """The CPU kernel's packed int4 -> (N, K) uint8 in [0, 15], row-major.

    The CPU layout (torch 2.13, verified by `_int4pack_probe`) stores each block of 64 rows as (K, 32) bytes
    with row d in the low nibble and row d+32 in the high one; a tail of N % 64 rows is (K, tail/2) bytes
    pairing rows 2d and 2d+1.
    """
    n, half = packed.shape
    k = half * 2
    full = n // 64 * 64
    parts = []
    if full:
        b = packed[:full].reshape(full // 64, k, 32)  # (N/64, K, 32)
        rows = torch.cat((b & 15, b >> 4), dim=2)  # (N/64, K, 64): rows d then d+32
        parts.append(rows.permute(0, 2, 1).reshape(full, k))  # (N_full, K)
    if n > full:
        t = n - full
        b = packed[full:].reshape(k, t // 2)  # (K, tail/2)
        rows = torch.stack((b & 15, b >> 4), dim=2).reshape(k, t)  # (K, tail): rows 2d, 2d+1 interleaved
        parts.append(rows.t())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def from_cpu_int4_layout(packed: Tensor) -> Tensor:
    """Inverse of `to_cpu_int4_layout`, so that a model running the CPU kernel still saves the portable layout."""
    return pack_int4_rowmajor(unpack_cpu_int4_layout(packed))


def dequantize_int4(
    packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, layout: str, dtype: torch.dtype
) -> Tensor:
    """(N, K/2) packed + (N, K/g) scale/zero -> (N, K) weights: w = (q - 8) * scale + zero."""
    q = unpack_cpu_int4_layout(packed) if layout == CPU_INT4_LAYOUT else unpack_int4_rowmajor(packed)
    n, k = q.shape
    s = scale.float()[..., None]  # (N, K/g, 1)
    # fp32 in place: broadcasting bf16 arithmetic is ~4x slower on CPU, and rounding once at the end is exact-er
    w = q.view(n, k // group_size, group_size).float().mul_(s).add_(zero.float()[..., None] - 8 * s)
    return w.view(n, k).to(dtype)


def int4_scales_and_zeros(scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, K/g) scale and zero -> the kernel's (K/g, N, 2) tensor."""
    return torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()


# ---- availability probes (once per process) -------------------------------------------------------
@functools.cache
def _int8pack_probe(dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    s = torch.rand(32, generator=g).to(dtype)
    x = torch.randn(3, 64, generator=g).to(dtype)
    try:
        y = torch._weight_int8pack_mm(x, w, s).float()
    except (RuntimeError, NotImplementedError):
        return False
    ref = (x.float() @ w.float().t()) * s.float()
    return bool(((y - ref).abs().max() <= 0.02 * ref.abs().max()).item())


@functools.cache
def _int4pack_probe() -> bool:
    """The CPU int4 kernel runs, gives the dequantised product, and its layout is the one we can invert."""
    g = torch.Generator().manual_seed(0)
    n, k, gs = 80, 128, 64  # one full 64-row block plus a 16-row tail
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale, zero = torch.rand(n, k // gs, generator=g) + 0.5, torch.randn(n, k // gs, generator=g)
    try:
        packed = to_cpu_int4_layout(pack_int4_rowmajor(q))
        x = torch.randn(3, k, generator=g)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), packed, gs, int4_scales_and_zeros(scale, zero, torch.bfloat16)
        )
    except (RuntimeError, NotImplementedError):
        return False
    if not torch.equal(unpack_int4_rowmajor(from_cpu_int4_layout(packed)).int(), q):
        return False
    ref = (
        x.bfloat16().float()
        @ dequantize_int4(pack_int4_rowmajor(q), scale, zero, gs, ROWMAJOR_INT4_LAYOUT, torch.float32).t()
    )
    return bool(((y.float() - ref).abs().max() <= 0.02 * ref.abs().max()).item())


@functools.cache
def _int_mm_probe(device_type: str) -> bool:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    try:
        out = torch._int_mm(a.to(device_type), b.to(device_type).t()).cpu()
    except (RuntimeError, NotImplementedError):
        return False
    return torch.equal(out, a.int() @ b.int().t())


# ---- choice ---------------------------------------------------------------------------------------
def int4pack_usable(device: torch.device, n: int, k: int, group_size: int) -> bool:
    """Whether a (n, k) int4 layer on `device` can keep its weight in the CPU kernel layout."""
    return (
        device.type == "cpu"
        and cpu_vector_isa()
        and n % 16 == 0
        and k % group_size == 0
        and group_size in (32, 64, 128, 256)
        and _int4pack_probe()
    )


def choose_kernel(op: str, x: Tensor, n: int, k: int, group_size: int = 0, rowmajor: bool = False) -> str:
    """The kernel for `x` (rows, k) times an (n, k) quantized weight; see the module docstring. `rowmajor`: an int4
    weight kept in the portable layout (the C decode step reads it), for which PyTorch's int4 kernel is out."""
    rows = x.numel() // max(k, 1)
    forced = _forced.get(op)
    dev = x.device
    if op == "wint8":
        fast = (
            not wants_autograd(x)
            and dev.type == "cpu"
            and cpu_vector_isa()
            and x.dtype in (torch.bfloat16, torch.float16)
            and n % 16 == 0
            and k % 64 == 0
            and _int8pack_probe(x.dtype)
        )
        if fast and (forced == "int8pack" or (forced is None and rows <= INT8PACK_MAX_ROWS)):
            return "int8pack"
        return "qmm" if _qmm_wins(x, rows, forced) else "dequant"
    if op == "wint4":
        fast = not rowmajor and not wants_autograd(x) and int4pack_usable(dev, n, k, group_size)
        # above INT4PACK_MAX_ROWS the fallback wins only where it multiplies in native bf16
        wins = rows <= INT4PACK_MAX_ROWS or matmul_dtype(x) == torch.float32
        if fast and (forced == "int4pack" or (forced is None and wins)):
            return "int4pack"
        # a row-major weight on a fast-bf16 CPU is one the C decode step reads (PyTorch's int4 kernel would take it
        # otherwise): its PyTorch products are prefill pieces, down to a MoE expert's one token of a short prompt
        return "qmm" if _qmm_wins(x, rows, forced, any_rows=rowmajor and cpu_has_fast_bf16()) else "dequant"
    if op == "llm.int8":
        if dev.type == "cuda":  # cuBLASLt int8 needs > 16 rows and multiples of 8
            fast = rows > 16 and n % 8 == 0 and k % 8 == 0 and _int_mm_probe("cuda")
        else:
            fast = dev.type == "cpu" and _int_mm_probe("cpu")
        return "int_mm" if fast and forced != "float" else "float"
    raise ValueError(f"unknown op {op!r}")


def _qmm_wins(x: Tensor, rows: int, forced: str | None, any_rows: bool = False) -> bool:
    """The integer prefill product (`csrc/qmm.c`) for more rows than a decode step (decoding keeps the
    exact-activation paths), on a CPU where it is vectorised: wherever the fallback would multiply fp32 tiles (no
    fast bf16, or fp32 inputs), and, where bf16 matmuls are fast, up to QMM_MAX_ROWS_FAST_BF16 rows, below which
    dequantising the whole weight costs more than the product (a short prompt, a MoE expert's few tokens; 2 cores
    of a Zen 5 with AVX512-BF16, bf16 inputs, 3072x1024 / 512x1024 / 1536x2560 weights: int4 2.0-2.6x faster at 16
    rows, 1.4-2.0x at 32, about even at 64; int8 1.1-1.7x at 16-32). `any_rows`: decode-shaped products too, for a
    weight whose decoding runs elsewhere (a 10-token prompt on the 3-layer 21B-A3B shape, wint4: 248 -> 85 ms, its
    experts' one-to-four-token products no longer dequantising whole experts)."""
    if forced == "dequant" or wants_autograd(x) or x.device.type != "cpu":
        return False
    if forced == "qmm":
        return True
    if (rows <= INT8PACK_MAX_ROWS and not any_rows) or rows < 1 or qmm_simd() == 0:
        return False
    return matmul_dtype(x) == torch.float32 or rows <= QMM_MAX_ROWS_FAST_BF16


# ---- the operations -------------------------------------------------------------------------------
def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype the dequantising fallback multiplies in: x's, except fp32 for bf16/fp16 on CPUs that would
    emulate the low-precision matmul (no AVX512-BF16/AMX: ~4x slower than fp32, see the table above)."""
    if x.dtype == torch.float32 or x.device.type != "cpu" or cpu_has_fast_bf16():
        return x.dtype
    return torch.float32


def tile_rows(n: int, k: int) -> int:
    """Output rows per dequantised tile: ~TILE_WEIGHTS weights, a multiple of 64 (whole CPU int4 blocks)."""
    return max(64, min(n, TILE_WEIGHTS // max(k, 1)) // 64 * 64)


def tiled_mm(
    x2: Tensor, n: int, weight_rows: Callable[[int, int], Tensor], dtype: torch.dtype, rows: int | None = None
) -> Tensor:
    """(M, K) x an (n, K) weight that `weight_rows(i, j)` dequantises rows i:j of, in `dtype` -> (M, n) in
    `dtype`. Only one tile of `rows` (default `tile_rows`) output rows is ever held in float, so a quantized
    103k-row lm_head never becomes a whole fp32 matrix."""
    rows = rows or tile_rows(n, x2.shape[-1])
    xc = x2.to(dtype)
    onednn = _onednn_fp32(xc)
    if onednn and rows >= n:  # a single tile: no output copy
        return torch.ops.mkldnn._linear_pointwise(xc, weight_rows(0, n), None, "none", [], "")
    out = torch.empty(x2.shape[0], n, dtype=dtype, device=x2.device)
    for i in range(0, n, rows):
        j = min(n, i + rows)
        if onednn:
            out[:, i:j] = torch.ops.mkldnn._linear_pointwise(xc, weight_rows(i, j), None, "none", [], "")
        else:
            torch.mm(xc, weight_rows(i, j).t(), out=out[:, i:j])
    return out


def _onednn_fp32(x: Tensor) -> bool:
    """oneDNN's fp32 linear on a plain (unpacked) weight: 13.9 against MKL's 16.2 ms for 512 rows x a 3072x1024
    weight, 2 threads, capped at AVX2 (and it takes the weight as stored, no transpose)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def int8_weight_mm(x2: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """(M, K) float x (N, K) int8 with per-row scale (N,) -> (M, N) in x's dtype (weight-only int8)."""
    kernel = choose_kernel("wint8", x2, weight.shape[0], weight.shape[1])
    if kernel == "int8pack" and weight.data_ptr() % ALIGNMENT == 0:
        return torch._weight_int8pack_mm(x2.contiguous(), weight, scale.to(x2.dtype))
    if kernel == "qmm" and (y := qmm(x2, W_I8, weight, scale, None, 0)) is not None:
        return y.to(x2.dtype)
    if wants_autograd(x2):
        return F.linear(x2, weight.to(x2.dtype)) * scale.to(x2.dtype)
    dtype = matmul_dtype(x2)
    n, k = weight.shape
    rows = None
    if x2.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):  # the same widening, one C pass
        rows = _c_rows(dequant_rows(W_I8, weight, n, k, torch.ones(n), transient=True), dtype)
    y = tiled_mm(x2, n, rows or (lambda i, j: weight[i:j].to(dtype)), dtype)
    return y.mul_(scale.to(dtype)).to(x2.dtype)


def dequantize_int8(weight: Tensor, scale: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """(N, K) int8 with scale (N,) (group_size 0) or (N, K/g) -> (N, K) weights: w = q * scale in fp32, rounded
    once to `dtype` (the C kernel `ernie_dequant` computes the same products)."""
    if not group_size:
        return (weight.float() * scale.float()[:, None]).to(dtype)
    n, k = weight.shape
    w = weight.view(n, k // group_size, group_size).float().mul_(scale.float()[..., None])
    return w.view(n, k).to(dtype)


def int8_group_mm(x2: Tensor, weight: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """(M, K) float x (N, K) int8 with a scale per group of `group_size` columns (N, K/g) -> (M, N) in x's dtype:
    dequantised tiles (`_weight_int8pack_mm` takes one scale per row only). q * scale is rarely a bf16 value, so
    decoding rows (up to INT8PACK_MAX_ROWS, where per-row int8 runs int8pack on the exact weights) multiply fp32
    tiles; more rows multiply in `matmul_dtype`, rounding the weights once."""
    if wants_autograd(x2):
        return F.linear(x2, dequantize_int8(weight, scale, group_size, x2.dtype))
    if (choose_kernel("wint8", x2, weight.shape[0], weight.shape[1]) == "qmm"
            and (y := qmm(x2, W_I8, weight, scale, None, group_size)) is not None):
        return y.to(x2.dtype)
    dtype = matmul_dtype(x2) if x2.shape[0] > INT8PACK_MAX_ROWS else torch.float32
    n, k = weight.shape

    def weight_rows(i: int, j: int) -> Tensor:
        return dequantize_int8(weight[i:j], scale[i:j], group_size, dtype)

    if x2.device.type == "cpu":  # the same values in one pass of the C kernel
        weight_rows = _c_rows(dequant_rows(W_I8, weight, n, k, scale, None, group_size, transient=True),
                              dtype) or weight_rows
    return tiled_mm(x2, n, weight_rows, dtype).to(x2.dtype)


def int4_weight_mm(
    x2: Tensor,
    packed: Tensor,
    layout: str,
    scale: Tensor,
    zero: Tensor,
    group_size: int,
    scales_and_zeros: Tensor | None = None,
) -> Tensor:
    """(M, K) float x int4 (N, K/2) in `layout` with group scale/zero (N, K/g) -> (M, N) in x's dtype."""
    n, k = packed.shape[0], packed.shape[1] * 2
    kernel = choose_kernel("wint4", x2, n, k, group_size, rowmajor=layout == ROWMAJOR_INT4_LAYOUT)
    if layout == CPU_INT4_LAYOUT and kernel == "int4pack":
        kdtype = torch.bfloat16 if x2.dtype == torch.float32 else x2.dtype
        sz = scales_and_zeros if scales_and_zeros is not None else int4_scales_and_zeros(scale, zero, kdtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(kdtype).contiguous(), packed, group_size, sz)
        return out.to(x2.dtype)
    if wants_autograd(x2):
        return F.linear(x2, dequantize_int4(packed, scale, zero, group_size, layout, x2.dtype))
    if (kernel == "qmm" and layout == ROWMAJOR_INT4_LAYOUT
            and (y := qmm(x2, W_I4, packed, scale, zero, group_size)) is not None):
        return y.to(x2.dtype)
    dtype = matmul_dtype(x2)

    def weight_rows(i: int, j: int) -> Tensor:
        return dequantize_int4(packed[i:j], scale[i:j], zero[i:j], group_size, layout, dtype)

    if layout == ROWMAJOR_INT4_LAYOUT and x2.device.type == "cpu":  # the same values in one pass of the C kernel
        weight_rows = _c_rows(dequant_rows(W_I4, packed, n, k, scale, zero, group_size, transient=True),
                              dtype) or weight_rows
    return tiled_mm(x2, n, weight_rows, dtype).to(x2.dtype)


def _c_rows(rows32: Callable[[int, int], Tensor] | None, dtype: torch.dtype) -> Callable[[int, int], Tensor] | None:
    """fp32 tiles from the C dequantisation, rounded to `dtype` (the same values as PyTorch's dequantisation,
    which also computes in fp32 and rounds once)."""
    if rows32 is None or dtype == torch.float32:
        return rows32

    def rows(i: int, j: int) -> Tensor:
        t = rows32(i, j)
        return tile_buffer(*t.shape, dtype).copy_(t)  # a transient tile, like rows32's

    return rows


def quantize_rows_int8(x2: Tensor, clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 of activations (LLM.int8()): (M, K) -> int8 (M, K), step (M,) fp32.

    With a calibrated `clip` > 0 a row's range is min(row absmax, clip): rare large inlier values saturate and
    typical ones keep more resolution.
    """
    xf = x2.float()
    amax = xf.abs().amax(dim=1)
    if clip > 0:
        amax = amax.clamp(max=clip)
    step = amax.clamp(min=1e-12) / 127.0
    q = (xf / step[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, step


def int8_int8_mm(xq: Tensor, weight: Tensor) -> Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) int32 (exact in the `int_mm` kernel)."""
    n, k = weight.shape
    if choose_kernel("llm.int8", xq, n, k) == "int_mm":
        return torch._int_mm(xq, weight.t())
    # fp32 holds every partial sum exactly while |sum| < 2^24, i.e. for K up to ~1000 at full range.
    return torch.matmul(xq.float(), weight.float().t()).round_().to(torch.int32)
