"""The model `ernie45 finetune` trains: fp32 weights for full fine-tuning (router frozen unless asked), or a
frozen base (bf16, or NF4 for QLoRA) with an fp32 LoRA adapter."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ernie45.train.finetune_args import FinetuneArgs


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def build_model(a: FinetuneArgs, device: torch.device, bf16: bool, resume_dir: str | None):
    """The model to train: fp32 weights for full fine-tuning, a frozen (bf16 / NF4) base plus an fp32 LoRA
    adapter otherwise. Resuming reloads the trained weights (full) or the adapter (LoRA) of the checkpoint."""
    from ernie45.checkpoint import load_checkpoint
    from ernie45.train import lora

    if a.method == "full":
        model = load_checkpoint(resume_dir or a.model, dtype="float32", device=device)
        model.requires_grad_(True)
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name or (name.endswith("mlp.gate.weight") and not a.train_router):
                p.requires_grad_(False)
    else:
        dtype = torch.bfloat16 if bf16 else torch.float32
        if a.qlora:
            model = lora.quantize_nf4(load_checkpoint(a.model, dtype=dtype, device="cpu"), dtype, device)
        else:
            model = load_checkpoint(a.model, dtype=dtype, device=device)
        if resume_dir:
            lora.load_adapter(model, resume_dir, trainable=True)
        else:
            torch.manual_seed(a.seed)  # identical adapter init on every rank
            cfg = lora.lora_config(
                model,
                a.lora_rank or 8,
                a.lora_alpha,
                a.lora_dropout,
                a.target_modules,
                a.rslora,
                a.lora_experts,
                base_model_name_or_path=os.path.abspath(a.model),
            )
            lora.add_lora(model, cfg)
    if a.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


def weights_writer(a: FinetuneArgs, model, tokenizer) -> Callable[[str], None]:
    """How checkpoints and final/ store what was trained: the whole model (Hugging Face layout) for full
    fine-tuning, the adapter alone (PEFT layout) otherwise; each with the tokenizer, written atomically."""
    from ernie45.checkpoint import save_checkpoint
    from ernie45.train.lora import save_adapter

    if a.method == "full":
        return functools.partial(save_checkpoint, model, tokenizer=tokenizer, overwrite=True)
    return functools.partial(
        save_adapter, model, base_model_name_or_path=os.path.abspath(a.model), tokenizer=tokenizer
    )
