"""`ernie45 moe-stats`: how a MoE model routes real text, as pictures and numbers.

Runs each text sample through the model with `output_router_logits=True` and writes to `--out`:

- `load_heatmap.png`: layer x expert load (share of routed assignments x number of experts; 1 = uniform);
- `token_experts.png`: for one sample, which experts each token went to in every MoE layer;
- `imbalance.png`: per layer coefficient of variation, max/mean load and normalised routing entropy;
- `stats.json`: the counts behind the pictures, the imbalance figures, the auxiliary (load-balancing) loss, and
  how many experts consecutive tokens share per layer (`next_token_shared`; what verifying a speculative draft
  re-reads, see docs/speculative.md: a second position costs little where it picks the current token's experts).

Expert choice is the model's own dispatch rule: top-k of softmax(router logits) + `e_score_correction_bias`
(ARCHITECTURE.md §2). The aux loss is the model's (transformers' formula, which ignores that bias).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ernie45.checkpoint import load_config
from ernie45.commands import add_device_arg, add_dtype_arg, add_model_arg, add_out_arg
from ernie45.errors import ErnieError

# Fonts with CJK glyphs, most common first (Debian fonts-wqy-microhei / fonts-noto-cjk, macOS, Windows).
CJK_FONTS = (
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Droid Sans Fallback",
    "PingFang SC",
    "Hiragino Sans GB",
    "Microsoft YaHei",
    "SimHei",
)
CJK_FILE_HINTS = ("wqy", "notosanscjk", "sourcehansans", "droidsansfallback")
NO_FONT_WARNING = (
    "no CJK font found: Chinese token labels will render as boxes "
    "(install one, e.g. `apt-get install fonts-wqy-microhei`)"
)


# ---- data ------------------------------------------------------------------------------------------------
def read_texts(path: str, max_samples: int) -> list[str]:
    """Text samples from `.jsonl` (a "text" field, or a JSON string per line) or plain text (one per line)."""
    if not os.path.isfile(path):
        raise ErnieError(f"data file not found: {path}")
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if path.endswith(".jsonl"):
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ErnieError(f"{path} line {n}: not valid JSON ({e})") from None
                    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                        line = obj["text"]
                    elif isinstance(obj, str):
                        line = obj
                    else:
                        raise ErnieError(f'{path} line {n}: expected an object with a "text" string')
                if line.strip():
                    texts.append(line)
                if len(texts) == max_samples:
                    break
    except UnicodeDecodeError as e:
        raise ErnieError(f"{path} is not UTF-8 text: {e}") from None
    if not texts:
        raise ErnieError(f"no text samples in {path}")
    return texts


# ---- statistics --------------------------------------------------------------------------------------------
@dataclass
class RoutingStats:
    """Routing counts accumulated over samples; rows follow `moe_layers`."""

    moe_layers: list[int]
    num_experts: int
    top_k: int
    counts: np.ndarray  # (L, E) int64: tokens dispatched to each expert (correction bias included)
    prob_sum: np.ndarray  # (L, E) fp64: summed router probabilities
    aux_counts: np.ndarray  # (E,) fp64: unbiased top-k picks summed over layers (aux-loss input)
    aux_probs: np.ndarray  # (E,) fp64: router probabilities summed over layers (aux-loss input)
    shared: np.ndarray | None = None  # (L,) int64: experts a token shares with the one before it, summed
    pairs: int = 0  # consecutive token pairs within samples
    tokens: int = 0
    aux_loss_per_sample: list[float] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)
    sample_experts: np.ndarray | None = None  # (S, L, K) expert ids of the shown sample
    sample_weights: np.ndarray | None = None  # (S, L, K) their combine weights

    @classmethod
    def empty(cls, moe_layers: list[int], num_experts: int, top_k: int) -> RoutingStats:
        L, E = len(moe_layers), num_experts
        return cls(
            moe_layers, E, top_k, np.zeros((L, E), np.int64), np.zeros((L, E)), np.zeros(E), np.zeros(E),
            np.zeros(L, np.int64),
        )

    @property
    def random_shared(self) -> float:
        """Experts two tokens would share if each picked top_k of num_experts at random: k^2 / E."""
        return self.top_k * self.top_k / self.num_experts

    @property
    def aux_loss(self) -> float:
        """The model's load-balancing loss over every token seen, as if all samples were one unpadded batch.

        Same formula as `ernie45.model.load_balancing_loss` (E * sum_e f_e * P_e, rows = tokens x layers), kept
        as running sums because that function needs every layer's logits for all tokens at once.
        """
        rows = self.tokens * len(self.moe_layers)
        return float(self.num_experts * np.sum((self.aux_counts / rows) * (self.aux_probs / rows)))

    def layer_figures(self) -> list[dict[str, Any]]:
        """Per MoE layer: counts, load shares, mean router probability and the imbalance figures."""
        out = []
        for row, layer in enumerate(self.moe_layers):
            c = self.counts[row].astype(np.float64)
            share = c / c.sum()
            nz = share[share > 0]
            entropy = float(-(nz * np.log(nz)).sum())
            out.append(
                {
                    "layer": layer,
                    "counts": [int(x) for x in self.counts[row]],
                    "load": [float(x) for x in share],
                    "mean_prob": [float(x) for x in self.prob_sum[row] / self.tokens],
                    "cv": float(c.std() / c.mean()),  # population standard deviation / mean
                    "max_over_mean": float(c.max() / c.mean()),
                    "entropy": entropy,  # nats
                    "normalized_entropy": entropy / math.log(self.num_experts)
                    if self.num_experts > 1
                    else 1.0,
                    # mean experts (of top_k) a token shares with the previous token of its sample
                    "next_token_shared": float(self.shared[row] / self.pairs) if self.pairs else 0.0,
                }
            )
        return out


def moe_layer_indices(model: Any) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if getattr(layer, "is_moe", False)]


def collect_routing(
    model: Any, samples: Sequence[Sequence[int]], show: int = 0, progress: bool = True
) -> RoutingStats:
    """Run every sample (token ids) through `model` and count where its tokens were routed.

    Samples run one at a time, unpadded, so the counts cover exactly their tokens; `show` picks the sample
    whose per-token expert choices are kept for the grid.
    """
    import torch
    from tqdm import tqdm

    cfg = model.config
    layers = moe_layer_indices(model)
    if not layers:
        raise ErnieError("the model has no MoE layers")
    E, K = cfg.moe_num_experts, cfg.moe_k
    biases = [
        model.model.layers[i].mlp.moe_statics.e_score_correction_bias.detach().float().view(-1)
        for i in layers
    ]
    stats = RoutingStats.empty(layers, E, K)
    with torch.inference_mode():
        for n, ids in enumerate(tqdm(samples, desc="routing", unit="sample", disable=not progress)):
            x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
            out = model(x, output_router_logits=True, logits_to_keep=1)
            stats.aux_loss_per_sample.append(float(out.aux_loss))
            stats.tokens += x.shape[1]
            stats.pairs += x.shape[1] - 1
            chosen = []
            for row, (logits, bias) in enumerate(zip(out.router_logits, biases)):
                probs = logits.float().softmax(-1)  # (S, E)
                idx = (probs + bias).topk(K, dim=-1).indices  # (S, K): the dispatch rule of MoE.route
                stats.counts[row] += torch.bincount(idx.flatten(), minlength=E).cpu().numpy()
                # (S-1, K, K): token t's picks against token t+1's (each row's K ids are distinct)
                stats.shared[row] += int((idx[:-1, :, None] == idx[1:, None, :]).sum())
                stats.prob_sum[row] += probs.sum(0).double().cpu().numpy()
                plain = probs.topk(K, dim=-1).indices  # the aux loss counts picks without the bias
                stats.aux_counts += torch.bincount(plain.flatten(), minlength=E).double().cpu().numpy()
                stats.aux_probs += probs.sum(0).double().cpu().numpy()
                if n == show:
                    w = probs.gather(-1, idx)
                    w = w / w.sum(-1, keepdim=True).clamp(min=cfg.moe_norm_min)
                    chosen.append((idx.cpu().numpy(), w.cpu().numpy()))
            if n == show:
                stats.sample_ids = list(ids)
                stats.sample_experts = np.stack([c[0] for c in chosen], axis=1)  # (S, L, K)
                stats.sample_weights = np.stack([c[1] for c in chosen], axis=1)
    return stats


# ---- pictures ----------------------------------------------------------------------------------------------
def find_cjk_font() -> str | None:
    """The family name of an installed CJK font matplotlib can use, or None.

    Also looks at the system font files directly, because matplotlib's font cache may predate a font that was
    installed later.
    """
    from matplotlib import font_manager

    def known() -> str | None:
        names = {f.name for f in font_manager.fontManager.ttflist}
        return next((n for n in CJK_FONTS if n in names), None)

    name = known()
    if name is None:
        for path in font_manager.findSystemFonts():
            if any(
                h in os.path.basename(path).lower().replace("-", "").replace("_", "") for h in CJK_FILE_HINTS
            ):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        name = known()
    return name


def has_cjk(texts: Sequence[str]) -> bool:
    return any(unicodedata.east_asian_width(ch) in ("W", "F") for t in texts for ch in t)


def token_label(tokenizer: Any, tid: int) -> str:
    """A readable label for one token: its text, or its piece when it is a lone UTF-8 byte or blank."""
    text = tokenizer.decode([tid], skip_special_tokens=False)
    if not text.strip() or "\ufffd" in text:
        text = tokenizer.convert_ids_to_tokens([tid])[0]
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\u2581", " ")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_heatmap(stats: RoutingStats, path: str, title: str) -> None:
    """Layer x expert load relative to uniform (1.0): red = overloaded, blue = underused."""
    from matplotlib.colors import TwoSlopeNorm

    L, E = stats.counts.shape
    rel = stats.counts / stats.counts.sum(1, keepdims=True) * E  # (L, E): 1 = uniform share
    fig = _figure(min(2.0 + 0.42 * E, 22.0), min(1.6 + 0.42 * L, 16.0))
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel.max())))
    im = ax.imshow(rel, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7 if E > 32 else 9)
    ax.set_yticks(range(L), [f"layer {i}" for i in stats.moe_layers], fontsize=9)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=10)
    if E <= 16 and L <= 32:
        for r in range(L):
            for e in range(E):
                dark = abs(float(norm(rel[r, e])) - 0.5) > 0.3
                ax.text(
                    e,
                    r,
                    str(int(stats.counts[r, e])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    fig.colorbar(im, ax=ax, label="load / uniform load")
    fig.savefig(path)


def plot_token_grid(stats: RoutingStats, labels: Sequence[str], path: str, title: str) -> None:
    """Tokens (rows) x MoE layers (columns); colour = first-choice expert, text = all k chosen experts."""
    from matplotlib import colormaps

    ex = stats.sample_experts[: len(labels)]  # (S, L, K)
    S, L, _ = ex.shape
    E = stats.num_experts
    cmap = colormaps["tab20"].resampled(E) if E <= 20 else colormaps["turbo"].resampled(E)
    fig = _figure(min(2.8 + 0.75 * L, 22.0), min(1.4 + 0.26 * S, 40.0))
    ax = fig.add_subplot()
    im = ax.imshow(ex[:, :, 0], cmap=cmap, vmin=-0.5, vmax=E - 0.5, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(L), [f"layer {i}" for i in stats.moe_layers], fontsize=8)
    ax.set_yticks(range(S), list(labels), fontsize=9)
    ax.xaxis.tick_top()
    for s in range(S):
        for c in range(L):
            ax.text(c, s, ",".join(str(int(e)) for e in ex[s, c]), ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="first-choice expert", ticks=range(E) if E <= 20 else None)
    fig.savefig(path)


def plot_imbalance(figures: list[dict[str, Any]], aux_loss: float, top_k: int, path: str, title: str) -> None:
    """Three panels per MoE layer: coefficient of variation, max/mean load, normalised entropy."""
    xs = [f"{f['layer']}" for f in figures]
    fig = _figure(max(6.0, 0.3 * len(xs) + 4.0), 6.5)
    axes = fig.subplots(3, 1, sharex=True)
    panels = [
        ("cv", "coefficient of variation", 0.0),
        ("max_over_mean", "max / mean load", 1.0),
        ("normalized_entropy", "entropy / log(E)", 1.0),
    ]
    for ax, (key, label, ideal) in zip(axes, panels):
        ax.bar(xs, [f[key] for f in figures], color="#4c72b0")
        ax.axhline(ideal, color="#c44e52", lw=1, ls="--")
        ax.set_ylabel(label, fontsize=9)
    axes[-1].set_xlabel("MoE layer (dashed line: perfectly balanced)")
    fig.suptitle(f"{title}\naux loss {aux_loss:.4f} (perfect balance: {top_k})", fontsize=10)
    fig.savefig(path)


# ---- the command -------------------------------------------------------------------------------------------
def moe_stats(
    model_path: str,
    data: str,
    out: str,
    *,
    max_samples: int = 64,
    max_length: int | None = None,
    sample: int = 0,
    grid_tokens: int = 48,
    dtype: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the routing pictures and `stats.json` for `model_path` on the texts in `data`; returns the JSON.

    Args:
        max_samples: texts read from `data` (the first ones).
        max_length: tokens per text, longer texts are cut (default: 512, or the context window if shorter).
        sample: which text the token -> expert grid shows.
        grid_tokens: how many of its tokens the grid shows.
    """
    import ernie45
    from ernie45.models import resolve_model_path
    from ernie45.utils import atomic_directory, atomic_write_text

    if max_samples < 1:
        raise ErnieError(f"--max-samples must be >= 1, got {max_samples}")
    if grid_tokens < 1:
        raise ErnieError(f"--grid-tokens must be >= 1, got {grid_tokens}")
    path = resolve_model_path(model_path)
    config = load_config(path)
    if not config.is_moe:
        raise ErnieError(
            f"{path} is a dense model (model_type {config.model_type!r}); moe-stats needs a MoE "
            "model (ernie4_5_moe)"
        )
    if max_length is None:
        max_length = min(512, config.max_position_embeddings)
    if not 1 <= max_length <= config.max_position_embeddings:
        raise ErnieError(
            f"--max-length must be between 1 and the model's context window "
            f"({config.max_position_embeddings}), got {max_length}"
        )
    texts = read_texts(data, max_samples)
    if not 0 <= sample < len(texts):
        raise ErnieError(f"--sample {sample} is out of range: {data} gave {len(texts)} sample(s)")
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise ErnieError(f"destination exists and is not empty: {out} (pass --overwrite to replace it)")

    model, tokenizer = ernie45.load(path, dtype=dtype, device=device)
    samples = [tokenizer.encode(t)[:max_length] for t in texts]
    samples = [s for s in samples if s]
    stats = collect_routing(model, samples, show=min(sample, len(samples) - 1), progress=progress)
    figures = stats.layer_figures()
    shown = stats.sample_ids[:grid_tokens]
    labels = [token_label(tokenizer, t) for t in shown]
    name = os.path.basename(os.path.normpath(path))
    result = {
        "model": name,
        "num_experts": stats.num_experts,
        "top_k": stats.top_k,
        "moe_layers": stats.moe_layers,
        "samples": len(samples),
        "tokens": stats.tokens,
        "aux_loss": stats.aux_loss,
        "aux_loss_per_sample": stats.aux_loss_per_sample,
        "next_token_shared": float(stats.shared.sum() / (stats.pairs * len(stats.moe_layers))) if stats.pairs else 0.0,
        "next_token_shared_random": stats.random_shared,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "layers": figures,
        "sample": {
            "index": sample,
            "token_ids": [int(t) for t in shown],
            "tokens": labels,
            "experts": stats.sample_experts[: len(shown)].tolist(),  # [token][layer][k]
            "weights": np.round(stats.sample_weights[: len(shown)].astype(np.float64), 6).tolist(),
        },
    }

    from matplotlib import rc_context

    font = find_cjk_font()
    if font is None and has_cjk(labels):
        warnings.warn(NO_FONT_WARNING, stacklevel=2)
    rc = {
        "font.sans-serif": ([font] if font else []) + ["DejaVu Sans"],
        "font.family": "sans-serif",
        "axes.unicode_minus": False,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp, rc_context(rc), warnings.catch_warnings():
        # Without a CJK font every Chinese glyph would warn again; the one warning above says it all.
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        plot_heatmap(
            stats,
            os.path.join(tmp, "load_heatmap.png"),
            f"{name}: expert load over {stats.tokens} tokens ({len(samples)} samples, top-{stats.top_k})",
        )
        plot_token_grid(
            stats,
            labels,
            os.path.join(tmp, "token_experts.png"),
            f"{name}: experts chosen per token (sample {sample})",
        )
        plot_imbalance(
            figures,
            stats.aux_loss,
            stats.top_k,
            os.path.join(tmp, "imbalance.png"),
            f"{name}: load imbalance",
        )
        atomic_write_text(
            os.path.join(tmp, "stats.json"), json.dumps(result, indent=1, ensure_ascii=False) + "\n"
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 moe-stats",
        description="MoE routing statistics: load heatmap, token -> expert grid, "
        "load imbalance and aux loss (PNG + JSON).",
    )
    add_model_arg(p, "MoE checkpoint directory or bundled model name")
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help='texts: .jsonl with a "text" field per line, or plain text with one sample per line',
    )
    add_out_arg(p, "output directory (PNGs + stats.json)")
    p.add_argument("--max-samples", type=int, default=64, metavar="N", help="texts to read (default 64)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        metavar="T",
        help="tokens per text (default 512, or the context window if shorter)",
    )
    p.add_argument(
        "--sample", type=int, default=0, metavar="I", help="text shown in the token grid (default 0)"
    )
    p.add_argument(
        "--grid-tokens", type=int, default=48, metavar="N", help="tokens shown in the grid (default 48)"
    )
    add_dtype_arg(p)
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        result = moe_stats(
            args.model,
            args.data,
            args.out,
            max_samples=args.max_samples,
            max_length=args.max_length,
            sample=args.sample,
            grid_tokens=args.grid_tokens,
            dtype=args.dtype,
            device=args.device,
            overwrite=args.overwrite,
        )
    worst = max(result["layers"], key=lambda f: f["cv"])
    print(
        f"{result['samples']} samples, {result['tokens']} tokens; aux loss {result['aux_loss']:.4f}; "
        f"most imbalanced: layer {worst['layer']} (CV {worst['cv']:.3f}, max/mean {worst['max_over_mean']:.2f})"
    )
    print(
        f"consecutive tokens share {result['next_token_shared']:.2f} of their {result['top_k']} experts per layer "
        f"({result['next_token_shared_random']:.2f} if routing were random)"
    )
    print(f"wrote {', '.join(sorted(os.listdir(args.out)))} to {args.out}")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr)
