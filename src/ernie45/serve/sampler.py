"""Token choice in the engine's batched step: `sample` picks every row's next token from its logits with the
pure processors of `ernie45.generation.sampling` (penalties per row, warpers per group of rows that share
settings, the structured-output mask last), and `pick_logprobs` reports logprobs in OpenAI's form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ernie45.generation import sampling, structured
from ernie45.serve.request import MIN_TEMPERATURE, Seq, TokenLogprob

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports masked tokens with this value too


def sample(
    seqs: list[Seq], logits: Tensor, eos_ids: frozenset[int], rng: torch.Generator
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each sequence from its row of `logits` (n, V), and its logprobs where asked for.

    Penalties per row, warpers per group of rows with equal settings, then argmax or a draw (from the
    sequence's own generator when seeded, else `rng`); `eos_ids` are suppressed until `min_tokens`.
    """
    if all(plain_greedy(s) for s in seqs):  # the common agent case: one argmax, no per-row work
        return sampling.greedy(logits).tolist(), [None] * len(seqs)
    dev = logits.device
    scores = logits
    for i, s in enumerate(seqs):
        p = s.params
        row = None
        if s.bias is not None:
            row = scores[i : i + 1].clone()
            ids, values = s.bias
            row[0, ids.to(dev)] += values.to(device=dev, dtype=row.dtype)
        if len(s.output) < p.min_tokens:
            stop = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids)))
            if stop:
                row = sampling.suppress_tokens(
                    scores[i : i + 1] if row is None else row, torch.tensor(stop, device=dev)
                )
        if p.repetition_penalty != 1.0:
            hist = torch.tensor([s.prompt + s.output], device=dev)
            row = sampling.apply_repetition_penalty(
                scores[i : i + 1] if row is None else row, hist, p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and s.output:
            gen = torch.tensor([s.output], device=dev)
            row = sampling.apply_presence_frequency_penalty(
                scores[i : i + 1] if row is None else row, gen, p.presence_penalty, p.frequency_penalty
            )
        if row is not None:
            if scores is logits:
                scores = logits.clone()
            scores[i : i + 1] = row
    guides = [s.guide for s in seqs]
    if any(g is not None for g in guides):  # grammar last: it overrides what the penalties left
        scores = structured.mask_rows_(logits.clone() if scores is logits else scores, guides)
    chosen = torch.empty(len(seqs), dtype=torch.long, device=dev)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(seqs):
        p = s.params
        key = (p.temperature, p.top_k if p.top_k > 0 else 0, p.top_p, p.min_p or None)
        groups.setdefault(key if p.temperature >= MIN_TEMPERATURE else ("greedy",), []).append(i)
    for key, idx in groups.items():
        ix = torch.tensor(idx, device=dev)
        sub = scores[ix]
        if key == ("greedy",):
            chosen[ix] = sampling.greedy(sub)
            continue
        temperature, top_k, top_p, min_p = key
        for w in sampling.make_warpers(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p):
            sub = w(sub)
        seeded = [j for j, i in enumerate(idx) if seqs[i].generator is not None]
        unseeded = [j for j in range(len(idx)) if seqs[idx[j]].generator is None]
        for j in seeded:  # a request's own generator: its draws do not depend on its batch mates
            chosen[idx[j]] = sampling.sample(sub[j : j + 1], seqs[idx[j]].generator)[0]
        if unseeded:
            u = torch.tensor(unseeded, device=dev)
            chosen[ix[u]] = sampling.sample(sub[u], rng)
    tokens = chosen.tolist()
    lps: list[TokenLogprob | None] = [None] * len(seqs)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if want:
        w = torch.tensor(want, device=dev)
        # Logprobs of the raw model distribution (before penalties and warpers), as vLLM reports them.
        raw = torch.log_softmax(logits[w], dim=-1)
        k = max(seqs[i].params.logprobs or 0 for i in want)
        picked = pick_logprobs(raw, chosen[w], k)
        for j, i in enumerate(want):
            kk = seqs[i].params.logprobs or 0
            lps[i] = TokenLogprob(picked[j].token_id, picked[j].logprob, picked[j].top[:kk])
    return tokens, lps


def plain_greedy(s: Seq) -> bool:
    """Greedy with nothing that changes the scores or asks for logprobs."""
    p = s.params
    return (
        p.temperature < MIN_TEMPERATURE
        and p.logprobs is None
        and not p.logit_bias
        and p.grammar is None
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and len(s.output) >= p.min_tokens
    )


def pick_logprobs(lp: Tensor, targets: Tensor, k: int) -> list[TokenLogprob]:
    """Logprob of `targets` (n,) under `lp` (n, V) plus the k best alternatives, on the host."""
    chosen = lp.gather(1, targets[:, None])[:, 0].clamp(min=LOGPROB_FLOOR).tolist()
    if k:
        top_v, top_i = lp.topk(k, dim=-1)
        top_v, top_i = top_v.clamp(min=LOGPROB_FLOOR).tolist(), top_i.tolist()
    else:
        top_v = top_i = [[] for _ in chosen]
    return [
        TokenLogprob(int(t), c, list(zip(ti, tv)))
        for t, c, ti, tv in zip(targets.tolist(), chosen, top_i, top_v)
    ]
