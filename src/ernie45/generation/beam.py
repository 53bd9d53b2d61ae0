"""Beam search (and beam sampling) with length penalty and early stopping, token-for-token as transformers.

A port of transformers 5.x `GenerationMixin._beam_search` (the vectorised version: static-shaped running and
finished beams, top-K candidates with K = max(2, 1 + n_eos) * num_beams, the same early-stop heuristic),
running on ernie45's preallocated KV cache. The prompt is prefilled once per batch row and its cache copied
to the beams, instead of once per beam.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ernie45.generation.config import GenerationConfig
from ernie45.generation.decode import decode_step, pad_token_id
from ernie45.generation.sampling import apply_all, make_processors, make_warpers
from ernie45.generation.streaming import ends_with_stop_string


def _gather_beams(t: Tensor, idx: Tensor) -> Tensor:
    """t (B, beams, ...) -> rows idx (B, k) along the beam dim."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


@torch.inference_mode()
def beam_search(
    model: Any,
    ids: Tensor,
    mask: Tensor | None,
    cfg: GenerationConfig,
    max_new: int,
    min_new: int,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return (B * num_return_sequences, prompt + generated) ids, best beam first for each prompt.

    `cfg` is resolved (`GenerationConfig.with_defaults`); `cfg.do_sample` turns on beam sampling.
    """
    B, S = ids.shape
    dev = ids.device
    nb, n_ret = cfg.num_beams, cfg.num_return_sequences
    eos = cfg.eos_token_ids
    stops = cfg.stop_string_list
    early_stopping, length_penalty = cfg.early_stopping, float(cfg.length_penalty)
    max_length = S + max_new
    pad = pad_token_id(cfg)
    # transformers fills unused positions with `pad_token_id or eos_token_id[0]` (-1 without EOS)
    fill = (pad or eos[0]) if eos else -1

    beams_to_keep = max(2, 1 + len(eos)) * nb
    top_num_beam_mask = torch.zeros(beams_to_keep, dtype=torch.bool, device=dev)
    top_num_beam_mask[:nb] = True

    flat_mask = mask.repeat_interleave(nb, dim=0) if mask is not None else None  # (B*nb, S)
    processors = make_processors(
        prompt_len=S,
        repetition_penalty=cfg.repetition_penalty,
        presence_penalty=cfg.presence_penalty,
        frequency_penalty=cfg.frequency_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        min_new_tokens=min_new,
        eos_token_ids=eos,
        ignore_before=(flat_mask != 0).int().argmax(dim=1) if flat_mask is not None else None,
        device=dev,
    )
    warpers = (
        make_warpers(
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            min_p=cfg.min_p,
            min_tokens_to_keep=len(eos) + 1,
        )
        if cfg.do_sample
        else []
    )
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev) if eos else None

    running_sequences = torch.full((B, nb, max_length), fill, dtype=torch.long, device=dev)
    running_sequences[:, :, :S] = ids[:, None]
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros((B, nb), dtype=torch.float, device=dev)
    running_beam_scores[:, 1:] = -1e9  # only the first beam is live at the start
    beam_scores = torch.full((B, nb), -1e9, dtype=torch.float, device=dev)
    is_sent_finished = torch.zeros((B, nb), dtype=torch.bool, device=dev)
    improvement_possible = torch.ones((B, 1), dtype=torch.bool, device=dev)
    running_beam_indices = torch.full((B, nb, max_new), -1, dtype=torch.int32, device=dev)
    beam_indices = running_beam_indices.clone()
    batch_offset = torch.arange(B, device=dev).view(-1, 1) * nb

    if flat_mask is not None:
        mask_buf = torch.ones((B * nb, max_length), dtype=torch.long, device=dev)
        mask_buf[:, :S] = flat_mask
        positions = flat_mask.sum(-1, keepdim=True)  # (B*nb, 1)
    else:
        mask_buf = None
        positions = torch.full((B * nb, 1), S, dtype=torch.long, device=dev)

    cache = model.new_cache(B, max_length - 1)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
    per_beam = torch.arange(B, device=dev).repeat_interleave(nb)
    cache.reorder(per_beam)  # (B, ...) -> (B*nb, ...): every beam starts from its prompt's cache
    logits = logits.index_select(0, per_beam)

    cur_len = S
    while True:
        flat_running = running_sequences[:, :, :cur_len].reshape(B * nb, cur_len)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = apply_all(processors, flat_running, log_probs)
        for w in warpers:
            log_probs = w(log_probs)
        V = log_probs.shape[-1]
        log_probs = log_probs.view(B, nb, V) + running_beam_scores[:, :, None]
        log_probs = log_probs.reshape(B, nb * V)

        # top-K continuations over all beams of each prompt
        if cfg.do_sample:
            topk_indices = torch.multinomial(F.softmax(log_probs, dim=-1), beams_to_keep, generator=generator)
            topk_log_probs = log_probs.gather(1, topk_indices)
            topk_log_probs, order = topk_log_probs.sort(dim=-1, descending=True)
            topk_indices = topk_indices.gather(-1, order)
        else:
            topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)
        topk_beam = topk_indices // V
        topk_ids = topk_indices % V
        topk_running_beam_indices = _gather_beams(running_beam_indices, topk_beam)
        topk_running_sequences = _gather_beams(running_sequences, topk_beam)
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - S] = (topk_beam + batch_offset).to(torch.int32)

        # which candidates hit a stopping criterion (max length, EOS, stop string)
        hits = torch.full((B, beams_to_keep), cur_len + 1 >= max_length, dtype=torch.bool, device=dev)
        if eos_t is not None:
            hits |= torch.isin(topk_ids, eos_t)
        if stops:
            window = 4 * max(len(s) for s in stops) + 2
            tails = topk_running_sequences[:, :, max(S, cur_len + 1 - window) : cur_len + 1].tolist()
            stop_hits = [[ends_with_stop_string(tokenizer, t, stops) for t in row] for row in tails]
            hits |= torch.tensor(stop_hits, dtype=torch.bool, device=dev)

        # the best num_beams candidates that did not stop keep running
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_topk = torch.topk(topk_running_log_probs, k=nb)[1]
        running_sequences = _gather_beams(topk_running_sequences, next_topk)
        running_beam_scores = _gather_beams(topk_running_log_probs, next_topk)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk)

        # finished candidates among the top num_beams join the finished set if they score high enough
        just_finished = hits & top_num_beam_mask[None, :]
        scored = topk_log_probs / ((cur_len + 1 - S) ** length_penalty)
        full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
        scored = scored + full.to(torch.float32) * -1.0e9
        scored = scored + (~improvement_possible).to(torch.float32) * -1.0e9
        scored = scored + (~just_finished) * -1.0e9
        merged_scores = torch.cat((beam_scores, scored), dim=1)
        best = torch.topk(merged_scores, k=nb)[1]
        sequences = _gather_beams(torch.cat((sequences, topk_running_sequences), dim=1), best)
        beam_scores = _gather_beams(merged_scores, best)
        beam_indices = _gather_beams(torch.cat((beam_indices, topk_running_beam_indices), dim=1), best)
        is_sent_finished = _gather_beams(torch.cat((is_sent_finished, just_finished), dim=1), best)

        beam_idx = running_beam_indices[..., cur_len - S].reshape(-1).long()
        cur_len += 1
        # early-stop heuristic: can the best running beam still beat the worst finished one?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - S
        else:
            best_len = cur_len - S
        best_running = running_beam_scores[:, :1] / (best_len**length_penalty)
        worst_finished = torch.where(is_sent_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvement_possible = improvement_possible & torch.any(
            best_running > worst_finished, dim=-1, keepdim=True
        )
        open_beam = ~(torch.all(is_sent_finished) & (early_stopping is True))
        if not bool(torch.any(improvement_possible) & open_beam & ~torch.all(hits)):
            break
        cache.reorder(beam_idx)
        step_mask = mask_buf[:, :cur_len] if mask_buf is not None else None
        logits = decode_step(
            model, running_sequences[:, :, cur_len - 1].reshape(-1, 1), cache, step_mask, positions
        )
        positions += 1

    sequences = sequences[:, :n_ret].reshape(B * n_ret, max_length)
    beam_indices = beam_indices[:, :n_ret].reshape(B * n_ret, max_new)
    generated = int((beam_indices + 1).bool().sum(dim=1).max())
    return sequences[:, : S + generated].clone()
