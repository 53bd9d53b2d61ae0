"""Activation statistics for LLM.int8(): outlier input columns and an activation clip for every Linear.

Forward pre-hooks on the float model record each input column's absmax (pass 1); columns reaching the outlier
threshold are the outliers. Over the remaining (inlier) columns a histogram of |x| (pass 2) gives the clip:
its maximum (`absmax`), a percentile (`percentile`), or the clip whose int8 quantisation loses the least
information (`kl`, the entropy calibration of TensorRT; Migacz, "8-bit Inference with TensorRT", 2017).
Everything runs in fp32 with fixed sample order, so the statistics are a pure function of the data.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ernie45.errors import ErnieError

CALIB_METHODS = ("kl", "absmax", "percentile")
HIST_BINS = 2048
INT8_LEVELS = 128  # magnitudes 0..127 of symmetric int8
TEXT_KEYS = ("text", "content")
PROMPT_KEYS = ("prompt", "instruction", "question", "input")
ANSWER_KEYS = ("response", "completion", "output", "answer")


# ---- calibration data -----------------------------------------------------------------------------
def _record_text(rec: object, tokenizer, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise ErnieError(f"{where}: expected a JSON object or string, got {type(rec).__name__}")
    if isinstance(rec.get("messages"), list):
        try:
            return tokenizer.apply_chat_template(rec["messages"], add_generation_prompt=False)
        except (ErnieError, ValueError, TypeError, KeyError) as e:
            raise ErnieError(f"{where}: bad 'messages': {e}") from None
    for k in TEXT_KEYS:
        if isinstance(rec.get(k), str):
            return rec[k]
    prompt = next((rec[k] for k in PROMPT_KEYS if isinstance(rec.get(k), str)), None)
    if prompt is not None:
        answer = next((rec[k] for k in ANSWER_KEYS if isinstance(rec.get(k), str)), "")
        return prompt + answer
    raise ErnieError(f"{where}: no text field; use one of {', '.join(TEXT_KEYS + PROMPT_KEYS)} or 'messages'")


def read_calibration_texts(path: str | os.PathLike, limit: int) -> list[tuple[object, str]]:
    """Up to `limit` raw samples: JSON records from a .jsonl file, else one non-empty line of text each."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ErnieError(f"calibration file not found: {path}")
    if not os.path.isfile(path):
        raise ErnieError(f"calibration path is not a file: {path}")
    out: list[tuple[object, str]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if path.endswith(".jsonl"):
                    try:
                        out.append((json.loads(line), f"{path}:{n}"))
                    except json.JSONDecodeError as e:
                        raise ErnieError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                else:
                    out.append((line, f"{path}:{n}"))
                if len(out) >= limit:
                    break
    except UnicodeDecodeError:
        raise ErnieError(f"calibration file is not UTF-8 text: {path}") from None
    if not out:
        raise ErnieError(f"calibration file has no samples: {path}")
    return out


def load_calibration_samples(
    source: str | os.PathLike | Sequence[str],
    tokenizer,
    n_samples: int = 512,
    max_length: int = 512,
    bos_token_id: int | None = None,
) -> list[list[int]]:
    """Token ids of up to `n_samples` calibration samples (a .jsonl / text file, or a list of strings).

    jsonl records may hold `text`, a `prompt` (+ `response`), or chat `messages`; each sample is truncated to
    `max_length` tokens and starts with BOS when `bos_token_id` is given.
    """
    if n_samples < 1:
        raise ErnieError(f"--calib-samples must be >= 1, got {n_samples}")
    if max_length < 2:
        raise ErnieError(f"calibration max length must be >= 2, got {max_length}")
    if isinstance(source, (str, os.PathLike)):
        raw = read_calibration_texts(source, n_samples)
    else:
        raw = [(t, f"sample {i}") for i, t in enumerate(source[:n_samples])]
        if not raw:
            raise ErnieError("no calibration samples given")
    samples = []
    for rec, where in raw:
        ids = tokenizer.encode(_record_text(rec, tokenizer, where))
        ids = ([bos_token_id] if bos_token_id is not None else []) + ids
        if len(ids) >= 2:
            samples.append(ids[:max_length])
    if not samples:
        raise ErnieError("calibration samples are all empty after tokenisation")
    return samples


# ---- statistics -----------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """What calibration learned about one Linear's input."""

    absmax: Tensor  # (K,) fp32, per input column
    tokens: int = 0
    hist: Tensor | None = None  # (HIST_BINS,) float64 counts of |x| over inlier columns, on [0, hist_edge]
    hist_edge: float = 0.0

    def outliers(self, threshold: float) -> Tensor:
        return (self.absmax >= threshold).nonzero().squeeze(1)

    def inlier_absmax(self, threshold: float) -> float:
        inl = self.absmax[self.absmax < threshold]
        return float(inl.max()) if inl.numel() else 0.0

    def clip(self, method: str, threshold: float, percentile: float = 99.99) -> float:
        """The activation cap for the inlier columns (0 when the layer saw no data)."""
        if self.tokens == 0:
            return 0.0
        edge = self.inlier_absmax(threshold)
        if method == "absmax" or self.hist is None or edge == 0.0:
            return edge
        if method == "percentile":
            return percentile_clip(self.hist, self.hist_edge, percentile)
        return kl_clip(self.hist, self.hist_edge)


def percentile_clip(hist: Tensor, edge: float, percentile: float) -> float:
    """The upper edge of the first bin where the cumulative share reaches `percentile` %."""
    cdf = hist.double().cumsum(0)
    i = int(torch.searchsorted(cdf, cdf[-1] * percentile / 100.0).item())
    return (min(i, hist.numel() - 1) + 1) * edge / hist.numel()


def kl_clip(hist: Tensor, edge: float, levels: int = INT8_LEVELS, stride: int = 8) -> float:
    """TensorRT's entropy calibration: the clip i*width (i >= levels bins) minimising KL(P || Q).

    P is the histogram cut at bin i with the tail mass folded into its last bin; Q is the same cut merged
    into `levels` equal chunks, each chunk's mass spread evenly over its non-empty bins. Every `stride`-th
    cut is tried (a clip resolution of stride/bins of the range), all at once as a (cuts, bins) matrix.
    """
    hist = hist.double()
    bins = hist.numel()
    if bins <= levels or hist.sum() <= 0:
        return edge
    cand = torch.arange(levels, bins + 1, stride)  # (C,) candidate cuts
    c = cand.numel()
    j = torch.arange(bins)
    inside = j[None, :] < cand[:, None]  # (C, B)
    kept = torch.where(inside, hist[None, :], 0.0)
    p = kept.clone()
    p[torch.arange(c), cand - 1] += hist.sum() - kept.sum(1)  # fold the clipped tail into the last bin
    chunk = ((j[None, :] * levels) // cand[:, None]).clamp(max=levels - 1)  # (C, B) chunk of each bin
    nonempty = (kept > 0).double()
    mass = torch.zeros(c, levels, dtype=torch.float64).scatter_add_(1, chunk, kept)
    count = torch.zeros(c, levels, dtype=torch.float64).scatter_add_(1, chunk, nonempty)
    q = nonempty * mass.gather(1, chunk) / count.gather(1, chunk).clamp(min=1.0)
    pn = p / p.sum(1, keepdim=True)
    qn = q / q.sum(1, keepdim=True).clamp(min=1e-300)
    # Where P has mass that Q lacks (only the folded tail bin can), Q gets a small floor, as TensorRT smooths.
    kl = torch.where(pn > 0, pn * (pn / qn.clamp(min=1e-12)).log(), 0.0).sum(1)  # (C,)
    return int(cand[int(kl.argmin())]) * edge / bins


@torch.inference_mode()
def collect_stats(
    model: nn.Module,
    samples: list[list[int]],
    modules: dict[str, nn.Linear],
    method: str = "kl",
    threshold: float = 6.0,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Run `samples` (batch 1 each, in order) through `model` and gather `LayerStats` for each of `modules`."""
    from tqdm import tqdm

    if method not in CALIB_METHODS:
        raise ErnieError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    stats = {name: LayerStats(absmax=torch.zeros(m.in_features)) for name, m in modules.items()}
    keep_all_logits = any(m is getattr(model, "lm_head", None) for m in modules.values())
    device = next(model.parameters()).device

    def run(pass_no: int, n_passes: int) -> None:
        desc = f"calibration pass {pass_no}/{n_passes}"
        for ids in tqdm(samples, desc=desc, disable=not progress, file=sys.stderr, unit="sample"):
            x = torch.tensor([ids], device=device)
            model(x, logits_to_keep=0 if keep_all_logits else 1)

    def absmax_hook(name: str):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, mod.in_features).float()  # (T, K)
            st = stats[name]
            st.absmax = torch.maximum(st.absmax, x.abs().amax(dim=0).cpu())
            st.tokens += x.shape[0]

        return hook

    def hist_hook(name: str):
        st = stats[name]
        inliers = (st.absmax < threshold).nonzero().squeeze(1)
        st.hist_edge = st.inlier_absmax(threshold)
        st.hist = torch.zeros(HIST_BINS, dtype=torch.float64)

        def hook(mod, args):
            if st.hist_edge <= 0:
                return
            x = args[0].detach().reshape(-1, mod.in_features).float()  # (T, K)
            v = x.index_select(1, inliers.to(x.device)).abs().flatten().cpu()
            st.hist += torch.histc(v, bins=HIST_BINS, min=0.0, max=st.hist_edge).double()

        return hook

    n_passes = 1 if method == "absmax" else 2
    for pass_no, make_hook in enumerate((absmax_hook, hist_hook)[:n_passes], 1):
        handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
        try:
            run(pass_no, n_passes)
        finally:
            for h in handles:
                h.remove()
    return stats
