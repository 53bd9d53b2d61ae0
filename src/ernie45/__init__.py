"""ernie45: a PyTorch toolkit for the ERNIE 4.5 family of language models."""

from __future__ import annotations

import os

__version__ = "0.1.0"
__all__ = ["load", "ErnieConfig", "__version__"]


def load(path: str | os.PathLike | None = None, dtype: str = "auto", device: str = "auto",
         quantize: str | None = None):
    """Load a model and its tokenizer: `model, tokenizer = ernie45.load("ERNIE-4.5-0.3B-PT")`.

    Args:
        path: an HF-layout checkpoint directory (`config.json`, `*.safetensors`, `tokenizer.model`), or
            None / a bundled model name ("ernie-tiny", "ernie-tiny-moe") for the model shipped with ernie45.
        dtype: "auto" (bf16 where the hardware runs it fast, else fp32; a quantized bf16 checkpoint stays bf16 on
            every CPU), "float32", "bfloat16" or "float16".
        device: "auto" (CUDA when available), "cpu" or "cuda".
        quantize: "wint8", "wint4" or "llm.int8" (uncalibrated) to quantize a float checkpoint while loading,
            one tensor at a time (the float model is never in memory). A quantized checkpoint needs no flag.

    Returns:
        (ErnieForCausalLM in eval mode, Tokenizer)
    """
    from ernie45.checkpoint import load_checkpoint
    from ernie45.models import resolve_model_path
    from ernie45.tokenizer import Tokenizer

    path = resolve_model_path(path)
    model = load_checkpoint(path, dtype=dtype, device=device, quantize=quantize)
    tokenizer = Tokenizer.from_pretrained(path)
    return model, tokenizer


def __getattr__(name: str):
    if name == "ErnieConfig":
        from ernie45.config import ErnieConfig

        return ErnieConfig
    raise AttributeError(name)
