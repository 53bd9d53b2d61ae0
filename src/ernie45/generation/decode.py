"""What the sampling loop (generate.py) and beam search (beam.py) share: one cached decode step and the pad id."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ernie45.generation.config import GenerationConfig


def pad_token_id(cfg: GenerationConfig) -> int:
    """transformers: pad_token_id, else the first EOS id; 0 when neither is set."""
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    return cfg.eos_token_ids[0] if cfg.eos_token_ids else 0


def decode_step(
    model: Any, tokens: Tensor, cache: Any, attention_mask: Tensor | None, position_ids: Tensor
) -> Tensor:
    """One cached forward for the newest tokens (B, 1) -> next-token logits (B, V).

    A plain function of tensors and the cache, so that benchmarks can time it and `torch.compile` can wrap it.
    Batch-1 steps go to the model's C decoder when `ernie45.fast.optimize_for_inference` attached one.
    """
    fast = getattr(model, "fast_decoder", None)
    if fast is not None and fast.accepts(tokens, cache, attention_mask, position_ids):
        return fast(tokens, cache)
    return model(tokens, attention_mask=attention_mask, position_ids=position_ids, cache=cache).logits[:, -1]
