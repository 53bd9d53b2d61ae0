"""Inference-only speedups for a loaded CPU model (never used for training or saving).

1. `FastDecoder`: batch-1 decode steps run by the C kernels of `ernie45/csrc/decode.c` (one call per token,
   fused dequantising GEMVs for bf16 / wint8 / wint4), reading the model's own weight tensors in place.
2. `DnnLinear`: oneDNN's GEMM on the plain weight (no copy) for prefill next to the C decoder; `PackedLinear`:
   oneDNN pre-packed Linears, used where the C kernels are unavailable (no compiler).
3. `UpcastLinear`: bf16 Linears that multiply in fp32 on CPUs without AVX512-BF16/AMX, where PyTorch emulates
   bf16 matmuls (0.3B model, 512-token prefill, 2 threads, acting as an AVX2 CPU: 104 tok/s in bf16, 330 with
   `UpcastLinear`, 375 in fp32).

On CPU, oneDNN runs a Linear whose weight was re-laid out once ("pre-packed") much faster at batch-1 decode
than `F.linear` on the plain weight: MKL's fp32 GEMV does not use the second core (15.7 GB/s with 1 or 2 threads
on a 480 MB set of 3072x1024 projections) while the packed oneDNN kernel reaches 27.5 GB/s with 2 threads; in
bf16 (CPUs with AVX512-BF16 / AMX) packing gives ~1.6x, with bit-identical results. fp32 results differ from
`F.linear` only by summation order (~1e-6 relative). PyTorch exposes the packing only inside Inductor, so we call
the same oneDNN ops directly.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from ctypes import c_int, c_void_p

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ernie45.checkpoint import decode_stream_names, hugepage_buffer, release_pages
from ernie45.device import cpu_has_fast_bf16
from ernie45.native_abi import _SDT, W_BF16, W_F32, W_I4, W_I8, _Layer, _Linear, _Model, dequant_rows
from ernie45.quant.kernels import tiled_mm

log = logging.getLogger("ernie45")
# Up to this many rows `UpcastLinear` keeps PyTorch's bf16 GEMV: memory-bound, it reads half the bytes of the fp32
# one. On an AVX2-only CPU (emulated), 3072x1024, one thread, ms: bf16 F.linear 0.25 / 0.72 / 0.94 / 1.96 at
# 1 / 3 / 4 / 8 rows, fp32 tiles 0.47 / 0.85 / 0.91 / 1.07; at 512 rows 117 against 31.
UPCAST_MAX_BF16_ROWS = 4


class PackedLinear(nn.Module):
    """A frozen fp32/bf16 Linear whose weight is held in oneDNN's blocked layout (an opaque tensor)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class DnnLinear(nn.Module):
    """A frozen fp32/bf16 Linear multiplied by oneDNN on its plain weight (the Linear's own parameter: no copy),
    for prefill next to the C decoder, which reads that same weight. oneDNN's GEMM takes the plain layout as fast as
    a pre-packed one from 8 rows up and ~2.4x faster than MKL's fp32 `F.linear` (3072x1024, 512 rows, 2 threads:
    7.3 / 7.5 / 17.6 ms fp32 unpacked / packed / F.linear; bf16 3.5 / 3.3 / 3.5)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class UpcastLinear(nn.Module):
    """A frozen bf16 Linear for CPUs without fast bf16: inputs of more than UPCAST_MAX_BF16_ROWS rows are
    multiplied in fp32, the weight upcast one tile of output rows at a time (`tiled_mm`: a bounded fp32
    temporary), the result rounded to bf16.

    `weight` and `bias` are the Linear's own parameters (no copy; tied weights stay tied, the state dict is
    unchanged), so the C decode step reads it like a plain bf16 Linear.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= UPCAST_MAX_BF16_ROWS:
            return F.linear(x, self.weight, self.bias)
        rows = dequant_rows(W_BF16, self.weight, self.out_features, self.in_features, transient=True)
        y = tiled_mm(x2, self.out_features, rows or (lambda i, j: self.weight[i:j].float()), torch.float32)
        if self.bias is not None:
            y += self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _can_pack(model: nn.Module) -> bool:
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return model.dtype == torch.float32 or (model.dtype == torch.bfloat16 and cpu_has_fast_bf16())


def _needs_upcast(model: nn.Module) -> bool:
    return model.device.type == "cpu" and model.dtype == torch.bfloat16 and not cpu_has_fast_bf16()


def optimize_for_inference(model: nn.Module, native: bool = True, pack: bool | None = None) -> int:
    """Make CPU inference fast; returns how many Linears were swapped (oneDNN, pre-packed or upcast).

    `native`: attach a `FastDecoder` as `model.fast_decoder` (the C kernels; `ernie45.generation` uses it for
    batch-1 decode steps) when a C compiler is available. `pack`: pre-pack fp32/bf16 Linears for oneDNN. By
    default (None) it packs only where no C decoder runs: next to it a packed Linear would be a second copy of the
    weight (the decoder reads the plain one), so Linears become `DnnLinear`s, oneDNN on the plain weight, which
    prefills as fast as the packed ones. A packed Linear's plain weight is released. bf16 models on CPUs without
    fast bf16 get `UpcastLinear`s instead (no copy). A no-op on CUDA and in fp16.
    The model becomes inference-only: call this last.
    """
    decoder = FastDecoder.attach(model) if native else None
    if _needs_upcast(model):
        return upcast_linears(model)
    if pack is None:
        pack = decoder is None
    return pack_linears(model) if pack else dnn_linears(model)


def _plain_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, child) of every plain nn.Linear; quantized, LoRA (PEFT) and router layers are left out."""
    return [
        (mod, name, child)
        for mod in model.modules()
        if not type(mod).__module__.startswith("peft")
        for name, child in mod.named_children()
        if type(child) is nn.Linear
    ]


def pack_linears(model: nn.Module) -> int:
    """Swap every plain fp32/bf16 Linear for a `PackedLinear`; quantized, LoRA and router layers stay.

    The plain weight is dropped (its arena pages returned to the system) unless something else uses it: the C
    decoder, or a tied embedding."""
    if not _can_pack(model):
        return 0
    dec = getattr(model, "fast_decoder", None)
    used = {t.data_ptr() for t in dec._keep if isinstance(t, Tensor)} if dec is not None else set()
    used.add(model.model.embed_tokens.weight.data_ptr())
    swapped = 0
    for mod, name, child in _plain_linears(model):
        try:
            setattr(mod, name, PackedLinear(child))
        except RuntimeError:  # oneDNN refused this shape/CPU: keep the plain Linear
            continue
        if child.weight.data_ptr() not in used:
            release_pages(child.weight, getattr(model, "weight_arenas", []))
        swapped += 1
    return swapped


def dnn_linears(model: nn.Module) -> int:
    """Swap every plain fp32/bf16 Linear for a `DnnLinear` (oneDNN on the same weight, no copy)."""
    return _swap_plain_linears(model, DnnLinear) if _can_pack(model) else 0


def upcast_linears(model: nn.Module) -> int:
    """Swap every plain bf16 Linear of a CPU model for an `UpcastLinear` (for CPUs without fast bf16)."""
    return _swap_plain_linears(model, UpcastLinear) if _needs_upcast(model) else 0


def _swap_plain_linears(model: nn.Module, cls: type[nn.Module]) -> int:
    found = _plain_linears(model)
    for mod, name, child in found:
        setattr(mod, name, cls(child))
    return len(found)


# ---- the C decode step ----------------------------------------------------------------------------------
# One C step at a time in the process: a decoder's scratch area and thread count are shared by every thread that
# decodes with its model (the web UI, LangChain, user threads), and the profiling counters by all decoders. Each
# step already runs on torch's threads, so steps of two models at once would only contend for the same cores.
_STEP_LOCK = threading.Lock()

# A prompt ending within this many positions is prefilled as the rows of one C step (`FastDecoder.prefill`, and the
# server's steps with nothing decoding, up to this many prompt tokens in all): every weight read once, integer
# tiles, against PyTorch's per-expert loops and one-prompt GEMMs (2 threads, one 128-token prompt: 0.3b wint4
# 1095-1158 against 743-898 tok/s, moe wint4 1920 against 851, 0.3b bf16 1357 against 1211). Past ~256 positions
# the rows' attention, one row at a time, costs more than PyTorch's blocked attention saves (0.3b wint4 at 512: 873
# against 1017 tok/s), and past ~256 rows in one step PyTorch's batched GEMMs catch up (0.3b wint4, 4 prompts of
# 128: 955 against 1038; moe wint4 still 1744 against 1305).
ROWS_PREFILL_MAX = 256
GEMV_ROWS = 64  # rows per call of `FastDecoder.gemv` (an MTP layer's first run covers the whole prompt)


class Unsupported(Exception):
    """The model has a part the C step does not implement (the PyTorch path is used instead)."""


class FastDecoder:
    """Runs one batch-1 decode step (token -> next-token logits, K/V written into the `KVCache`) in C;
    `step_batch` runs one step of B sequences over a paged KV cache, each row bitwise equal to its batch-1 step.

    Same numerics as the PyTorch forward (fp32 maths, bf16 rounding where PyTorch materialises bf16 tensors),
    so greedy tokens match it; supports fp32/bf16 models with plain, wint8 and wint4 Linears, dense and MoE.
    Weights are read from the model's tensors in place (no copy), except that int4 weights already converted to
    PyTorch's CPU kernel layout are kept once more in the portable row-major layout.
    """

    def __init__(self, model: nn.Module, lib: ctypes.CDLL):
        from ernie45.quant.linear import Int4Embedding, Int8Embedding

        cfg = model.config
        if cfg.head_dim > 512:
            raise Unsupported("head_dim > 512")
        self._lib, self._keep = lib, []
        self.int4_modules: list[nn.Module] = []  # kept row-major for C once attached (`Int4Linear.keep_rowmajor`)
        self._pools = None  # step_batch: the last page pools checked, and their pointer arrays
        self.isa = lib.ernie_isa().decode()  # what the kernels were built for, e.g. "avx2+fma"
        self.bf16 = model.dtype == torch.bfloat16
        self.vocab = cfg.vocab_size
        inner = model.model
        layers = (_Layer * cfg.num_hidden_layers)()
        widths, slots = [cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim], 1
        for i, layer in enumerate(inner.layers):
            slots = max(slots, self._layer(layer, layers[i], widths))
        self._keep.append(layers)
        # the token embedding: a plain table in the model dtype (Model.embed_kind 0), an `Int8Embedding` (W_I8:
        # int8 rows and one scale per row, in the model dtype, both read in place) or an `Int4Embedding` (W_I4:
        # Int4Linear's layout, its scales and zeros read in place)
        emb = inner.embed_tokens
        embed = emb.weight.detach()
        width = cfg.hidden_size // 2 if type(emb) is Int4Embedding else cfg.hidden_size
        if embed.device.type != "cpu" or not embed.is_contiguous() or tuple(embed.shape) != (cfg.vocab_size, width):
            raise Unsupported("embedding dtype/layout")
        embed_kind, embed_sdt, embed_scale, embed_zero, embed_group = 0, 0, None, None, 0
        if type(emb) is Int8Embedding:  # one scale per row, or per group of columns (embed_group)
            scale, embed_group = emb.weight_scale, emb.group_size
            rows = (cfg.vocab_size, cfg.hidden_size // embed_group) if embed_group else (cfg.vocab_size,)
            if embed.dtype != torch.int8 or scale.dtype != model.dtype or tuple(scale.shape) != rows:
                raise Unsupported("int8 embedding dtype/shape")
            embed_kind, embed_sdt, embed_scale = W_I8, self._in_place(scale), scale.data_ptr()
        elif type(emb) is Int4Embedding:
            groups = (cfg.vocab_size, cfg.hidden_size // emb.group_size)
            if (embed.dtype != torch.uint8 or emb.weight_scale.dtype != model.dtype
                    or tuple(emb.weight_scale.shape) != groups or tuple(emb.weight_zero.shape) != groups):
                raise Unsupported("int4 embedding dtype/shape")
            embed_kind, embed_sdt, embed_group = W_I4, self._in_place(emb.weight_scale, emb.weight_zero), emb.group_size
            embed_scale, embed_zero = emb.weight_scale.data_ptr(), emb.weight_zero.data_ptr()
        elif embed.dtype != model.dtype:
            raise Unsupported("embedding dtype/layout")
        self._keep.append(embed)
        widths.append(model.lm_head.in_features)  # the logits go to the caller's buffer: no vocab-wide scratch
        m = _Model(hidden=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                   n_kv=cfg.num_key_value_heads, head_dim=cfg.head_dim, vocab=cfg.vocab_size, bf16=int(self.bf16),
                   n_threads=1, eps=cfg.rms_norm_eps, theta=cfg.rope_theta, embed=embed.data_ptr(),
                   embed_kind=embed_kind, embed_sdt=embed_sdt, embed_scale=embed_scale, embed_zero=embed_zero,
                   embed_group=embed_group,
                   norm=self._f32(inner.norm.weight), head=self._linear(model.lm_head, []),
                   layers=ctypes.addressof(layers), max_width=max(widths), max_experts=slots)
        self._m = m
        lib.ernie_step.argtypes = [ctypes.POINTER(_Model), c_int, c_int, c_int, ctypes.POINTER(c_void_p),
                                   ctypes.POINTER(c_void_p), c_void_p]
        lib.ernie_step.restype = c_int
        # (model, B, tokens, positions, k pages, v pages, tables, table stride, block size, logits)
        lib.ernie_step_batch.argtypes = [ctypes.POINTER(_Model), c_int, c_void_p, c_void_p, ctypes.POINTER(c_void_p),
                                         ctypes.POINTER(c_void_p), c_void_p, c_int, c_int, c_void_p]
        lib.ernie_step_batch.restype = c_int
        # the same with int8 pages: (model, B, tokens, positions, k pages, v pages, k scales, v scales, tables,
        # table stride, block size, logits)
        lib.ernie_step_batch_q8.argtypes = [ctypes.POINTER(_Model), c_int, c_void_p, c_void_p,
                                            *[ctypes.POINTER(c_void_p)] * 4, c_void_p, c_int, c_int, c_void_p]
        lib.ernie_step_batch_q8.restype = c_int
        # float pages storing each new row as its int8 round trip (the arguments of ernie_step_batch)
        lib.ernie_step_batch_rt.argtypes = lib.ernie_step_batch.argtypes
        lib.ernie_step_batch_rt.restype = c_int
        # ernie_step_batch's arguments + (hidden out (B, H) fp32, 1: pre-norm / 0: post-norm)
        lib.ernie_step_batch_h.argtypes = [*lib.ernie_step_batch.argtypes, c_void_p, c_int]
        lib.ernie_step_batch_h.restype = c_int
        # ernie_step_batch_q8's arguments + (hidden out, pre-norm flag)
        lib.ernie_step_batch_q8_h.argtypes = [*lib.ernie_step_batch_q8.argtypes, c_void_p, c_int]
        lib.ernie_step_batch_q8_h.restype = c_int
        # (model, B, tokens, h_in, positions, rope offset, k pages, v pages, tables, table stride, block size,
        # logits, hidden out): an MTP layer's rows (`mtp_step`)
        lib.ernie_mtp_batch.argtypes = [ctypes.POINTER(_Model), c_int, c_void_p, c_void_p, c_void_p, c_int,
                                        ctypes.POINTER(c_void_p), ctypes.POINTER(c_void_p), c_void_p, c_int, c_int,
                                        c_void_p, c_void_p]
        lib.ernie_mtp_batch.restype = c_int
        # (model, Linear, x, y): one GEMV (`gemv`)
        lib.ernie_gemv_batch.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Linear), c_int, c_void_p, c_void_p]
        lib.ernie_gemv_batch.restype = c_int
        self.n_layers, self.n_kv, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.hidden = cfg.hidden_size
        lib.ernie_release.argtypes = [ctypes.POINTER(_Model)]
        # frees the C scratch when the decoder is collected, or at exit before modules are torn down; it holds
        # what it calls (no module global is looked up then) and not the decoder
        weakref.finalize(self, lib.ernie_release, ctypes.byref(m))

    # -- building ------------------------------------------------------------------------------------
    def _layer(self, layer: nn.Module, L: _Layer, widths: list[int]) -> int:
        """Fill `L` with the C view of decoder `layer` (weights read in place); -> its expert slots (top-k plus
        the shared experts' slot; 1 for a dense layer)."""
        from ernie45.model import MoE

        a = layer.self_attn
        if a.n_heads * a.head_dim != a.q_proj.out_features:
            raise Unsupported("tensor-parallel shards")
        L.ln1, L.ln2 = self._f32(layer.input_layernorm.weight), self._f32(layer.post_attention_layernorm.weight)
        L.q, L.k, L.v, L.o = (self._linear(m, widths) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        mlp = layer.mlp
        if not isinstance(mlp, MoE):
            L.gate, L.up, L.down = (self._linear(m, widths) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            return 1
        if mlp.local_experts is not None or mlp.reduce_output is not None:
            raise Unsupported("expert-parallel MoE")
        L.is_moe, L.n_experts, L.top_k, L.norm_min = 1, mlp.num_experts, mlp.top_k, mlp.norm_min
        if mlp.top_k > 31 or type(mlp.gate).__name__ != "Router":
            raise Unsupported("router")
        L.router = self._f32(mlp.gate.weight)
        L.corr = self._f32(mlp.moe_statics.e_score_correction_bias.view(-1))
        experts = (_Linear * (3 * mlp.num_experts))()
        for e, ex in enumerate(mlp.experts):
            for j, m in enumerate((ex.gate_proj, ex.up_proj, ex.down_proj)):
                experts[3 * e + j] = self._linear(m, widths)
        self._keep.append(experts)
        L.experts = ctypes.addressof(experts)
        if mlp.shared_experts is not None:
            sh = mlp.shared_experts
            L.has_shared = 1
            L.sgate, L.sup, L.sdown = (self._linear(m, widths) for m in (sh.gate_proj, sh.up_proj, sh.down_proj))
        return mlp.top_k + L.has_shared

    def _f32(self, t: Tensor) -> int:
        t = t.detach().float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _in_place(self, *tensors: Tensor) -> int:
        """`Linear.sdt` for a quantized module's scale (and zero) tensors, which the kernels read in place (no
        copy): one dtype of `_SDT`, on the CPU, contiguous; else `Unsupported`."""
        dtype = tensors[0].dtype
        if dtype not in _SDT or any(t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()
                                    for t in tensors):
            raise Unsupported("quantization scale dtype/layout")
        self._keep.extend(tensors)
        return _SDT[dtype]

    def _linear(self, mod: nn.Module, widths: list[int]) -> _Linear:
        from ernie45.quant.linear import Int4Linear, Int8Linear

        want = torch.bfloat16 if self.bf16 else torch.float32
        if type(mod).__name__ == "GemvLinear":  # an MTP layer's Linear already wrapped for `gemv` (ernie45.mtp)
            mod = mod._many[0]
        L = _Linear(out=mod.out_features, in_=mod.in_features)
        if type(mod) in (nn.Linear, UpcastLinear, DnnLinear):
            w = mod.weight.detach()
            if w.dtype != want:
                raise Unsupported(f"{w.dtype} Linear in a {want} model")
            L.kind = W_BF16 if self.bf16 else W_F32
        elif type(mod) is Int8Linear:
            w, L.kind, L.group = mod.weight, W_I8, mod.group_size  # group 0: one scale per row; 32: per 32 columns
            if mod.group_size not in (0, 32) or (mod.group_size and mod.in_features % mod.group_size):
                raise Unsupported("int8 group size")
            scales = (mod.out_features, mod.in_features // mod.group_size) if mod.group_size else (mod.out_features,)
            if tuple(mod.weight_scale.shape) != scales:
                raise Unsupported("int8 scale shape")
            L.sdt = self._in_place(mod.weight_scale)
            L.scale = mod.weight_scale.data_ptr()
        elif type(mod) is Int4Linear:
            mod._to_rowmajor()  # back from PyTorch's kernel layout, in the module: one copy, which C reads
            w = mod.weight
            self.int4_modules.append(mod)
            L.kind, L.group = W_I4, mod.group_size
            if mod.group_size % 32 or mod.in_features % mod.group_size:
                raise Unsupported("int4 group size")
            groups = (mod.out_features, mod.in_features // mod.group_size)
            if tuple(mod.weight_scale.shape) != groups or tuple(mod.weight_zero.shape) != groups:
                raise Unsupported("int4 scale/zero shape")
            L.sdt = self._in_place(mod.weight_scale, mod.weight_zero)
            L.scale, L.zero = mod.weight_scale.data_ptr(), mod.weight_zero.data_ptr()
        else:
            raise Unsupported(type(mod).__name__)
        if w.device.type != "cpu" or not w.is_contiguous():
            raise Unsupported("weight layout")
        self._keep.append(w)
        L.w = w.data_ptr()
        if mod.bias is not None:
            L.bias = self._f32(mod.bias)
        widths += [mod.in_features, mod.out_features]
        return L

    @classmethod
    def attach(cls, model: nn.Module, isa: str | None = None) -> FastDecoder | None:
        """Build a decoder for `model` and set it as `model.fast_decoder`; None where the C path does not apply.

        `isa`: the kernels' ISA level (`ernie45.native.LEVELS`; default `ERNIE45_ISA`, else native). The plain C
        loops of the generic level are used only when asked for by name (they are the kernels' reference)."""
        from ernie45 import native
        from ernie45.device import isa_level

        if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
            return None
        isa = isa or isa_level()
        lib = native.load("decode", isa)
        if lib is None or (lib.ernie_simd_width() < 128 and isa == "native"):
            return None
        try:
            dec = cls(model, lib)
        except Unsupported as e:
            log.info("C decode step not used: %s", e)
            return None
        for mod in dec.int4_modules:
            mod.keep_rowmajor = True
        if relocate_weights(model):  # weights that were not loaded into an arena (e.g. quantized after loading)
            dec = cls(model, lib)
        model.fast_decoder = dec
        return dec

    def linear_struct(self, mod: nn.Module) -> _Linear | None:
        """The C view of one more Linear (read in place, kept alive by the decoder), for `gemv`; None where the
        kernels cannot read it. Used for the MTP layer's Linears (ernie45.mtp), which the step itself never runs."""
        try:
            L = self._linear(mod, [])
        except Unsupported:
            return None
        for m in self.int4_modules:
            m.keep_rowmajor = True  # C reads the row-major bytes: PyTorch's kernel layout would be a second copy
        return L

    def gemv(self, L: _Linear, x: Tensor) -> Tensor:
        """x (..., in) -> fp32 (..., out) = the C GEMV of `L` (a `linear_struct`, or `_m.head`) on this decoder's
        scratch, every row in one pass over the weight (each row's result is the one it gets alone): for a few rows
        it streams the weight at full bandwidth, where PyTorch's one-row bf16 matmul is several times slower."""
        rows = x.reshape(-1, L.in_).float().contiguous()  # (n, in)
        y = torch.empty(rows.shape[0], L.out, dtype=torch.float32)
        with _STEP_LOCK:
            self._m.n_threads = torch.get_num_threads()
            for i in range(0, rows.shape[0], GEMV_ROWS):  # the step's scratch grows with the rows of one call
                n = min(GEMV_ROWS, rows.shape[0] - i)
                if self._lib.ernie_gemv_batch(ctypes.byref(self._m), ctypes.byref(L), n, rows[i].data_ptr(),
                                              y[i].data_ptr()):
                    raise RuntimeError("C GEMV failed")
        return y.view(*x.shape[:-1], L.out)

    def mtp_step(self, inner: nn.Module, head: _Linear, pre_norm: bool, keep: list | None = None,
                 ids: Tensor | None = None) -> MTPStep | None:
        """The C step of `inner`'s first MTP layer (`ernie45.mtp`) drafting with `head` (`_m.head`, or a copy of
        its rows `ids` (ascending) whose tensors `keep` holds: the logits are vocab wide, -inf off the ids); None
        where the kernels cannot read the layer.
        `pre_norm`: the PaddleFormers variant (the final norm before the head); else vLLM's (no norm, and the
        embedding zeroed at position 0)."""
        layer = (_Layer * 1)()
        widths = [inner.mtp_linear_proj[0].in_features, head.in_]
        try:
            slots = self._layer(inner.mtp_block[0], layer[0], widths)
            proj = self._linear(inner.mtp_linear_proj[0], widths)
        except Unsupported as e:
            log.info("MTP layer not run in C: %s", e)
            return None
        for mod in self.int4_modules:
            mod.keep_rowmajor = True  # C reads the row-major bytes (see linear_struct)
        m = _Model.from_buffer_copy(self._m)  # the main model's dimensions, embedding and threads
        m.n_layers, m.layers, m.head = 1, ctypes.addressof(layer), head
        m.norm = self._m.norm if pre_norm else None
        m.scratch = m.scores = m.want = None
        m.scratch_len, m.max_experts, m.max_width = 0, slots, max(widths)
        m.mtp_enorm, m.mtp_hnorm = self._f32(inner.mtp_emb_norm[0].weight), self._f32(inner.mtp_hidden_norm[0].weight)
        m.mtp_proj, m.mtp_zero0 = proj, int(not pre_norm)
        keep = [layer, *(keep or [])]
        if ids is not None:
            keep.append(ids.to(torch.int32).contiguous())
            m.mtp_ids = keep[-1].data_ptr()
        return MTPStep(self, m, keep)

    PROFILE_PARTS = ("attention projections", "attention", "MLP / experts", "router", "lm_head", "other")

    def profile(self, reset: bool = True) -> dict[str, float]:
        """Seconds spent in each part of the C step (all decoders of the process) since the last reset."""
        out = (ctypes.c_double * len(self.PROFILE_PARTS))()
        with _STEP_LOCK:  # not while a step adds to the counters
            self._lib.ernie_profile(out, int(reset))
        return dict(zip(self.PROFILE_PARTS, out))

    # -- running -------------------------------------------------------------------------------------
    def reads(self, cache) -> bool:
        """Whether the step reads `cache` in place: one sequence, contiguous, in the step's dtype."""
        want = torch.bfloat16 if self.bf16 else torch.float32
        return cache.k[0].shape[0] == 1 and cache.k[0].dtype == want and cache.k[0].is_contiguous()

    def accepts(self, tokens: Tensor, cache, attention_mask: Tensor | None, position_ids: Tensor | None) -> bool:
        """True for one new token of one sequence with no padding, at the cache's next position."""
        if tokens.shape != (1, 1) or cache is None or cache.length >= cache.max_len:
            return False
        if attention_mask is not None and not bool(attention_mask.all()):
            return False
        if position_ids is not None and int(position_ids.reshape(-1)[0]) != cache.length:
            return False
        return self.reads(cache)

    def feed(self, tokens: list[int], cache, **kw) -> Tensor:
        """`tokens` at positions `cache.length`.. as the rows of one batched step over `cache` (one the step
        `reads`, as its one page: every row reads and writes it); the cache length advances. `kw`: `step_batch`'s
        (logit_rows, hidden_out, pre_norm). -> the rows' logits."""
        n, L = len(tokens), cache.length
        tables = torch.zeros((n, 1), dtype=torch.int32)
        logits = self.step_batch(tokens, list(range(L, L + n)), tables, cache.k, cache.v, **kw)
        cache.length = L + n
        return logits

    def prefill(self, tokens: Tensor, cache, **kw) -> Tensor | None:
        """Feed a short prompt `tokens` (1, n) at positions `cache.length`.. as the rows of one C step (`feed`; `kw`:
        its hidden_out, pre_norm); returns the last row's next-token logits (1, vocab) fp32, or None -- nothing fed --
        where the prompt would end past `ROWS_PREFILL_MAX` or the cache is not one the step reads."""
        n = tokens.shape[1]
        if tokens.shape[0] != 1 or n < 2 or cache.length + n > min(ROWS_PREFILL_MAX, cache.max_len):
            return None
        if not self.reads(cache):
            return None
        return self.feed(tokens[0].tolist(), cache, logit_rows=[False] * (n - 1) + [True], **kw)

    def __call__(self, tokens: Tensor, cache) -> Tensor:
        """Feed `tokens` (1, 1) at position `cache.length`; returns the next-token logits (1, vocab), fp32."""
        n = len(cache.k)
        kc = (c_void_p * n)(*[t.data_ptr() for t in cache.k])
        vc = (c_void_p * n)(*[t.data_ptr() for t in cache.v])
        logits = torch.empty(1, self.vocab, dtype=torch.float32)
        token, threads = int(tokens[0, 0]), torch.get_num_threads()
        with _STEP_LOCK:
            self._m.n_threads = threads
            rc = self._lib.ernie_step(ctypes.byref(self._m), token, cache.length, cache.max_len, kc, vc,
                                      logits.data_ptr())
        if rc != 0:
            raise RuntimeError(f"C decode step failed ({rc})")
        cache.length += 1
        return logits

    def step_batch(self, tokens: list[int], positions: list[int], tables: Tensor, k_pages: list[Tensor],
                   v_pages: list[Tensor], k_scales: list[Tensor] | None = None,
                   v_scales: list[Tensor] | None = None, *, int8_round_trip: bool = False,
                   hidden_out: Tensor | None = None, pre_norm: bool = False,
                   logit_rows: list[bool] | None = None) -> Tensor:
        """One decode step of B sequences over a paged KV cache; returns the next-token logits (B, vocab), fp32.

        Row b feeds `tokens[b]` at position `positions[b]` (the positions it has cached). `k_pages[l]` /
        `v_pages[l]`: layer l's page pools (num_blocks, n_kv, block_size, head_dim), contiguous, in the model dtype;
        `tables` (B, stride) int32: row b's position t lives in page `tables[b, t // block_size]`, row
        `t % block_size`. The step writes each row's new K/V there. Each weight is read once for all rows, and row
        b's logits equal, bit for bit, those of the same sequence stepped alone (`__call__`).

        An int8 KV cache (the server's `--kv-cache-dtype int8`): int8 page pools and `k_scales[l]` / `v_scales[l]`,
        fp32 (num_blocks, n_kv, block_size), one scale per (position, kv head) row. New rows are stored as
        q = round(x / s) (half to even, clamped to +-127), s = max|x| / 127; attention reads `(q * s)` rounded to
        the model dtype, and the logits equal, bit for bit, those of float pages holding those dequantised values.
        `int8_round_trip` (float pages): store each new row as that dequantised int8 row, so the float pages hold
        what the int8 cache's attention reads and the logits are the int8 cache's (its float reference).

        `hidden_out` (float or int8 pages): a contiguous fp32 (B, hidden) tensor that receives each row's last hidden state,
        the final norm's output (what the head reads) or, with `pre_norm`, its input: what a multi-token-prediction
        draft head (`ernie45.mtp`) is fed after a verification step.

        `logit_rows` (B flags): compute the logits of the flagged rows only (the lm_head is a large share of a row's
        cost: a 103k-row head against ~120 M active weights on the MoE bench shape); returns (flagged rows, vocab),
        each row what it would be without the flags."""
        B = len(tokens)
        if logit_rows is not None and len(logit_rows) != B:
            raise ValueError(f"step_batch: {len(logit_rows)} logit_rows flags for {B} rows")
        if hidden_out is not None and int8_round_trip:
            raise ValueError("step_batch: hidden_out does not apply to int8_round_trip")
        if hidden_out is not None and (hidden_out.dtype != torch.float32 or hidden_out.device.type != "cpu"
                                       or not hidden_out.is_contiguous() or tuple(hidden_out.shape) != (B, self.hidden)):
            raise ValueError(f"step_batch: hidden_out must be a contiguous CPU fp32 ({B}, {self.hidden}) tensor")
        q8 = k_scales is not None or v_scales is not None
        if q8 and (k_scales is None or v_scales is None):
            raise ValueError("step_batch: int8 pages need both k_scales and v_scales")
        if q8 and int8_round_trip:
            raise ValueError("step_batch: int8_round_trip applies to float pages")
        if B < 1 or len(positions) != B:
            raise ValueError(f"step_batch: {B} tokens and {len(positions)} positions")
        if (tables.dtype != torch.int32 or tables.dim() != 2 or tables.shape[0] != B or tables.shape[1] < 1
                or tables.device.type != "cpu" or not tables.is_contiguous()):
            raise ValueError(f"step_batch: tables must be a contiguous CPU int32 ({B}, stride) tensor, got "
                             f"{tables.dtype} {tuple(tables.shape)}")
        key = (q8, len(k_pages), len(v_pages), *(
            (t.data_ptr(), t.dtype, t.shape) for pool in (k_pages, v_pages, k_scales or (), v_scales or ()) for t in pool))
        pools = self._pools if self._pools is not None and self._pools[0] == key else None
        if pools is None:  # a server passes the same pools every step: check and convert them once
            pools = self._pools = (key, *self._check_pools(k_pages, v_pages, k_scales, v_scales, q8))
        _, kp, vp, ks, vs, num_blocks, block_size = pools
        # the pages each row reads, up to its last, checked in Python ints: a few tiny torch ops here made the step
        # itself 0.22 ms slower (MoE bench shape, batch 1, alternating calls), PyTorch's own threads still running
        # beside the step's; C checks the rest (ids >= 0, positions in range)
        top = max(max(row[: max(p, 0) // block_size + 1]) for row, p in zip(tables.tolist(), positions))
        if top >= num_blocks:
            raise ValueError(f"step_batch: block id {top} out of range ({num_blocks} blocks)")
        toks, pos = (c_int * B)(*tokens), (c_int * B)(*positions)
        want = None if logit_rows is None else (ctypes.c_ubyte * B)(*map(bool, logit_rows))
        logits = torch.empty(B if want is None else sum(want), self.vocab, dtype=torch.float32)
        threads = torch.get_num_threads()
        with _STEP_LOCK:
            self._m.n_threads = threads
            self._m.want = ctypes.cast(want, c_void_p) if want is not None else None
            try:
                if q8 and hidden_out is not None:
                    rc = self._lib.ernie_step_batch_q8_h(ctypes.byref(self._m), B, toks, pos, kp, vp, ks, vs,
                                                         tables.data_ptr(), tables.shape[1], block_size,
                                                         logits.data_ptr(), hidden_out.data_ptr(), int(pre_norm))
                elif q8:
                    rc = self._lib.ernie_step_batch_q8(ctypes.byref(self._m), B, toks, pos, kp, vp, ks, vs,
                                                       tables.data_ptr(), tables.shape[1], block_size, logits.data_ptr())
                elif hidden_out is not None:
                    rc = self._lib.ernie_step_batch_h(ctypes.byref(self._m), B, toks, pos, kp, vp, tables.data_ptr(),
                                                      tables.shape[1], block_size, logits.data_ptr(),
                                                      hidden_out.data_ptr(), int(pre_norm))
                else:
                    fn = self._lib.ernie_step_batch_rt if int8_round_trip else self._lib.ernie_step_batch
                    rc = fn(ctypes.byref(self._m), B, toks, pos, kp, vp, tables.data_ptr(), tables.shape[1], block_size,
                            logits.data_ptr())
            finally:
                self._m.want = None
        if rc != 0:
            raise RuntimeError(f"C batched decode step failed ({rc})")
        return logits

    def _check_pools(self, k_pages, v_pages, k_scales, v_scales, q8: bool) -> tuple:
        """Validate the page (and scale) pools; their pointer arrays, block count and block size."""
        want = torch.int8 if q8 else torch.bfloat16 if self.bf16 else torch.float32
        if len(k_pages) != self.n_layers or len(v_pages) != self.n_layers:
            raise ValueError(f"step_batch: {self.n_layers} layers of pages expected")
        shape = tuple(k_pages[0].shape)
        if len(shape) != 4 or shape[1:2] + shape[3:] != (self.n_kv, self.head_dim) or shape[0] < 1 or shape[2] < 1:
            raise ValueError(f"step_batch: pages must be (num_blocks, {self.n_kv}, block_size, {self.head_dim}), "
                             f"got {shape}")
        for t in (*k_pages, *v_pages):
            if t.dtype != want or tuple(t.shape) != shape or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"step_batch: every page pool must be a contiguous CPU {want} tensor of shape "
                                 f"{shape}, got {t.dtype} {tuple(t.shape)}")
        ks = vs = None
        if q8:
            if len(k_scales) != self.n_layers or len(v_scales) != self.n_layers:
                raise ValueError(f"step_batch: {self.n_layers} layers of scales expected")
            for t in (*k_scales, *v_scales):
                if (t.dtype != torch.float32 or tuple(t.shape) != shape[:3] or t.device.type != "cpu"
                        or not t.is_contiguous()):
                    raise ValueError(f"step_batch: every scale pool must be a contiguous CPU float32 tensor of shape "
                                     f"{shape[:3]}, got {t.dtype} {tuple(t.shape)}")
            ks = (c_void_p * self.n_layers)(*[t.data_ptr() for t in k_scales])
            vs = (c_void_p * self.n_layers)(*[t.data_ptr() for t in v_scales])
        kp = (c_void_p * self.n_layers)(*[t.data_ptr() for t in k_pages])
        vp = (c_void_p * self.n_layers)(*[t.data_ptr() for t in v_pages])
        return kp, vp, ks, vs, shape[0], shape[2]


class MTPStep:
    """An MTP layer as a one-layer C model (`FastDecoder.mtp_step`): the main model's embedding, the layer's input
    norms and projection, its decoder layer and a draft head, over a contiguous one-layer KV cache
    (`ernie45.mtp.MTPHead.new_cache`). For a draft of a few rows it replaces ~60 small PyTorch ops per call (the
    layer's attention, norms, RoPE and residuals: most of a draft's time beside the C GEMVs on the MoE bench shape)
    with one call."""

    ROWS = 16  # rows per call; a longer window (a prompt's first feed) takes the PyTorch path

    def __init__(self, dec: FastDecoder, m: _Model, keep: list):
        self._dec, self._m, self._keep = dec, m, keep
        self.hidden, self.out = dec.hidden, m.vocab if m.mtp_ids else m.head.out
        weakref.finalize(self, dec._lib.ernie_release, ctypes.byref(m))

    def __call__(self, tokens: list[int], hidden: Tensor, cache, offset: int, last_only: bool) -> tuple[Tensor, Tensor]:
        """Rows j = cache.length ... + n - 1 (RoPE positions + `offset`): tokens[i] = x_{j+1}, `hidden` (n, H) h_j.
        Writes their K/V into `cache` (one layer, contiguous, its length advanced) -> (logits (n, V) fp32, or the
        last row's (1, V) with `last_only`; the layer's outputs (n, H) fp32)."""
        n, L = len(tokens), cache.length
        h = hidden.reshape(n, self.hidden).float().contiguous()
        out = torch.empty(n, self.hidden, dtype=torch.float32)
        logits = torch.empty(1 if last_only else n, self.out, dtype=torch.float32)
        want = (ctypes.c_ubyte * n)(*([0] * (n - 1) + [1])) if last_only else None
        kp, vp = (c_void_p * 1)(cache.k[0].data_ptr()), (c_void_p * 1)(cache.v[0].data_ptr())
        tables = (ctypes.c_int32 * n)()  # every row reads the one page
        lib = self._dec._lib
        with _STEP_LOCK:
            self._m.n_threads = torch.get_num_threads()
            self._m.want = ctypes.cast(want, c_void_p) if want is not None else None
            try:
                rc = lib.ernie_mtp_batch(ctypes.byref(self._m), n, (c_int * n)(*tokens), h.data_ptr(),
                                         (c_int * n)(*range(L, L + n)), offset, kp, vp, tables, 1, cache.max_len,
                                         logits.data_ptr(), out.data_ptr())
            finally:
                self._m.want = None
        if rc != 0:
            raise RuntimeError(f"C MTP step failed ({rc})")
        cache.length = L + n
        return logits, out


def relocate_weights(model: nn.Module) -> int:
    """Move the weights the decode step streams into one buffer backed by transparent huge pages, laid out in
    reading order; returns its size in bytes (0 where huge pages are unavailable or nothing needed moving).

    Batch-1 decode streams every weight once per token; with 4 KiB pages the TLB misses cost ~15-20 % of the
    read bandwidth on the development machine (measured: 26 vs 32 tok/s in bf16). `load_checkpoint` already
    reads weights into such an arena; this moves only what is elsewhere (e.g. layers quantized after loading).
    Tensors are swapped one at a time (`.data` for parameters, so tied weights stay tied), so peak memory grows
    by one tensor, not the model.
    """
    arenas = getattr(model, "weight_arenas", [])
    slots, seen = [], {}
    for full in decode_stream_names(model):  # the loader's arena layout: the same tensors, the same order
        prefix, _, name = full.rpartition(".")
        mod = model.get_submodule(prefix)
        t = getattr(mod, name)
        if any(lo <= t.data_ptr() < hi for lo, hi in arenas):
            continue
        if t.data_ptr() not in seen:
            seen[t.data_ptr()] = len(slots)
            slots.append([t, []])
        slots[seen[t.data_ptr()]][1].append((mod, name))
    sizes = [(t.numel() * t.element_size() + 4095) // 4096 * 4096 for t, _ in slots]
    total = sum(sizes)
    arena = hugepage_buffer(total) if total else None
    if arena is None:
        return 0
    model.weight_arenas = [*arenas, (arena.data_ptr(), arena.data_ptr() + arena.numel())]
    off = 0
    with torch.no_grad():
        for (t, users), size in zip(slots, sizes):
            nbytes = t.numel() * t.element_size()
            new = arena[off:off + nbytes].view(t.dtype).view(t.shape)
            new.copy_(t)
            off += size
            for mod, name in users:
                cur = getattr(mod, name)
                if isinstance(cur, nn.Parameter):
                    cur.data = new
                else:
                    setattr(mod, name, new)
    return total
