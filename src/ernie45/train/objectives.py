"""What `ernie45 finetune` computes on a micro-batch: the SFT loss (a share of the global token mean) or the
DPO loss against a frozen reference, each backwarded at once, and the held-out metrics of both."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ernie45.train.data import IGNORE, collate
from ernie45.train.distributed import Dist, all_reduce_sum

if TYPE_CHECKING:
    from ernie45.train.finetune_args import FinetuneArgs


def _forward(model, rows: list, device, bf16: bool):
    ids, labels, mask = (t.to(device) for t in collate(rows, model.config.pad_token_id))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(ids, attention_mask=mask, output_router_logits=model.config.is_moe)
    return out, labels


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over the labelled targets, in fp32."""
    V = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def sft_micro_step(model, rows: list, n_targets: int, n_rows: int, device, bf16: bool) -> torch.Tensor:
    """Backward one micro-batch's share of the global loss; returns [ce_sum, aux_weighted] (detached)."""
    out, labels = _forward(model, rows, device, bf16)
    ce = _ce_sum(out.logits, labels)
    loss = ce / n_targets
    aux = torch.zeros((), device=device)
    if out.aux_loss is not None:
        aux = out.aux_loss.float() * (len(rows) / n_rows)
        loss = loss + model.config.router_aux_loss_coef * aux
    loss.backward()
    return torch.stack([ce.detach().double(), aux.detach().double()])


def dpo_logps(model, ref_model, pairs: list, device, bf16: bool):
    """Policy and reference log-probabilities of chosen and rejected; reference = ref_model or the base with
    the adapter disabled. Returns (pc, pr, rc, rr, policy aux loss or None)."""
    from ernie45.train.dpo import sequence_logprobs
    from ernie45.train.lora import adapters_disabled

    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    out, labels = _forward(model, rows, device, bf16)
    logps = sequence_logprobs(out.logits, labels)
    with torch.no_grad():
        if ref_model is not None:
            ref_out, _ = _forward(ref_model, rows, device, bf16)
        else:
            with adapters_disabled(model):
                ref_out, _ = _forward(model, rows, device, bf16)
        ref = sequence_logprobs(ref_out.logits, labels)
    k = len(pairs)
    return logps[:k], logps[k:], ref[:k], ref[k:], out.aux_loss


def dpo_micro_step(
    model, ref_model, pairs: list, n_pairs: int, beta: float, device, bf16: bool
) -> torch.Tensor:
    """Backward one micro-batch's share of the mean DPO loss; returns [loss_sum, margin_sum, correct, aux]."""
    from ernie45.train.dpo import dpo_loss

    pc, pr, rc, rr, aux_loss = dpo_logps(model, ref_model, pairs, device, bf16)
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta)
    loss = losses.sum() / n_pairs
    aux = torch.zeros((), device=device)
    if aux_loss is not None:
        aux = aux_loss.float() * (len(pairs) / n_pairs)
        loss = loss + model.config.router_aux_loss_coef * aux
    loss.backward()
    return torch.stack(
        [
            losses.detach().sum().double(),
            (pc - pr).detach().sum().double(),
            (r_c > r_r).sum().double(),
            aux.detach().double(),
        ]
    )


@torch.no_grad()
def evaluate(model, ref_model, items: list, a: FinetuneArgs, device, bf16: bool, d: Dist) -> dict[str, float]:
    """Held-out metrics: token-mean LM loss (SFT), or DPO loss, chosen-minus-rejected log-prob margin and
    reward accuracy (DPO). Ranks split the items and sum."""
    from ernie45.train.dpo import dpo_loss

    was_training = model.training
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)
    for start in range(0, len(items), a.batch_size):
        mine = items[start : start + a.batch_size][d.rank :: d.world]
        if not mine:
            continue
        if a.dpo:
            pc, pr, rc, rr, _ = dpo_logps(model, ref_model, mine, device, bf16)
            losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, a.beta)
            total += (
                torch.stack(
                    [losses.sum(), (pc - pr).sum(), (r_c > r_r).sum(), torch.tensor(float(len(mine)))]
                )
                .double()
                .to(device)
            )
        else:
            out, labels = _forward(model, mine, device, bf16)
            total[0] += _ce_sum(out.logits, labels).double()
            total[3] += int((labels[:, 1:] != IGNORE).sum())
    all_reduce_sum([total], d)
    model.train(was_training)
    n = float(total[3]) or float("nan")
    if a.dpo:
        return {
            "eval_loss": float(total[0]) / n,
            "eval_margin": float(total[1]) / n,
            "eval_accuracy": float(total[2]) / n,
        }
    return {"eval_loss": float(total[0]) / n}
