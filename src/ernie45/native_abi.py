"""The interface of the C kernels in `csrc/decode.c`: ctypes mirrors of its structs, the weight kinds, and
`dequant_rows`, the one-pass widening of weight rows to fp32; and `qmm`, the integer prefill product of
`csrc/qmm.c`.

Shared by the C decode step (`ernie45.fast.FastDecoder`) and the quantized Linears' prefill
(`ernie45.quant.kernels`), and kept apart from both, so that neither module imports the other.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from ctypes import c_float, c_int, c_void_p

import torch
from torch import Tensor

from ernie45 import native

W_F32, W_BF16, W_I8, W_I4 = 0, 1, 2, 3  # Linear.kind: how a weight is stored
_SDT = {torch.float32: 0, torch.bfloat16: 1}  # Linear.sdt: the dtype of the scales and zeros the C kernels read


class _Linear(ctypes.Structure):
    # scale / zero: the quantized module's own tensors, read in place in their dtype `sdt` (_SDT); group: columns
    # per scale (int4: its group size; int8: 0 for one scale per row (scale [out]), 32 for [out][in/32])
    _fields_ = [("kind", c_int), ("out", c_int), ("in_", c_int), ("group", c_int), ("sdt", c_int), ("w", c_void_p),
                ("scale", c_void_p), ("zero", c_void_p), ("bias", c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", c_void_p), ("ln2", c_void_p), ("q", _Linear), ("k", _Linear), ("v", _Linear),
                ("o", _Linear), ("is_moe", c_int), ("gate", _Linear), ("up", _Linear), ("down", _Linear),
                ("n_experts", c_int), ("top_k", c_int), ("norm_min", c_float), ("router", c_void_p),
                ("corr", c_void_p), ("experts", c_void_p), ("has_shared", c_int), ("sgate", _Linear),
                ("sup", _Linear), ("sdown", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [("hidden", c_int), ("n_layers", c_int), ("n_heads", c_int), ("n_kv", c_int), ("head_dim", c_int),
                ("vocab", c_int), ("bf16", c_int), ("n_threads", c_int), ("eps", c_float), ("theta", c_float),
                ("embed", c_void_p), ("embed_kind", c_int), ("embed_sdt", c_int), ("embed_scale", c_void_p),
                ("embed_zero", c_void_p), ("embed_group", c_int),
                ("norm", c_void_p), ("head", _Linear), ("layers", c_void_p),
                ("max_width", c_int), ("max_experts", c_int), ("scratch", c_void_p), ("scratch_len", c_int),
                ("scores", c_void_p), ("want", c_void_p),
                # an MTP layer run as a one-layer model (`ernie45.fast.MTPStep`): its input norms and projection
                ("mtp_enorm", c_void_p), ("mtp_hnorm", c_void_p), ("mtp_proj", _Linear), ("mtp_zero0", c_int),
                ("mtp_ids", c_void_p)]


_TILES = threading.local()


def tile_buffer(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A (rows, cols) view of this thread's reusable buffer for `dtype`, for a transient dequantised tile (used and
    dropped before the next one is asked for). Tiles of varying sizes allocated and freed per GEMM fragment glibc's
    heap: over a 512-token prefill of the 21B-A3B layers (64 experts a layer, each a few tiles) the resident set
    grew by ~450 MB, tile by tile."""
    bufs = getattr(_TILES, "bufs", None)
    if bufs is None:
        bufs = _TILES.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = bufs[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buf[: rows * cols].view(rows, cols)


def dequant_rows(kind: int, weight: Tensor, out_features: int, in_features: int, scale: Tensor | None = None,
                 zero: Tensor | None = None, group: int = 0, isa: str | None = None,
                 transient: bool = False) -> Callable[[int, int], Tensor] | None:
    """A `weight_rows(i, j)` for `ernie45.quant.kernels.tiled_mm` that widens rows i:j to fp32 with the C kernel
    `ernie_dequant` (one pass, both cores, the same values as the PyTorch dequantisation, ~6x faster), or None
    where the C kernels are not built. int4 weights must be row-major, w = (q - 8) * scale + zero; int8
    w = q * scale (scale (out,) with `group` 0, else (out, in/group)). `scale` and `zero` are read in place when
    fp32 or bf16 (one dtype) and contiguous, else widened to fp32 (exact, so the same values). `isa`: the kernels' ISA level (default `ERNIE45_ISA`).
    `transient`: each tile is written into this thread's reusable buffer (`tile_buffer`), valid until the next call
    (what `tiled_mm` needs; never for a tile a caller keeps)."""
    lib = native.load("decode", isa)
    if lib is None or weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    if scale is not None:
        if scale.device.type != "cpu" or (zero is not None and zero.device.type != "cpu"):
            return None
        if scale.dtype not in _SDT or (zero is not None and zero.dtype != scale.dtype):
            scale, zero = scale.float(), None if zero is None else zero.float()
        scale, zero = scale.contiguous(), None if zero is None else zero.contiguous()
    L = _Linear(kind=kind, out=out_features, in_=in_features, group=group, w=weight.data_ptr(),
                sdt=_SDT[scale.dtype] if scale is not None else 0,
                scale=scale.data_ptr() if scale is not None else None,
                zero=zero.data_ptr() if zero is not None else None)

    def weight_rows(i: int, j: int, keep=(weight, scale, zero)) -> Tensor:  # `keep`: the tensors outlive L
        out = tile_buffer(j - i, in_features, torch.float32) if transient else torch.empty(j - i, in_features)
        if lib.ernie_dequant(ctypes.addressof(L), i, j, out.data_ptr(), torch.get_num_threads()) != 0:
            raise RuntimeError("C dequantisation failed")
        return out

    return weight_rows


def qmm_simd(isa: str | None = None) -> int:
    """What `csrc/qmm.c` runs here: 2 = AVX2 + VNNI, 1 = AVX2, 0 = the plain C loops or not built (the callers in
    `ernie45.quant.kernels` use it only where it is vectorised)."""
    lib = native.load("qmm", isa)
    return lib.ernie_qmm_simd() if lib is not None else 0


def qmm(x2: Tensor, kind: int, weight: Tensor, scale: Tensor, zero: Tensor | None, group: int,
        isa: str | None = None) -> Tensor | None:
    """(M, K) float activations times an (N, K) int4 (row-major packed, w = (q - 8) * scale + zero, groups of
    `group`) or int8 (w = q * scale; scale (N,) with group 0, (N, K/32) with group 32) weight -> (M, N) fp32, with
    the activations quantized per row as `csrc/qmm.c` describes; None where the kernel is not built or the shape is
    not one it takes."""
    lib = native.load("qmm", isa)
    if lib is None or x2.device.type != "cpu" or weight.device.type != "cpu":
        return None
    n = weight.shape[0]
    k = weight.shape[1] * (2 if kind == W_I4 else 1)
    if x2.shape[0] == 0:
        return torch.empty(0, n)
    xf = x2.float().contiguous()
    sc = scale.float().contiguous()
    zr = zero.float().contiguous() if zero is not None else None
    w = weight.contiguous()
    y = torch.empty(xf.shape[0], n)
    rc = lib.ernie_qmm(kind, w.data_ptr(), sc.data_ptr(), zr.data_ptr() if zr is not None else None, n, k, group,
                       xf.data_ptr(), xf.shape[0], y.data_ptr(), torch.get_num_threads())
    if rc == -2:
        return None
    if rc != 0:
        raise MemoryError("the integer prefill product could not allocate its scratch")
    return y
