"""Quantization as a module swap on a built model: wint8, wint4, llm.int8 (calibrated) and nf4.

`quantize_model(model, "wint4")` replaces every `nn.Linear` except the MoE router (and `lm_head` unless asked)
and, with `quantize_embedding=True`, the token embedding by an int8 one (one scale per row), and records a
`quantization_config` in `model.config`. `ernie45.checkpoint.save_checkpoint` then writes a
checkpoint that `ernie45.load(dir)` reads with no flags: the loader calls `prepare_for_load`, which makes the
same swap on the empty (meta-device) model before the tensors are assigned.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ernie45.errors import ErnieError

MODES = ("wint8", "wint4", "llm.int8", "nf4")
QUANT_METHOD = "ernie45"
FORMAT_VERSION = 1
EMBED_TOKENS = "model.embed_tokens"  # the token embedding module (`quantize_embedding`)
OVERRIDE_MODES = ("wint8", "wint4")  # quantization_config["module_overrides"]: per-module modes (GGUF files)
MTP_MODES = ("wint8", "wint4")  # modes that quantize the MTP layer (ernie45.mtp); the others keep it in float
EMBEDDING_MODES = ("int8", "int4")  # quantization_config["embedding"]; absent: the embedding is float.
# int4 (`Int4Embedding`, groups of `group_size`) comes from GGUF Q4_0 files only; the quantizer writes int8.

__all__ = [
    "MODES",
    "QuantReport",
    "check_embedding_option",
    "prepare_for_load",
    "quantization_config",
    "quantize_embedding_module",
    "quantize_linear",
    "quantize_model",
    "quantizable_linears",
]


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    rel_error: float  # ||W - dequant(Q)||_F / ||W||_F
    outliers: int | None = None  # llm.int8: calibrated outlier columns
    clip: float | None = None  # llm.int8: calibrated activation clip (0: none)


@dataclass
class QuantReport:
    """What `quantize_model` did: per-layer weight error, outlier columns, bytes of the swapped layers."""

    mode: str
    layers: list[LayerReport] = field(default_factory=list)
    bytes_before: int = 0  # the replaced Linear (and embedding) tensors, as they were
    bytes_after: int = 0  # their quantized replacements
    embedding: LayerReport | None = None  # the int8 token embedding (shape (vocab, hidden)), if quantized

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self, worst: int = 5) -> str:
        if not self.layers and self.embedding is None:
            return f"{self.mode}: no layer was quantized"
        errs = [r.rel_error for r in self.layers]
        lines = [f"mode {self.mode}: {len(self.layers)} Linear layers quantized"]
        if self.embedding is not None:
            e = self.embedding
            lines.append(
                f"token embedding {e.shape[0]}x{e.shape[1]}: int8 per row, weight error {e.rel_error:.4f}"
            )
        lines.append(
            f"quantized {'tensors' if self.embedding is not None else 'layers'}: "
            f"{self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB "
            f"({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)"
        )
        if not errs:
            return "\n".join(lines)
        lines.append(f"weight error ||W-Wq||/||W||: mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
        if self.mode == "llm.int8":
            with_out = [r for r in self.layers if r.outliers]
            lines.append(
                f"calibrated outlier columns: {sum(r.outliers or 0 for r in self.layers)} in "
                f"{len(with_out)} layers"
            )
            lines += [
                f"  {r.name}: {r.outliers} of {r.shape[1]} columns"
                for r in sorted(with_out, key=lambda r: -(r.outliers or 0))[:worst]
            ]
        lines.append("largest weight errors:")
        lines += [
            f"  {r.name} {r.shape[0]}x{r.shape[1]}: {r.rel_error:.4f}"
            for r in sorted(self.layers, key=lambda r: -r.rel_error)[:worst]
        ]
        return "\n".join(lines)


def _skipped(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantizable_linears(model: nn.Module, modules_to_not_convert: Iterable[str] = (),
                        mode: str | None = None) -> dict[str, nn.Linear]:
    """Plain `nn.Linear` modules by name: never the router (`ernie45.model.Router` is a Linear subclass),
    never embeddings or norms (not Linears), minus names equal to or ending in a skipped pattern.

    With `mode`, the MTP layer's Linears (`model.mtp_*`, a draft head) only where `mode` is in `MTP_MODES`: the
    weight-only formats the C decoder's GEMV reads, so a draft streams int8 / int4 like the rest of the model.
    llm.int8 and nf4 leave the layer in float (its one-row drafts then run the C GEMV on float weights)."""
    skip = list(modules_to_not_convert)
    mtp = mode is None or mode in MTP_MODES
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear and not _skipped(name, skip)
            and (mtp or not name.startswith("model.mtp_"))}


def validate_options(
    mode: str,
    group_size: int = 128,
    threshold: float = 6.0,
    calib_method: str = "kl",
    percentile: float = 99.99,
) -> None:
    """Reject bad options before any model is loaded."""
    from ernie45.quant.calibrate import CALIB_METHODS
    from ernie45.quant.linear import GROUP_SIZES

    if mode not in MODES:
        raise ErnieError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "wint4" and group_size not in GROUP_SIZES:
        raise ErnieError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if not threshold > 0:
        raise ErnieError(f"outlier threshold must be > 0, got {threshold}")
    if calib_method not in CALIB_METHODS:
        raise ErnieError(
            f"unknown calibration method {calib_method!r}; choose from {', '.join(CALIB_METHODS)}"
        )
    if not 50.0 < percentile <= 100.0:
        raise ErnieError(f"percentile must be in (50, 100], got {percentile}")


def check_embedding_option(mode: str, tied: bool, head_quantized: bool) -> None:
    """`quantize_embedding`'s rule: any mode but nf4; embeddings tied to the output head need the head quantized
    too (`quantize_lm_head`): the head is then quantized from the float embeddings and untied, the embedding
    quantized on its own. A float head cannot share an int8 table."""
    if mode == "nf4":
        raise ErnieError(
            "quantize_embedding (--quantize-embedding) works with wint8, wint4 and llm.int8, not nf4"
        )
    if tied and not head_quantized:
        raise ErnieError(
            "the token embedding is tied to the output head (tie_word_embeddings), which would stay float: "
            "quantize_embedding (--quantize-embedding) needs quantize_lm_head=True (--quantize-lm-head, and "
            "lm_head not skipped), so that the head is quantized from the float embedding and untied"
        )


def quantize_embedding_module(embedding: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, float]:
    """The token embedding -> (its `Int8Embedding`, relative weight error): the quantizer `quantize_model` and
    `ernie45.quant.stream.StreamQuantizer` share, so that both give the same tensors."""
    from ernie45.quant.linear import Int8Embedding, rel_error

    stats: dict = {}
    new = Int8Embedding.from_float(embedding, dtype, stats=stats)
    return new, rel_error(stats)


def quantize_linear(
    lin: nn.Linear,
    mode: str,
    dtype: torch.dtype,
    *,
    group_size: int = 128,
    threshold: float = 6.0,
    outliers: torch.Tensor | None = None,
    clip: float = 0.0,
    nf4: type[nn.Module] | None = None,
) -> tuple[nn.Module, float]:
    """One Linear -> (its quantized replacement, relative weight error ||W - dequant(Q)||_F / ||W||_F).

    The quantizer used by `quantize_model` and by the tensor-by-tensor `ernie45.quant.stream.StreamQuantizer`,
    so that both give the same tensors. `nf4`: the class from `nf4_linear_class()` (mode nf4 only).
    """
    from ernie45.quant.linear import Int4Linear, Int8Linear, LLMInt8Linear, rel_error
    from ernie45.quant.nf4 import nf4_linear_class

    stats: dict = {}
    if mode == "wint8":
        new = Int8Linear.from_float(lin, dtype, stats=stats)
    elif mode == "wint4":
        new = Int4Linear.from_float(lin, dtype, group_size, stats=stats)
    elif mode == "llm.int8":
        new = LLMInt8Linear.from_float(lin, dtype, threshold, outliers, clip, stats=stats)
    elif mode == "nf4":
        new = (nf4 or nf4_linear_class()).from_float(lin, dtype)
    else:
        raise ErnieError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    if stats:
        err = rel_error(stats)
    else:  # nf4, calibrated outlier columns: compare with the dequantised weight
        w = lin.weight.detach().float()
        err = float((new.dequantize(torch.float32) - w).norm() / w.norm().clamp(min=1e-30))
    return new, err


def quantization_config(
    mode: str,
    modules_to_not_convert: Sequence[str],
    *,
    group_size: int | None = None,
    threshold: float = 6.0,
    calibration: dict | None = None,
    outlier_columns: dict[str, int] | None = None,
    embedding: str | None = None,
    int8_group_size: int = 0,
    module_overrides: dict[str, dict] | None = None,
    embedding_group_size: int = 0,
) -> dict:
    """The `quantization_config` entry of config.json that `prepare_for_load` reads back. `embedding`: "int8" for
    an `Int8Embedding` token embedding (recorded as `"embedding": "int8"`; absent means float), "int4" for an
    `Int4Embedding` (a GGUF's Q4_0 token_embd; tied to the head where the head is int4 too). `embedding_group_size`
    (int8): 32 records `"embedding_group_size": 32`, an `Int8Embedding` with a scale per 32 columns (a GGUF's Q8_0
    token_embd; tied to the head where the head is int8 with the same groups).

    `int8_group_size` (wint8): 32 records `"group_size": 32`, int8 with one scale per 32 columns (a GGUF's Q8_0
    blocks); absent, as the quantizer writes it, one scale per row. `module_overrides`: {module name: {"mode":
    "wint8" | "wint4", "group_size": ...}} for the Linears held otherwise than `mode` says (a GGUF file mixing Q8_0
    with Q4_0 / Q4_K Linears); absent when none is."""
    qc: dict = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "modules_to_not_convert": list(modules_to_not_convert),
    }
    if embedding is not None:
        if embedding not in EMBEDDING_MODES:
            raise ErnieError(f"unknown embedding quantization {embedding!r}; expected one of {EMBEDDING_MODES}")
        qc["embedding"] = embedding
        if embedding == "int8" and embedding_group_size:
            qc["embedding_group_size"] = embedding_group_size
    if module_overrides:
        qc["module_overrides"] = {k: dict(v) for k, v in module_overrides.items()}
    if mode == "wint8" and int8_group_size:
        qc["group_size"] = int8_group_size
    if mode == "wint4":
        qc["group_size"] = group_size
    elif mode == "llm.int8":
        qc["threshold"] = threshold
        qc["calibration"] = calibration
        qc["outlier_columns"] = dict(outlier_columns or {})
    elif mode == "nf4":
        qc.update(quant_type="nf4", blocksize=64, double_quant=True)
    return qc


def default_group_size(in_features: Iterable[int]) -> int:
    """wint4's automatic group size: 128 when it divides every quantized layer's width, else 64."""
    return 128 if all(k % 128 == 0 for k in in_features) else 64


def select_targets(
    model: nn.Module,
    mode: str,
    group_size: int | None,
    quantize_lm_head: bool,
    skip: Sequence[str],
    quantize_embedding: bool,
) -> tuple[list[str], dict[str, nn.Linear], int | None]:
    """What a quantizer converts (the in-memory one and the streaming one alike): (modules_to_not_convert, the
    Linears to quantize by name, the wint4 group size, picked when None and checked against every width)."""
    from ernie45.quant.linear import check_group_size

    not_convert = list(skip) + ([] if quantize_lm_head else ["lm_head"])
    targets = quantizable_linears(model, not_convert, mode)
    if quantize_embedding:
        check_embedding_option(mode, bool(model.config.tie_word_embeddings), "lm_head" in targets)
    if mode == "wint4":
        if group_size is None:
            group_size = default_group_size(m.in_features for m in targets.values())
        for name, lin in targets.items():
            check_group_size(group_size, lin.in_features, name)
    return not_convert, targets, group_size


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_model(
    model: nn.Module,
    mode: str,
    *,
    group_size: int | None = None,
    threshold: float = 6.0,
    calib: str | os.PathLike | Sequence[str] | None = None,
    tokenizer=None,
    calib_samples: int = 512,
    calib_max_length: int = 512,
    calib_method: str = "kl",
    percentile: float = 99.99,
    quantize_lm_head: bool = False,
    quantize_embedding: bool = False,
    skip: Sequence[str] = (),
    progress: bool = True,
) -> QuantReport:
    """Quantize `model` in place (module swap) and record `quantization_config` in `model.config`.

    Args:
        model: an `ErnieForCausalLM` (any dtype/device) that is not quantized yet.
        mode: "wint8" (int8 weights, per output channel), "wint4" (int4 weights, one scale per `group_size`
            input columns), "llm.int8" (int8 x int8 with float outlier columns) or "nf4" (bitsandbytes).
        group_size: wint4: 32, 64 or 128; None picks 128 when it divides every layer's width, else 64.
        threshold: llm.int8 outlier threshold on |activation|.
        calib: llm.int8 only: a .jsonl / text file or a list of strings; outlier columns and activation clips
            then come from `calib_samples` samples (else outliers are found per batch, as bitsandbytes does).
        tokenizer: encodes `calib` (default: the tokenizer saved next to the model).
        calib_method: "kl" (default), "absmax" or "percentile" (`percentile` %) activation clip.
        quantize_lm_head: also quantize the output head (unties it from the embeddings if tied).
        quantize_embedding: also hold the token embedding in int8, one scale per row (`Int8Embedding`; any mode
            but nf4). Embeddings tied to the head need `quantize_lm_head` (the head is then quantized from the
            float embeddings and untied), else ErnieError.
        skip: module names (or name suffixes, e.g. "down_proj") to leave in float.

    Returns:
        A QuantReport (per-layer weight error, outlier columns, bytes of the swapped layers).
    """
    from tqdm import tqdm

    from ernie45.quant.nf4 import import_bitsandbytes, nf4_linear_class

    validate_options(mode, 128 if group_size is None else group_size, threshold, calib_method, percentile)
    config = model.config
    if config.quantization_config:
        raise ErnieError(
            f"the model is already quantized ({config.quantization_config.get('mode')}); "
            "quantize the original float checkpoint instead"
        )
    if calib is not None and mode != "llm.int8":
        raise ErnieError(f"a calibration set is only used by llm.int8, not {mode}")
    if mode == "nf4":
        import_bitsandbytes()
    not_convert, targets, group_size = select_targets(
        model, mode, group_size, quantize_lm_head, skip, quantize_embedding
    )
    dtype = model.dtype

    stats = None
    if mode == "llm.int8" and calib is not None:
        from ernie45.quant.calibrate import collect_stats, load_calibration_samples

        if tokenizer is None:
            from ernie45.tokenizer import Tokenizer

            src = getattr(model, "name_or_path", None)
            if not src:
                raise ErnieError("calibration needs a tokenizer: pass tokenizer=...")
            tokenizer = Tokenizer.from_pretrained(src)
        samples = load_calibration_samples(
            calib, tokenizer, calib_samples, calib_max_length, config.bos_token_id
        )
        stats = collect_stats(model, samples, targets, calib_method, threshold, progress)

    if quantize_lm_head and config.tie_word_embeddings and "lm_head" in targets:
        config.tie_word_embeddings = False  # the head gets its own (quantized) tensor; embeddings stay float

    report = QuantReport(mode)
    outlier_counts: dict[str, int] = {}
    nf4 = nf4_linear_class() if mode == "nf4" else None
    with torch.no_grad():
        for name, lin in tqdm(
            targets.items(), desc=f"quantize {mode}", disable=not progress, file=sys.stderr, unit="layer"
        ):
            before = _nbytes((lin.weight, lin.bias))
            outliers = clip = idx = None
            if mode == "llm.int8":
                idx = stats[name].outliers(threshold) if stats is not None else None
                clip = stats[name].clip(calib_method, threshold, percentile) if stats is not None else 0.0
            new, err = quantize_linear(
                lin,
                mode,
                dtype,
                group_size=group_size or 128,
                threshold=threshold,
                outliers=idx,
                clip=clip or 0.0,
                nf4=nf4,
            )
            if mode == "llm.int8":
                outliers = int(new.outlier_idx.numel())
                if outliers:
                    outlier_counts[name] = outliers
            report.layers.append(LayerReport(name, (lin.out_features, lin.in_features), err, outliers, clip))
            report.bytes_before += before
            report.bytes_after += _nbytes(new.state_dict().values())
            new.train(lin.training)
            _swap(model, name, new)
        if quantize_embedding:
            emb = model.get_submodule(EMBED_TOKENS)
            new, err = quantize_embedding_module(emb, dtype)
            report.embedding = LayerReport(EMBED_TOKENS, tuple(emb.weight.shape), err)
            report.bytes_before += _nbytes((emb.weight,))
            report.bytes_after += _nbytes(new.state_dict().values())
            new.train(emb.training)
            _swap(model, EMBED_TOKENS, new)

    calibration = (
        None
        if stats is None
        else {
            "method": calib_method,
            "samples": len(samples),
            "max_length": calib_max_length,
            **({"percentile": percentile} if calib_method == "percentile" else {}),
        }
    )
    config.quantization_config = quantization_config(
        mode,
        not_convert,
        group_size=group_size,
        threshold=threshold,
        calibration=calibration,
        outlier_columns=outlier_counts,
        embedding="int8" if quantize_embedding else None,
    )
    return report


def prepare_for_load(model: nn.Module, quantization_config: dict) -> None:
    """Swap the Linears of an empty (meta-device) model for quantized ones shaped like the checkpoint's tensors
    (and the token embedding for an `Int8Embedding` / `Int4Embedding` where `quantization_config["embedding"]` is
    "int8" / "int4").

    Called by `ernie45.checkpoint.load_checkpoint` before `load_state_dict(..., assign=True)`.
    """
    from ernie45.quant.linear import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, LLMInt8Linear
    from ernie45.quant.nf4 import nf4_linear_class

    qc = quantization_config
    if not isinstance(qc, dict):
        raise ErnieError("config.json: quantization_config must be an object")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise ErnieError(
            f"config.json: quantization_config quant_method {method!r} is not an ernie45 format; "
            "load the original float checkpoint and quantize it with `ernie45 quantize` or "
            "--quantize"
        )
    if int(qc.get("format_version", 1)) > FORMAT_VERSION:
        raise ErnieError(
            f"this checkpoint uses quantization format {qc['format_version']}; "
            f"this ernie45 reads up to {FORMAT_VERSION} (upgrade ernie45)"
        )
    mode = qc.get("mode")
    if mode not in MODES:
        raise ErnieError(
            f"config.json: unknown quantization mode {mode!r}; expected one of {', '.join(MODES)}"
        )
    embedding = qc.get("embedding")
    if embedding is not None and embedding not in EMBEDDING_MODES:
        raise ErnieError(
            f"config.json: unknown embedding quantization {embedding!r}; expected one of "
            f"{', '.join(EMBEDDING_MODES)} (upgrade ernie45)"
        )
    if embedding is not None and mode == "nf4":
        raise ErnieError("config.json: an nf4 checkpoint cannot have a quantized embedding")
    tied = getattr(model.config, "tie_word_embeddings", False)
    overrides = qc.get("module_overrides") or {}
    if not isinstance(overrides, dict) or any(
        not isinstance(o, dict) or o.get("mode") not in OVERRIDE_MODES for o in overrides.values()
    ):
        raise ErnieError(
            "config.json: quantization_config module_overrides must map module names to "
            f"{{\"mode\": {' or '.join(map(repr, OVERRIDE_MODES))}, \"group_size\": ...}} (upgrade ernie45)"
        )
    if overrides and mode not in OVERRIDE_MODES:
        raise ErnieError(f"config.json: module_overrides need a wint8 or wint4 mode, not {mode}")
    not_convert = qc.get("modules_to_not_convert", ["lm_head"])
    head_mode, head_group = ((overrides["lm_head"]["mode"], overrides["lm_head"].get("group_size")) if "lm_head" in
                             overrides else (mode, qc.get("group_size")))
    head = None if _skipped("lm_head", not_convert) else head_mode
    embedding_group = int(qc.get("embedding_group_size", 0))
    if embedding == "int8" and tied and not (embedding_group and head == "wint8" and head_group == embedding_group):
        raise ErnieError(
            "config.json: an int8 embedding cannot be tied to the output head (tie_word_embeddings) unless it has "
            "groups (embedding_group_size) and the head is int8 with the same groups"
        )
    if embedding == "int4" and (mode not in OVERRIDE_MODES or "group_size" not in qc
                                or (tied and head != "wint4")):
        raise ErnieError("config.json: an int4 embedding needs wint4 weights, and an int4 head where it is tied")
    dtype = model.dtype
    outliers = qc.get("outlier_columns") or {}
    nf4 = nf4_linear_class() if mode == "nf4" else None
    for name, lin in quantizable_linears(model, not_convert, mode).items():
        args = (lin.in_features, lin.out_features, lin.bias is not None, dtype, "meta")
        o = overrides.get(name)
        how, group = (o["mode"], o.get("group_size")) if o else (mode, qc.get("group_size"))
        if how == "wint8":
            new = Int8Linear(*args, group_size=int(group or 0))
        elif how == "wint4":
            new = Int4Linear(*args, group_size=int(group or 128))
        elif how == "llm.int8":
            new = LLMInt8Linear(
                *args, threshold=float(qc.get("threshold", 6.0)), n_outliers=int(outliers.get(name, 0))
            )
        else:
            new = nf4(*args)
        _swap(model, name, new)
    if embedding is not None:
        old = model.get_submodule(EMBED_TOKENS)
        args = (old.num_embeddings, old.embedding_dim, dtype, "meta", getattr(old, "padding_idx", None))
        new = (Int8Embedding(*args, group_size=embedding_group) if embedding == "int8"
               else Int4Embedding(*args, group_size=int(qc.get("group_size", 128))))
        _swap(model, EMBED_TOKENS, new)
