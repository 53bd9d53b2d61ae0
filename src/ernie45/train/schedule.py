"""Learning-rate schedules for pre-training: linear warmup, then cosine or WSD (warmup-stable-decay)."""

from __future__ import annotations

import math

from ernie45.errors import ErnieError

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(
    step: int,
    total_steps: int,
    lr: float,
    min_lr: float = 0.0,
    warmup: int = 0,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    cosine: warmup to `lr`, then half a cosine down to `min_lr` at the last step.
    wsd: warmup, hold `lr`, then decay linearly to `min_lr` over the last `decay_fraction` of the steps;
    the stable phase lets a run be extended (or branched) without restarting the decay.
    """
    if schedule not in SCHEDULES:
        raise ErnieError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, span - 1))
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(span * decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return lr + (min_lr - lr) * progress
