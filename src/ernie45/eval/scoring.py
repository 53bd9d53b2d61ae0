"""Batched log-likelihood scoring from `model(input_ids, attention_mask).logits`, and the metrics built on it.

Context/continuation tokenisation and truncation follow lm-eval's HF backend (`TemplateLM._encode_pair`,
`HFLM._loglikelihood_tokens`), so the same model gives the same log-likelihoods natively and in the harness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

TokenRequest = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) the way lm-eval splits them.

    Trailing spaces move from the context to the continuation, the whole string is encoded once, and the
    continuation is what follows the separately encoded context, so a token spanning the seam is scored.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: Sequence[TokenRequest],
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    progress=None,
) -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) and whether greedy decoding would produce it, per request.

    Args:
        model: a causal LM whose `model(ids, attention_mask=, position_ids=, logits_to_keep=)` returns `.logits`.
        requests: (context ids, continuation ids); the context must not be empty.
        batch_size: model inputs per forward pass.
        max_length: longest model input; longer inputs lose tokens on the left (lm-eval's truncation).
        pad_id: filler id for left padding (masked out).
        progress: a tqdm bar advanced by the number of requests done.

    Returns:
        (log-likelihood, is_greedy) in request order.
    """
    max_length = max_length or model.config.max_position_embeddings
    # Requests with the same model input share one row: all four letters of a C-Eval question, for example.
    rows: dict[tuple[int, ...], list[int]] = {}
    targets: list[list[int]] = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both be non-empty")
        whole = (list(ctx) + list(cont))[-(max_length + 1) :]
        targets.append(whole[-len(cont) :])
        rows.setdefault(tuple(whole[:-1]), []).append(i)
    # Longest first, as lm-eval does: rows of a batch have similar lengths, and running out of memory shows at once.
    inputs = sorted(rows, key=len, reverse=True)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    device = next(model.parameters()).device
    for b in range(0, len(inputs), batch_size):
        batch = inputs[b : b + batch_size]
        width = len(batch[0])
        keep = max(len(targets[i]) for inp in batch for i in rows[inp])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, inp in enumerate(batch):  # left padding: every row's last position is the batch's last
            ids[r, width - len(inp) :] = torch.tensor(inp)
            mask[r, width - len(inp) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
        ).logits  # (B, keep, V)
        done = 0
        for r, inp in enumerate(batch):
            for i in rows[inp]:
                n = len(targets[i])
                logprobs = logits[r, keep - n :].float().log_softmax(-1)  # (n, V)
                tgt = torch.tensor(targets[i], device=logprobs.device)
                ll = logprobs.gather(-1, tgt[:, None]).sum().item()
                out[i] = (ll, bool((logprobs.argmax(-1) == tgt).all()))
                done += 1
        if progress is not None:
            progress.update(done)
    return out  # type: ignore[return-value]


def choice_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) of one item, as lm-eval computes them.

    acc_norm divides each log-likelihood by its answer's length in characters. Ties go to the first choice.
    """
    pred = max(range(len(lls)), key=lambda j: lls[j])
    pred_norm = max(range(len(lls)), key=lambda j: lls[j] / float(len(choices[j])))
    return float(pred == gold), float(pred_norm == gold)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) per window over `n_tokens` ids (HF's perplexity recipe).

    Every token but the first is scored exactly once; after the first window each scored token sees at least
    `window - stride` earlier tokens.
    """
    if not 1 <= stride < window:
        raise ValueError(f"need 1 <= stride < window, got stride={stride}, window={window}")
    out: list[tuple[int, int, int]] = []
    begin, first = 0, 1
    while first < n_tokens:
        end = min(begin + window, n_tokens)
        out.append((begin, first, end))
        begin, first = begin + stride, end
    return out


def window_requests(ids: Sequence[int], window: int, stride: int) -> list[TokenRequest]:
    """Perplexity as log-likelihood requests: each window's scored tokens given the window's earlier tokens."""
    return [
        (ids[begin:first], ids[first:end]) for begin, first, end in sliding_windows(len(ids), window, stride)
    ]


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    return math.exp(nll_sum / n_tokens)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def accuracy_table(per_item: Sequence[tuple[float, float]]) -> dict[str, float]:
    """{"acc", "acc_norm", "n"} over items' (acc, acc_norm) pairs."""
    return {
        "acc": mean([a for a, _ in per_item]),
        "acc_norm": mean([b for _, b in per_item]),
        "n": len(per_item),
    }
