"""Quantized Linear modules and the tensor quantizers behind them.

- `Int8Linear` (wint8): weight-only int8, one scale per output channel, or per group of 32 input columns (a GGUF
  file's Q8_0 blocks, loaded as they are).
- `Int4Linear` (wint4): weight-only int4, asymmetric, one scale and zero per group of 64/128 input columns (32:
  a GGUF file's Q4_0 blocks, loaded as they are), two values per byte.
- `LLMInt8Linear` (llm.int8): LLM.int8() (Dettmers et al., 2022): int8 weights times per-token int8
  activations, with outlier input columns computed in floating point.
- `nf4_linear_class()` (nf4, in nf4.py): a bitsandbytes `Linear4bit` (NF4, double quantization) for QLoRA bases.
- `Int8Embedding`: the token embedding in int8, one scale per row (`quantize_embedding=True`, any mode but nf4).

Every module keeps `in_features`, `out_features`, `bias` and a `weight` tensor, offers `dequantize()`, and
passes gradients to its input (frozen base for LoRA). Float side tensors (scales, zeros, outlier weights) live
in the model's dtype and are rounded to it before the integers are computed, so a reloaded checkpoint
reproduces the in-memory model bit for bit.
"""

from __future__ import annotations

import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ernie45.errors import ErnieError
from ernie45.quant import kernels

GROUP_SIZES = (32, 64, 128)  # 32: GGUF Q4_0's blocks (`ernie45.gguf_load` maps them without requantizing)
INT8_GROUP_SIZES = (32,)  # grouped int8: GGUF Q8_0's blocks (the quantizer writes one scale per row)
# Shrinking a group's range trades clipping of its extremes for finer steps; per group we keep the ratio with
# the smallest squared error (the clip search of AWQ / llama.cpp's k-quants, in its simplest form).
INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)


# ---- tensor quantizers ----------------------------------------------------------------------------
# The quantizers work on blocks of rows: a block (QUANT_CHUNK fp32 values) and its one temporary stay in the
# L2 cache through the many elementwise passes of the clip search, instead of streaming the whole matrix from
# memory once per pass. Rows are independent (int8: one scale per row; int4: groups lie within a row), so the
# result does not depend on the block size. On CPU the blocks are spread over `torch.get_num_threads()` Python
# threads running single-threaded ops: per-op OpenMP teams of tiny work items stall whenever a core is shared.
QUANT_CHUNK = 1 << 18


def _row_blocks(n: int, k: int, device: torch.device) -> list[tuple[int, int]]:
    rows = max(1, (QUANT_CHUNK if device.type == "cpu" else 1 << 26) // max(k, 1))
    return [(r, min(n, r + rows)) for r in range(0, n, rows)]


def _map_blocks(fn, blocks: list[tuple[int, int]], device: torch.device) -> list:
    """[fn(r0, r1) for each block], on CPU in a pool of (this thread's) torch.get_num_threads() threads."""
    prev = torch.get_num_threads()
    threads = min(prev, len(blocks))
    if device.type != "cpu" or threads <= 1:
        return [fn(r0, r1) for r0, r1 in blocks]
    # each worker runs single-threaded ops (an intra-op thread count is per thread, set here explicitly)
    pool = ThreadPoolExecutor(
        threads, thread_name_prefix="ernie45-quant", initializer=torch.set_num_threads, initargs=(1,)
    )
    try:
        return list(pool.map(lambda b: fn(*b), blocks))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(prev)  # the workers' setting is also the default of new threads: restore it


def _block_source(w: Tensor):
    """(r0, r1, scratch) -> rows r0:r1 of `w` as a contiguous fp32 (rows, K) tensor (a view when `w` is one)."""
    w = w.detach()
    if w.dtype == torch.float32 and w.is_contiguous():
        return lambda r0, r1, scratch: w[r0:r1]

    def read(r0: int, r1: int, scratch: Tensor) -> Tensor:
        out = scratch[: (r1 - r0) * w.shape[1]].view(r1 - r0, w.shape[1])
        return out.copy_(w[r0:r1])

    return read


def _set_stats(stats: dict | None, parts: list[tuple[float, float]]) -> None:
    if stats is not None:
        stats["err_sq"] = sum(p[0] for p in parts)  # ||W - dequant(Q)||_F^2
        stats["w_sq"] = sum(p[1] for p in parts)  # ||W||_F^2


def rel_error(stats: dict) -> float:
    """||W - dequant(Q)||_F / ||W||_F from the `stats` a quantizer filled."""
    return math.sqrt(stats["err_sq"]) / max(math.sqrt(stats["w_sq"]), 1e-30)


def quantize_int8_per_channel(
    w: Tensor, dtype: torch.dtype, *, stats: dict | None = None
) -> tuple[Tensor, Tensor]:
    """(N, K) float -> int8 (N, K) and scale (N,) in `dtype`, with w ~= q * scale (symmetric, absmax).

    `stats`, if given, receives `err_sq` = ||W - q * scale||^2 and `w_sq` = ||W||^2 (see `rel_error`).
    """
    n, k = w.shape
    dev = w.device
    q = torch.empty(n, k, dtype=torch.int8, device=dev)
    scale = torch.empty(n, dtype=dtype, device=dev)
    tiny = torch.finfo(dtype).tiny
    rows = _block_source(w)
    local = threading.local()

    def block(r0: int, r1: int) -> tuple[float, float]:
        size = (r1 - r0) * k
        if getattr(local, "size", -1) < size:
            local.size, local.w, local.t = size, torch.empty(size, device=dev), torch.empty(size, device=dev)
        wf = rows(r0, r1, local.w)
        t = local.t[:size].view(r1 - r0, k)
        s = (torch.abs(wf, out=t).amax(dim=1) / 127.0).clamp(min=tiny).to(dtype)
        scale[r0:r1] = s
        sf = s.float()[:, None]
        torch.div(wf, sf, out=t).round_().clamp_(-127, 127)
        q[r0:r1] = t
        if stats is None:
            return 0.0, 0.0
        err = float(t.mul_(sf).sub_(wf).square_().sum())  # fp32 sums are pairwise: accurate enough here
        return err, float(torch.mul(wf, wf, out=t).sum())

    _set_stats(stats, _map_blocks(block, _row_blocks(n, k, dev), dev))
    return q, scale


def check_group_size(group_size: int, in_features: int, name: str = "layer",
                     allowed: tuple[int, ...] = GROUP_SIZES) -> None:
    if group_size not in allowed:
        raise ErnieError(f"group size must be one of {', '.join(map(str, allowed))}, got {group_size}")
    if in_features % group_size:
        leaf = name.rsplit(".", 1)[-1]
        hint = (
            "use --group-size 64"
            if in_features % 64 == 0
            else f"leave such layers in float with --skip {leaf} (Python: skip=[{leaf!r}])"
        )
        raise ErnieError(
            f"{name}: input width {in_features} is not divisible by the group size {group_size}; {hint}"
        )


def quantize_int4_groupwise(
    w: Tensor, group_size: int, dtype: torch.dtype, *, stats: dict | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) float -> packed uint8 (N, K/2), scale and zero (N, K/g) in `dtype`; w ~= (q - 8) * scale + zero.

    Per group, the clip ratio of `INT4_CLIP_RATIOS` with the smallest squared error wins (the first on ties).
    `stats`, if given, receives `err_sq` and `w_sq` as for `quantize_int8_per_channel`.
    """
    n, k = w.shape
    check_group_size(group_size, k)
    dev = w.device
    groups = k // group_size
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=dev)
    scale_out = torch.empty(n, groups, dtype=dtype, device=dev)
    zero_out = torch.empty(n, groups, dtype=dtype, device=dev)
    tiny = torch.finfo(dtype).tiny
    rows = _block_source(w)
    local = threading.local()

    def block(r0: int, r1: int) -> tuple[float, float]:
        m, size = r1 - r0, (r1 - r0) * k
        if getattr(local, "size", -1) < size:
            local.size, local.w, local.t = size, torch.empty(size, device=dev), torch.empty(size, device=dev)
            local.q = torch.empty(size, dtype=torch.int8, device=dev)
        wf = rows(r0, r1, local.w)
        wg = wf.view(m, groups, group_size)
        t = local.t[:size].view(m, groups, group_size)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        best_err = best_scale = best_zero = None
        for r in INT4_CLIP_RATIOS:
            scale = (half * r / 7.5).clamp(min=tiny).to(dtype)  # 15 steps across [mid - r*half, mid + r*half]
            zero = (mid - half * r + 8 * scale.float()).to(dtype)
            s, z = scale.float()[..., None], zero.float()[..., None]
            # err = ((round((w - z) / s + 8) clamped to [0, 15]) - 8) * s + z - w, squared, summed per group
            torch.sub(wg, z, out=t).div_(s).add_(8).round_().clamp_(0, 15)
            err = t.sub_(8).mul_(s).add_(z).sub_(wg).square_().sum(dim=-1)  # (m, K/g)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        s, z = best_scale.float()[..., None], best_zero.float()[..., None]
        torch.sub(wg, z, out=t).div_(s).add_(8).round_().clamp_(0, 15)
        q = local.q[:size].view(m, k)
        q.copy_(t.view(m, k))  # 0..15
        if (
            sys.byteorder == "little"
        ):  # bytes (q_2j, q_2j+1) as int16 v: v | v >> 4 has q_2j | q_2j+1 << 4 low
            v = q.view(torch.int16)
            v |= v >> 4
            packed[r0:r1] = v.view(torch.uint8).view(m, k // 2, 2)[..., 0]
        else:
            packed[r0:r1] = kernels.pack_int4_rowmajor(q)
        scale_out[r0:r1] = best_scale
        zero_out[r0:r1] = best_zero
        if stats is None:
            return 0.0, 0.0
        return float(best_err.sum(dtype=torch.float64)), float(torch.mul(wg, wg, out=t).sum())

    _set_stats(stats, _map_blocks(block, _row_blocks(n, k, dev), dev))
    return packed, scale_out, zero_out


# ---- modules --------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """What every quantized Linear shares: sizes, an optional float bias, `dequantize()`."""

    mode = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = nn.Parameter(
                torch.empty(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) float weight this module computes with (for merges and checks)."""
        raise NotImplementedError

    def _set_bias(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    def _output(self, y2: Tensor, x: Tensor) -> Tensor:
        if self.bias is not None:
            y2 = y2 + self.bias.to(y2.dtype)
        return y2.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int8Linear(QuantLinear):
    """Weight-only int8; activations stay in the model's dtype. `group_size` 0: one scale per output row
    (`weight_scale` (out,), what the quantizer writes); 32: one per group of 32 input columns (`weight_scale`
    (out, in/32): GGUF Q8_0's blocks, w = q * d). Grouped weights multiply as dequantised tiles on PyTorch's path
    (`_weight_int8pack_mm` takes one scale per row) and with exact int32 sums per group in the C decode step."""

    mode = "wint8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        group_size: int | None = 0,
    ):
        group_size = int(group_size or 0)
        if group_size:
            check_group_size(group_size, in_features, allowed=INT8_GROUP_SIZES)
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        shape = (out_features, in_features // group_size) if group_size else (out_features,)
        self.register_buffer("weight_scale", torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def from_float(
        cls, linear: nn.Linear, dtype: torch.dtype | None = None, *, stats: dict | None = None, group_size: int = 0
    ) -> Int8Linear:
        """`stats`: filled with the weight error, see `quantize_int8_per_channel`. `group_size` 32: absmax per
        group of 32 columns (each group quantized as a row of its own)."""
        dtype = dtype or linear.weight.dtype
        n, k = linear.out_features, linear.in_features
        m = cls(k, n, linear.bias is not None, dtype, device="meta", group_size=group_size)
        if m.group_size:
            q, s = quantize_int8_per_channel(linear.weight.detach().reshape(-1, m.group_size), dtype, stats=stats)
            m.weight, m.weight_scale = q.view(n, k), s.view(n, k // m.group_size)
        else:
            m.weight, m.weight_scale = quantize_int8_per_channel(linear.weight, dtype, stats=stats)
        m._set_bias(linear, dtype)
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return kernels.dequantize_int8(self.weight, self.weight_scale, self.group_size, dtype or self.compute_dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if not self.weight.is_meta and self.weight.data_ptr() % kernels.ALIGNMENT:
            self.weight = (
                self.weight.clone()
            )  # memory-mapped tensors are rarely aligned as the CPU kernel needs

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.group_size:
            return self._output(kernels.int8_group_mm(x2, self.weight, self.weight_scale, self.group_size), x)
        return self._output(kernels.int8_weight_mm(x2, self.weight, self.weight_scale), x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", group_size={self.group_size}" if self.group_size else "")


class Int4Linear(QuantLinear):
    """Weight-only int4, asymmetric per group; where PyTorch's CPU int4 kernel runs (`int4pack_usable`: AVX-512
    builds, not AVX2-only CPUs) the weight is re-laid out for `_weight_int4pack_mm_for_cpu` at the first forward
    (same bytes, permuted) and saved back row-major."""

    mode = "wint4"
    # Set by the C decoder, which reads the row-major weight: converting it for PyTorch's kernel would hold a
    # second copy, so prefill multiplies dequantised tiles instead (`kernels.int4_weight_mm`).
    keep_rowmajor = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        group_size: int = 128,
    ):
        check_group_size(group_size, in_features, allowed=GROUP_SIZES)
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer(
            "weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("weight_zero", torch.empty(out_features, groups, dtype=dtype, device=device))
        self._layout = kernels.ROWMAJOR_INT4_LAYOUT
        self._kernel_sz: tuple[torch.dtype, Tensor] | None = None

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        dtype: torch.dtype | None = None,
        group_size: int = 128,
        *,
        stats: dict | None = None,
    ) -> Int4Linear:
        """`stats`: filled with the weight error, see `quantize_int4_groupwise`."""
        dtype = dtype or linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, "meta", group_size)
        m.weight, m.weight_scale, m.weight_zero = quantize_int4_groupwise(
            linear.weight, group_size, dtype, stats=stats
        )
        m._set_bias(linear, dtype)
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return kernels.dequantize_int4(
            self.weight,
            self.weight_scale,
            self.weight_zero,
            self.group_size,
            self._layout,
            dtype or self.compute_dtype,
        )

    def _to_rowmajor(self) -> None:
        if self._layout != kernels.ROWMAJOR_INT4_LAYOUT:
            with (
                torch.inference_mode(False),
                torch.no_grad(),
            ):  # a plain tensor, usable outside inference mode
                self.weight = kernels.from_cpu_int4_layout(self.weight).contiguous()
            self._layout = kernels.ROWMAJOR_INT4_LAYOUT
        self._kernel_sz = None

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() see the portable layout
        self._to_rowmajor()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._layout != kernels.ROWMAJOR_INT4_LAYOUT:
            destination[prefix + "weight"] = kernels.from_cpu_int4_layout(self.weight)

    def _load_from_state_dict(self, *args, **kwargs):
        self._to_rowmajor()
        super()._load_from_state_dict(*args, **kwargs)

    def _kernel_inputs(self, x2: Tensor) -> Tensor | None:
        """Switch to the CPU kernel layout once, and cache the kernel's (K/g, N, 2) scales for x's dtype."""
        if (
            self.keep_rowmajor
            or kernels.wants_autograd(x2)
            or not kernels.int4pack_usable(
                self.weight.device, self.out_features, self.in_features, self.group_size
            )
        ):
            return None
        kdtype = torch.bfloat16 if x2.dtype == torch.float32 else x2.dtype
        with torch.inference_mode(False), torch.no_grad():  # cached tensors must outlive inference mode
            if self._layout == kernels.ROWMAJOR_INT4_LAYOUT:
                self.weight = kernels.to_cpu_int4_layout(self.weight)
                self._layout = kernels.CPU_INT4_LAYOUT
            if self._kernel_sz is None or self._kernel_sz[0] != kdtype:
                self._kernel_sz = (
                    kdtype,
                    kernels.int4_scales_and_zeros(self.weight_scale, self.weight_zero, kdtype),
                )
        return self._kernel_sz[1]

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        sz = self._kernel_inputs(x2)
        y = kernels.int4_weight_mm(
            x2, self.weight, self._layout, self.weight_scale, self.weight_zero, self.group_size, sz
        )
        return self._output(y, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class LLMInt8Linear(QuantLinear):
    """LLM.int8(): int8 weights (per output row) x int8 activations (per token), outlier columns in float.

    Two kinds of outlier input columns are multiplied in float instead of int8:
    - calibrated ones (`outlier_idx`): columns whose calibration absmax reached `threshold`; their weights are
      kept in float (`weight_outlier`) and zeroed in the int8 matrix;
    - per batch, like bitsandbytes `Linear8bitLt`: any other column holding a value with |x| >= threshold,
      multiplied against its dequantised int8 weights (this alone is the uncalibrated mode).
    `input_clip` (> 0 when calibrated) caps each token's activation range; 0 means the token's absmax.
    """

    mode = "llm.int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        threshold: float = 6.0,
        n_outliers: int = 0,
    ):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.threshold = float(threshold)
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("outlier_idx", torch.empty(n_outliers, dtype=torch.int64, device=device))
        self.register_buffer(
            "weight_outlier", torch.empty(out_features, n_outliers, dtype=dtype, device=device)
        )
        self.register_buffer("input_clip", torch.zeros(1, dtype=dtype, device=device))
        self._clip: float | None = None

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        dtype: torch.dtype | None = None,
        threshold: float = 6.0,
        outliers: Tensor | None = None,
        clip: float = 0.0,
        *,
        stats: dict | None = None,
    ) -> LLMInt8Linear:
        """`outliers`: calibrated outlier column indices (None: none); `clip`: calibrated activation cap;
        `stats`: filled with the error of the int8 matrix when there are no outlier columns (else left empty)."""
        dtype = dtype or linear.weight.dtype
        w = linear.weight.detach()
        idx = torch.empty(0, dtype=torch.int64) if outliers is None else outliers.to(torch.int64).unique()
        idx = idx.to(w.device)
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            dtype,
            "meta",
            threshold,
            idx.numel(),
        )
        if idx.numel():
            m.weight, m.weight_scale = quantize_int8_per_channel(w.float().index_fill(1, idx, 0.0), dtype)
        else:  # the same numbers without the fp32 copy
            m.weight, m.weight_scale = quantize_int8_per_channel(w, dtype, stats=stats)
        m.outlier_idx = idx
        m.weight_outlier = w[:, idx].float().to(dtype)
        m.input_clip = torch.tensor([clip], dtype=dtype, device=w.device)
        m._set_bias(linear, dtype)
        return m

    def _load_from_state_dict(self, *args, **kwargs):
        self._clip = None
        super()._load_from_state_dict(*args, **kwargs)

    def _clip_value(self) -> float:
        if self._clip is None:  # one host read, not one per call (a sync on CUDA)
            self._clip = float(self.input_clip.float().item())
        return self._clip

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        w = self.weight.float() * self.weight_scale.float()[:, None]
        if self.outlier_idx.numel():
            w[:, self.outlier_idx] = self.weight_outlier.float()
        return w.to(dtype or self.compute_dtype)

    def _batch_outliers(self, x2: Tensor) -> Tensor:
        """Columns of this batch with |x| >= threshold that are not calibrated outliers."""
        hit = (x2.abs() >= self.threshold).any(dim=0)  # (K,)
        if self.outlier_idx.numel():
            hit[self.outlier_idx] = False
        return hit.nonzero().squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if kernels.wants_autograd(x2):  # no gradient through rounding: differentiate the dequantised product
            return self._output(F.linear(x2, self.dequantize(x.dtype)), x)
        static, extra = self.outlier_idx, self._batch_outliers(x2)
        x_in = x2
        if static.numel():
            x_in = x_in.index_fill(1, static, 0)
        if extra.numel():
            x_in = x_in.index_fill(1, extra, 0)
        xq, step = kernels.quantize_rows_int8(x_in, self._clip_value())
        acc = kernels.int8_int8_mm(xq, self.weight)  # (M, N) int32
        y = (acc.float() * step[:, None] * self.weight_scale.float()).to(x.dtype)
        if static.numel():
            y = y + x2[:, static] @ self.weight_outlier.to(x.dtype).t()
        if extra.numel():
            w_extra = self.weight[:, extra].to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]  # (N, n)
            y = y + x2[:, extra] @ w_extra.t()
        return self._output(y, x)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", threshold={self.threshold}, "
            f"calibrated_outliers={self.outlier_idx.numel()}"
        )


class QuantEmbedding(nn.Module):
    """A frozen token embedding held quantized: `_dequant` of its `_tensors` (in that order) gives rows in fp32
    arithmetic, rounded once to the model dtype (the dtype of `weight_scale`); a lookup dequantizes only the rows
    asked for."""

    _tensors: tuple[str, ...] = ("weight", "weight_scale")

    def _dequant(self, *tensors: Tensor, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (num_embeddings, embedding_dim) float table this module looks rows up in."""
        return self._dequant(*(getattr(self, n) for n in self._tensors), dtype=dtype or self.compute_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = self._dequant(*(getattr(self, n).index_select(0, flat) for n in self._tensors),
                             dtype=self.compute_dtype)  # (T, H)
        return rows.view(*ids.shape, self.embedding_dim)


class Int8Embedding(QuantEmbedding):
    """A frozen token embedding held in int8, one scale per vocabulary row (symmetric absmax: the quantizer of
    wint8's `Int8Linear`, `quantize_int8_per_channel`): V x H bytes plus V scales instead of 2 V x H in bf16.
    `group_size` 32: one scale per 32 columns (`weight_scale` (V, H/32)), as a GGUF's Q8_0 token_embd, filled by
    `ernie45.gguf_load` without requantizing; a head tied to it is an `Int8Linear` of the same groups over the same
    tensors (`tie_head`).

    Row v is `weight[v] * weight_scale[v]` (per group), computed in fp32 and rounded once to the model dtype (the
    dtype of `weight_scale`); the C decode step (`ernie45/csrc/decode.c`) reproduces it bit for bit. Inference only
    (no gradient reaches it). `ernie45.quant.quantize_model(..., quantize_embedding=True)` swaps it in.
    """

    mode = "int8"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        padding_idx: int | None = None,
        group_size: int | None = 0,
    ):
        super().__init__()
        group_size = int(group_size or 0)
        if group_size:
            check_group_size(group_size, embedding_dim, "token embedding", allowed=INT8_GROUP_SIZES)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.group_size = group_size
        self.register_buffer(
            "weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        )
        shape = (num_embeddings, embedding_dim // group_size) if group_size else (num_embeddings,)
        self.register_buffer("weight_scale", torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def from_float(
        cls, embedding: nn.Embedding, dtype: torch.dtype | None = None, *, stats: dict | None = None
    ) -> Int8Embedding:
        """`stats`: filled with the weight error, see `quantize_int8_per_channel`."""
        w = embedding.weight.detach()
        dtype = dtype or w.dtype
        m = cls(w.shape[0], w.shape[1], dtype, "meta", getattr(embedding, "padding_idx", None))
        m.weight, m.weight_scale = quantize_int8_per_channel(w, dtype, stats=stats)
        return m

    def tie_head(self, head: Int8Linear) -> None:
        """Make the output head (an Int8Linear of the same groups) compute with this table's tensors."""
        if type(head) is not Int8Linear or not self.group_size or head.group_size != self.group_size:
            raise ErnieError("an int8 embedding can only be tied to an int8 head, both with groups of "
                             f"{self.group_size or 32} columns")
        head.weight, head.weight_scale = self.weight, self.weight_scale

    def _dequant(self, weight: Tensor, scale: Tensor, *, dtype: torch.dtype) -> Tensor:
        return kernels.dequantize_int8(weight, scale, self.group_size, dtype)

    def extra_repr(self) -> str:
        how = f"int8 groups of {self.group_size}" if self.group_size else "int8 per row"
        return f"{self.num_embeddings}, {self.embedding_dim}, {how}"


class Int4Embedding(QuantEmbedding):
    """A frozen token embedding held as wint4 groups (Int4Linear's row-major layout: nibbles, a scale and a zero per
    group of columns), as llama.cpp's Q4_0 files hold `token_embd`: `ernie45.gguf_load` fills it without
    requantizing (V x H / 2 bytes instead of 2 V x H in bf16). Where the embedding is tied to the output head, the
    head is an `Int4Linear` over the same three tensors (`ErnieForCausalLM.tie_weights`): one copy serves both.

    Row v is `Int4Linear.dequantize()`'s row v (w = (q - 8) * scale + zero, in fp32), rounded once to the model dtype
    (the dtype of `weight_scale`); the C decode step reproduces it bit for bit. Inference only.
    """

    mode = "int4"
    _tensors = ("weight", "weight_scale", "weight_zero")

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, padding_idx: int | None = None, group_size: int = 32):
        super().__init__()
        check_group_size(group_size, embedding_dim, "token embedding")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.group_size = group_size
        groups = embedding_dim // group_size
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, groups, dtype=dtype, device=device))
        self.register_buffer("weight_zero", torch.empty(num_embeddings, groups, dtype=dtype, device=device))

    def tie_head(self, head: Int4Linear) -> None:
        """Make the output head (an Int4Linear of the same group size) compute with this table's tensors; it stays
        row-major, since PyTorch's int4 kernel layout would be a second copy."""
        if type(head) is not Int4Linear or head.group_size != self.group_size:
            raise ErnieError(f"an int4 embedding can only be tied to an int4 head of group {self.group_size}")
        head.weight, head.weight_scale, head.weight_zero = self.weight, self.weight_scale, self.weight_zero
        head.keep_rowmajor = True

    def _dequant(self, weight: Tensor, scale: Tensor, zero: Tensor, *, dtype: torch.dtype) -> Tensor:
        return kernels.dequantize_int4(weight, scale, zero, self.group_size, kernels.ROWMAJOR_INT4_LAYOUT, dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 groups of {self.group_size}"
