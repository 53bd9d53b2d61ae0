"""ernie45: a PyTorch toolkit for the ERNIE 4.5 family of language models."""

from __future__ import annotations

import os

__version__ = "0.1.0"
__all__ = ["load", "ErnieConfig", "__version__"]


def load(path: str | os.PathLike | None = None, dtype: str = "auto", device: str = "auto",
         quantize: str | None = None, tokenizer: str | os.PathLike | None = None):
    """Load a model and its tokenizer: `model, tokenizer = ernie45.load("ERNIE-4.5-0.3B-PT")`.

    Args:
        path: an HF-layout checkpoint directory (`config.json`, `*.safetensors`, `tokenizer.model`), a GGUF file
            (`ernie4_5` / `ernie4_5-moe`: Q4_0 / Q4_K weights load as int4 and Q8_0 ones as int8, groups of 32,
            other quantized types are dequantized; the tokenizer is rebuilt from the file's vocabulary), or None / a bundled model name ("ernie-tiny",
            "ernie-tiny-moe") for the model shipped with ernie45.
        dtype: "auto" (bf16 where the hardware runs it fast, else fp32; a quantized bf16 checkpoint stays bf16 on
            every CPU), "float32", "bfloat16" or "float16".
        device: "auto" (CUDA when available), "cpu" or "cuda".
        quantize: "wint8", "wint4" or "llm.int8" (uncalibrated) to quantize a float checkpoint while loading,
            one tensor at a time (the float model is never in memory). A quantized checkpoint needs no flag.
        tokenizer: a directory with `tokenizer.model` to use instead of the checkpoint's (or the GGUF's) own.

    Returns:
        (ErnieForCausalLM in eval mode, Tokenizer)
    """
    from ernie45.checkpoint import load_checkpoint
    from ernie45.models import resolve_model_path
    from ernie45.tokenizer import Tokenizer

    path = resolve_model_path(path)
    # the tokenizer first: a GGUF vocabulary is parsed before any weight storage exists (see ernie45.gguf_load)
    tok = Tokenizer.from_pretrained(path if tokenizer is None else tokenizer)
    return load_checkpoint(path, dtype=dtype, device=device, quantize=quantize), tok


def __getattr__(name: str):
    if name == "ErnieConfig":
        from ernie45.config import ErnieConfig

        return ErnieConfig
    raise AttributeError(name)
