"""Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss, the form TRL's `DPOTrainer` uses.

loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where pi/ref are summed log-probabilities of
the response tokens under the policy and the frozen reference (the base model, or the base with the LoRA
adapter disabled).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ernie45.train.data import IGNORE


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of next-token log-probabilities of the labelled tokens per row: (B, S, V), (B, S) -> (B,) fp32."""
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, S-1, V)
    target = labels[:, 1:]
    mask = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, S-1)
    return (picked * mask).sum(-1)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair sigmoid DPO losses and the implicit rewards beta*(pi - ref) of chosen and rejected, all (B,)."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return (
        losses,
        beta * (policy_chosen - ref_chosen).detach(),
        beta * (policy_rejected - ref_rejected).detach(),
    )
