"""A minimal supervised fine-tuning loop: chat conversations in, loss on the assistant tokens only.

Used to instruction-tune the bundled models (scripts/build_bundled_models.sh); `ernie45 finetune` builds
LoRA/QLoRA and data options on the same pieces (`ernie45.train.data` renders and masks conversations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ernie45.errors import ErnieError
from ernie45.train.core import build_optimizer, check_finite, optimizer_step, schedule_lr


def encode_examples(tokenizer, examples: Sequence[Any], max_length: int) -> list:
    """Chat records (`{"messages": [...]}` or a message list) -> `Sample`s, truncated to `max_length`.

    Records whose assistant tokens are all cut off by the truncation are dropped (they carry no loss).
    """
    from ernie45.train.data import Sample, parse_conversation, tokenize_conversation

    samples = []
    for i, ex in enumerate(examples):
        rec = {"messages": ex} if isinstance(ex, list) else ex
        try:
            conv = parse_conversation(rec, "chat")
        except ValueError as e:
            raise ErnieError(f"SFT example {i}: {e}") from None
        s = tokenize_conversation(tokenizer, conv)
        s = Sample(s.input_ids[:max_length], s.labels[:max_length], str(i))
        if s.n_targets > 0:
            samples.append(s)
    if not samples:
        raise ErnieError("no SFT example has an assistant reply within max_length tokens")
    return samples


def sft_train(
    model,
    tokenizer,
    examples: Sequence[Any],
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    max_length: int = 512,
    warmup: int = 10,
    min_lr: float | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    bf16: bool = False,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Fine-tune `model` in place on chat `examples` for `steps` optimizer steps; returns the loss per step.

    The model should hold fp32 weights (bf16 weights lose small updates); `bf16=True` autocasts the
    forward instead. Batches come from a seeded shuffle of the examples (reshuffled every epoch), right
    padded; the loss is the mean over assistant tokens (plus the MoE aux loss, as in pre-training).
    """
    from tqdm import tqdm

    from ernie45.train.data import collate

    if steps < 1 or batch_size < 1 or max_length < 2 or not lr > 0:
        raise ErnieError("sft_train: steps, batch_size must be >= 1, max_length >= 2 and lr > 0")
    samples = encode_examples(tokenizer, examples, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, lr, weight_decay)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    min_lr = lr * 0.1 if min_lr is None else min_lr
    bar = tqdm(range(steps), desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        while len(order) < batch_size:
            order += torch.randperm(len(samples), generator=g).tolist()
        batch, order = [samples[i] for i in order[:batch_size]], order[batch_size:]
        ids, labels, mask = (t.to(device) for t in collate(batch, pad))  # each (B, S)
        cur_lr = schedule_lr(optimizer, step, steps, lr, min_lr, warmup, "cosine")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer_step(optimizer, params, max_grad_norm)
        value = float(loss.detach())
        check_finite(value, step + 1)
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if on_step is not None:
            on_step({"step": step + 1, "loss": value, "lr": cur_lr})
    model.eval()
    model.requires_grad_(False)
    return losses
