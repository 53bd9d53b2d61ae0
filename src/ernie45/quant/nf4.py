"""NF4 (QLoRA's 4-bit NormalFloat) through bitsandbytes, an optional dependency: `nf4_linear_class()`.

A bitsandbytes `Linear4bit` (NF4, double quantization) whose state dict has fixed shapes, so that a meta-device
model can load it like the other quantized Linears of `ernie45.quant.linear`.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor, nn

from ernie45.errors import ErnieError

NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256


def import_bitsandbytes():
    """Import bitsandbytes quietly (it logs a harmless 'kernels' warning at import) or say how to get it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise ErnieError("mode nf4 needs bitsandbytes: pip install 'ernie45[train]'") from None
    return bitsandbytes


@functools.cache
def nf4_linear_class() -> type[nn.Module]:
    """The NF4Linear class, built on first use so that bitsandbytes stays an optional import."""
    bnb = import_bitsandbytes()
    from bitsandbytes.functional import (
        QuantState,
        _convert_weight_packed_for_cpu_inverse,
        create_dynamic_map,
        get_4bit_type,
        quantize_4bit,
    )

    class NF4Linear(bnb.nn.Linear4bit):
        """bitsandbytes `Linear4bit` (NF4, double quantization, blocks of 64) with a fixed-shape state dict.

        bitsandbytes serialises its statistics as a JSON blob whose length varies, which a meta-device model
        cannot predict; here they are plain tensors: `weight` (packed, (N*K/2, 1) uint8), `weight_absmax`
        (uint8 codes per block of 64), `weight_nested_absmax` and `weight_nested_offset` (model dtype). The
        two code books are the fixed NF4 and dynamic maps. PEFT sees a `Linear4bit` and applies QLoRA as usual.
        """

        mode = "nf4"

        def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool = True,
            dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None,
        ):
            super().__init__(
                in_features,
                out_features,
                bias=bias,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            blocks = math.ceil(in_features * out_features / NF4_BLOCKSIZE)
            self._set_weight(torch.empty((in_features * out_features + 1) // 2, 1, dtype=torch.uint8, device=device))
            if bias:
                self.bias = nn.Parameter(
                    torch.empty(out_features, dtype=dtype, device=device), requires_grad=False
                )
            self.register_buffer("weight_absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer(
                "weight_nested_absmax",
                torch.empty(math.ceil(blocks / NF4_NESTED_BLOCKSIZE), dtype=dtype, device=device),
            )
            self.register_buffer("weight_nested_offset", torch.empty(1, dtype=dtype, device=device))

        @classmethod
        def from_float(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> NF4Linear:
            dtype = dtype or linear.weight.dtype
            w = linear.weight.detach().to(dtype).contiguous()
            m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, w.device)
            packed, qs = quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
            m.weight_absmax = qs.absmax
            m.weight_nested_absmax = qs.state2.absmax.to(dtype)
            m.weight_nested_offset = qs.offset.reshape(1).to(dtype)
            m._set_packed(packed)
            if linear.bias is not None:
                m.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
            return m

        @property
        def stats_dtype(self) -> torch.dtype:
            """The model dtype this layer was built for (its compute dtype may follow the input instead)."""
            return self.weight_nested_offset.dtype

        def _set_packed(self, packed: Tensor) -> None:
            """Wrap packed NF4 bytes with the quant state rebuilt from the stored statistics."""
            dev = packed.device
            nested = QuantState(
                absmax=self.weight_nested_absmax.float(),
                code=create_dynamic_map(signed=True).to(dev),
                blocksize=NF4_NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            qs = QuantState(
                absmax=self.weight_absmax,
                shape=torch.Size([self.out_features, self.in_features]),
                dtype=self.stats_dtype,
                blocksize=NF4_BLOCKSIZE,
                code=get_4bit_type("nf4", device=dev),
                quant_type="nf4",
                offset=self.weight_nested_offset.float()[0],
                state2=nested,
            )
            self._set_weight(packed, qs)
            self.quant_state = qs

        def _set_weight(self, packed: Tensor, quant_state: QuantState | None = None) -> None:
            self.weight = bnb.nn.Params4bit(
                packed,
                requires_grad=False,
                quant_state=quant_state,
                blocksize=NF4_BLOCKSIZE,
                compress_statistics=True,
                quant_type="nf4",
                module=self,
                bnb_quantized=True,
            )

        def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
            self._restore_portable()
            w = bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)
            return w.to(dtype or self.stats_dtype)

        def _restore_portable(self) -> None:
            """Undo bitsandbytes' CPU re-layout (done at its first no-grad forward) before reading the bytes."""
            qs = getattr(self.weight, "quant_state", None)
            if qs is not None and getattr(qs, "packing_format_for_cpu", False):
                data, _ = _convert_weight_packed_for_cpu_inverse(self.weight.data, qs)
                self._set_packed(data.reshape(-1, 1))

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            self._restore_portable()
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
            if prefix + "weight" in state_dict and not self.weight.is_meta:
                self._set_packed(self.weight.data)

        def extra_repr(self) -> str:
            return (
                f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4, double quant"
            )

    return NF4Linear
