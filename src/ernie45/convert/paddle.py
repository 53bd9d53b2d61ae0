"""`ernie45 convert`: ERNIE 4.5 checkpoints between the Paddle (`-Paddle` repos) and Hugging Face (`-PT`) layouts.

Both are safetensors directories. The Paddle layout (ARCHITECTURE.md §4; reference: PaddlePaddle/ERNIE
`tools/paddle2torch/tran_4_5t.py`) differs by the `ernie.` prefix, `[in, out]` Linear weights, fused
`qkv_proj` ([Q|K|V]) and `up_gate_proj` ([gate|up]) tensors, bf16 stored as uint16, and a config with
Paddle-only keys. Conversion streams tensor by tensor, so memory stays near the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable

import torch
from torch import Tensor

from ernie45.commands import add_dtype_arg, add_model_arg, add_out_arg, parse_args
from ernie45.config import DENSE, MOE, ErnieConfig
from ernie45.convert.manifest import verify_manifest, write_manifest
from ernie45.convert.safetensors_io import (
    SafetensorsReader,
    TensorSource,
    TensorSpec,
    check_shards,
    copy_side_files,
    natural_key,
    output_directory,
    write_shards,
)
from ernie45.errors import ErnieError
from ernie45.utils import atomic_write_text

FORMATS = ("paddle", "hf")
PREFIX = {"paddle": "ernie.", "hf": "model."}
LABEL = {"paddle": "Paddle", "hf": "Hugging Face"}
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PADDLE_ARCHITECTURES = {DENSE: "Ernie4_5_ForCausalLM", MOE: "Ernie4_5_MoeForCausalLM"}
# Paddle training/runtime switches that tran_4_5t.py drops from config.json.
PADDLE_ONLY_KEYS = (
    "add_tail_layers",
    "compression_ratio",
    "fuse_gate_detach_matmul",
    "fuse_linear",
    "fuse_ln",
    "fuse_rms_norm",
    "fuse_rope",
    "fuse_swiglu",
    "global_aux_loss",
    "moe_aux_loss_lambda",
    "moe_group_orthogonal_loss",
    "moe_orthogonal_loss_lambda",
    "moe_z_loss_lambda",
    "use_fast_ln",
    "use_flash_attention",
    "use_rmsnorm",
    "max_sequence_length",
    "model_name",
    "paddlenlp_version",
)
# Keys that only make sense to transformers; not written into a Paddle config.
HF_ONLY_KEYS = ("rope_parameters", "transformers_version", "auto_map", "_attn_implementation")
FP32_SUFFIXES = ("mlp.gate.weight", "moe_statics.e_score_correction_bias")
# Vision-model leftovers that the official converter skips.
PADDLE_SKIPPED = re.compile(r"resampler_model|weight_1$")

_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "up_gate_proj": ("gate_proj", "up_proj")}
_FUSED_OF = {part: fused for fused, parts in _PARTS.items() for part in parts}
_HF_FUSABLE = re.compile(
    r"^(?P<base>.+)\.(?P<part>q_proj|k_proj|v_proj|gate_proj|up_proj)\.(?P<kind>weight|bias)$"
)
_PADDLE_FUSED = re.compile(r"^(?P<base>.+)\.(?P<fused>qkv_proj|up_gate_proj)\.(?P<kind>weight|bias)$")
# Linear weights stored whole: transposed between [out, in] (HF) and [in, out] (Paddle).
_LINEAR = re.compile(r"(\.o_proj|\.down_proj|\.mlp\.gate|\.mtp_linear_proj\.\d+)\.weight$")
# 2-D tensors that are not Linear weights and keep their layout.
_AS_IS_2D = re.compile(r"(embed_tokens\.weight|moe_statics\.e_score_correction_bias)$")


class MappedSource(TensorSource):
    """Tensors defined by a recipe each (a function of other sources), listed in output order."""

    def __init__(self) -> None:
        self.specs: dict[str, TensorSpec] = {}
        self._make: dict[str, Callable[[], Tensor]] = {}

    def add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], make: Callable[[], Tensor]) -> None:
        self.specs[name] = TensorSpec(name, dtype, tuple(shape))
        self._make[name] = make

    def get(self, name: str) -> Tensor:
        return self._make[name]()


def _bf16(t: Tensor) -> Tensor:
    """Paddle saves bf16 as numpy uint16 (numpy has no bf16); the bits are bf16."""
    return t.view(torch.bfloat16) if t.dtype == torch.uint16 else t


def _dtype(spec: TensorSpec) -> torch.dtype:
    return torch.bfloat16 if spec.dtype == torch.uint16 else spec.dtype


# ---- layout detection and configs --------------------------------------------------------------------
def detect_layout(names) -> str:
    """'paddle' or 'hf' from the tensor names; refuses a checkpoint that mixes both."""
    paddle = sorted(n for n in names if n.startswith(PREFIX["paddle"]))
    hf = sorted(n for n in names if n.startswith(PREFIX["hf"]))
    if paddle and hf:
        raise ErnieError(
            f"mixed formats: the checkpoint has both Paddle tensors ({paddle[0]}) and Hugging Face "
            f"tensors ({hf[0]})"
        )
    if paddle:
        return "paddle"
    if hf:
        return "hf"
    raise ErnieError("no ERNIE 4.5 tensors found (expected names starting with 'model.' or 'ernie.')")


def read_config(path: str, layout: str) -> ErnieConfig:
    """The model config of a checkpoint in either layout (Paddle-only keys dropped)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ErnieError(f"no config.json in {path}")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ErnieError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ErnieError(f"{file} must hold a JSON object")
    if layout == "paddle":
        raw = {k: v for k, v in raw.items() if k not in PADDLE_ONLY_KEYS}
    return ErnieConfig.from_dict(raw)


def hf_config_dict(config: ErnieConfig) -> dict:
    """config.json in the transformers 5 spelling."""
    return config.to_dict()


def paddle_config_dict(config: ErnieConfig) -> dict:
    """config.json in the Paddle spelling: top-level `rope_theta`, `dtype`, PaddleFormers class names."""
    d = {k: v for k, v in config.to_dict().items() if k not in HF_ONLY_KEYS}
    d["rope_theta"] = config.rope_theta
    d["architectures"] = [PADDLE_ARCHITECTURES[config.model_type]]
    return dict(sorted(d.items()))


# ---- views ---------------------------------------------------------------------------------------------
def hf_view(source: TensorSource) -> MappedSource:
    """HF tensors under their on-disk names, whatever the file used.

    transformers 5 fuses experts in memory (`mlp.experts.gate_up_proj` [E, 2I, H] with rows [gate|up],
    `mlp.experts.down_proj` [E, H, I], `mlp.gate.moe_statics.e_score_correction_bias`); a state dict saved
    straight from memory has those names. They are split back into the per-expert layout here.
    """
    entries: list[tuple[list, str, torch.dtype, tuple[int, ...], Callable[[], Tensor]]] = []

    def add(
        key: list, name: str, dtype: torch.dtype, shape: tuple[int, ...], make: Callable[[], Tensor]
    ) -> None:
        entries.append((key, name, dtype, tuple(shape), make))

    for name, spec in source.specs.items():
        key = natural_key(name)
        fused_experts = len(spec.shape) == 3 and name.endswith(
            ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
        )
        if fused_experts and name.endswith("gate_up_proj"):
            n_exp, two_i, hidden = spec.shape
            inter = two_i // 2
            base = name[: -len("gate_up_proj")]
            # per-expert parts of one fused tensor are listed consecutively, so it is read from disk once
            for e in range(n_exp):
                for part, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, two_i))):
                    add(
                        key + [e, part],
                        f"{base}{e}.{part}.weight",
                        spec.dtype,
                        (inter, hidden),
                        lambda name=name, e=e, rows=rows: source.get(name)[e, rows].contiguous(),
                    )
        elif fused_experts:
            n_exp, hidden, inter = spec.shape
            base = name[: -len("down_proj")]
            for e in range(n_exp):
                add(
                    key + [e, ""],
                    f"{base}{e}.down_proj.weight",
                    spec.dtype,
                    (hidden, inter),
                    lambda name=name, e=e: source.get(name)[e].contiguous(),
                )
        elif name.endswith("mlp.gate.moe_statics.e_score_correction_bias"):
            new = name.replace("mlp.gate.moe_statics", "mlp.moe_statics")
            add(natural_key(new), new, spec.dtype, spec.shape, lambda name=name: source.get(name))
        else:
            add(key, name, spec.dtype, spec.shape, lambda name=name: source.get(name))
    out = MappedSource()
    for _, name, dtype, shape, make in sorted(entries, key=lambda e: e[0]):
        if name in out.specs:
            raise ErnieError(f"tensor {name} is stored twice (fused and per-expert)")
        out.add(name, dtype, shape, make)
    return out


def _check_prefix(names, layout: str) -> None:
    bad = [n for n in names if not n.startswith((PREFIX[layout], "lm_head."))]
    if bad:
        raise ErnieError(
            f"unrecognised tensor names for a {LABEL[layout]} ERNIE 4.5 checkpoint: "
            + ", ".join(bad[:5])
            + (" …" if len(bad) > 5 else "")
        )


def _single_rule(hf_name: str, ndim: int, config: ErnieConfig) -> bool:
    """Whether a one-to-one tensor is transposed between layouts; refuses unknown 2-D tensors."""
    if hf_name == "lm_head.weight":
        return not config.tie_word_embeddings
    if _LINEAR.search(hf_name):
        return True
    if ndim <= 1 or _AS_IS_2D.search(hf_name):
        return False
    raise ErnieError(f"do not know the Paddle layout of tensor {hf_name} (shape has {ndim} dims)")


def _out_dtype(hf_name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if hf_name.endswith(FP32_SUFFIXES) else dtype


def hf_to_paddle(hf: TensorSource, config: ErnieConfig) -> MappedSource:
    """The Paddle tensors computed from HF ones (per-expert names, see `hf_view`)."""
    _check_prefix(hf.specs, "hf")
    out = MappedSource()
    groups: dict[tuple[str, str, str], dict[str, str]] = {}
    order: list[tuple[str, object]] = []
    for name in hf.specs:
        m = _HF_FUSABLE.match(name)
        if m:
            key = (m["base"], _FUSED_OF[m["part"]], m["kind"])
            if key not in groups:
                groups[key] = {}
                order.append(("fused", key))
            groups[key][m["part"]] = name
        else:
            order.append(("single", name))
    for what, item in order:
        if what == "fused":
            base, fused, kind = item
            have = groups[item]
            missing = [p for p in _PARTS[fused] if p not in have]
            if missing:
                raise ErnieError(
                    f"{base}: {', '.join(sorted(have))} present but {', '.join(missing)} missing; "
                    f"cannot build {fused}"
                )
            parts = [have[p] for p in _PARTS[fused]]
            specs = [hf.specs[p] for p in parts]
            if len({s.dtype for s in specs}) > 1 or len({s.shape[1:] for s in specs}) > 1:
                raise ErnieError(f"{base}: the parts of {fused} differ in dtype or input size")
            width = sum(s.shape[0] for s in specs)
            shape = (specs[0].shape[1], width) if kind == "weight" else (width,)

            def make(parts=parts, kind=kind) -> Tensor:
                t = torch.cat([hf.get(p) for p in parts], dim=0)  # [sum(out), in]: Q|K|V or gate|up rows
                return t.T.contiguous() if kind == "weight" else t

            out.add(f"{_to_paddle(base)}.{fused}.{kind}", specs[0].dtype, shape, make)
        else:
            spec = hf.specs[item]
            transpose = _single_rule(item, len(spec.shape), config)
            dtype = _out_dtype(item, spec.dtype)
            shape = spec.shape[::-1] if transpose else spec.shape
            out.add(
                _to_paddle(item),
                dtype,
                shape,
                lambda n=item, tr=transpose, dt=dtype: _relayout(hf.get(n), tr, dt),
            )
    if config.tie_word_embeddings and "lm_head.weight" not in out.specs:
        # tran_4_5t.py reads a tied lm_head as stored [V, H]: Paddle checkpoints carry the embedding copy.
        embed = "model.embed_tokens.weight"
        if embed in hf.specs:
            out.add("lm_head.weight", hf.specs[embed].dtype, hf.specs[embed].shape, lambda: hf.get(embed))
    return out


def paddle_to_hf(paddle: TensorSource, config: ErnieConfig) -> MappedSource:
    """The HF (per-expert, `-PT` layout) tensors computed from Paddle ones."""
    names = [n for n in paddle.specs if not PADDLE_SKIPPED.search(n)]
    _check_prefix(names, "paddle")
    out = MappedSource()
    d = config.head_dim
    for name in names:
        spec = paddle.specs[name]
        dtype = _dtype(spec)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: transformers reuses embed_tokens
        m = _PADDLE_FUSED.match(name)
        if m:
            fused, kind = m["fused"], m["kind"]
            width = spec.shape[-1]  # weight [in, out] or bias [out]
            if fused == "qkv_proj":
                sizes = (
                    config.num_attention_heads * d,
                    config.num_key_value_heads * d,
                    config.num_key_value_heads * d,
                )
                if sum(sizes) != width:
                    raise ErnieError(
                        f"{name} has {width} outputs but config.json implies {sum(sizes)} "
                        f"((heads + 2*kv_heads) * head_dim); the config does not match"
                    )
            else:
                if width % 2:
                    raise ErnieError(f"{name} has an odd number of outputs ({width}); cannot split gate|up")
                sizes = (width // 2, width // 2)
            start = 0
            for part, size in zip(_PARTS[fused], sizes):
                cols = slice(start, start + size)
                start += size
                shape = (size, spec.shape[0]) if kind == "weight" else (size,)

                def make(name=name, cols=cols, kind=kind) -> Tensor:
                    t = _bf16(paddle.get(name))
                    return t[:, cols].T.contiguous() if kind == "weight" else t[cols].contiguous()

                out.add(f"{_to_hf(m['base'])}.{part}.{kind}", dtype, shape, make)
        else:
            hf_name = _to_hf(name)
            transpose = _single_rule(hf_name, len(spec.shape), config)
            dt = _out_dtype(hf_name, dtype)
            shape = spec.shape[::-1] if transpose else spec.shape
            out.add(
                hf_name,
                dt,
                shape,
                lambda n=name, tr=transpose, dt=dt: _relayout(_bf16(paddle.get(n)), tr, dt),
            )
    return out


def _relayout(t: Tensor, transpose: bool, dtype: torch.dtype) -> Tensor:
    t = t.T.contiguous() if transpose else t
    return t.to(dtype)


def _to_paddle(hf_name: str) -> str:
    return PREFIX["paddle"] + hf_name[len(PREFIX["hf"]) :] if hf_name.startswith(PREFIX["hf"]) else hf_name


def _to_hf(paddle_name: str) -> str:
    return (
        PREFIX["hf"] + paddle_name[len(PREFIX["paddle"]) :]
        if paddle_name.startswith(PREFIX["paddle"])
        else paddle_name
    )


def open_checkpoint(
    path: str | os.PathLike, expect: str | None = None, quantized_ok: bool = False
) -> tuple[str, ErnieConfig, SafetensorsReader]:
    """Open a checkpoint directory of either layout: (layout, config, reader). A quantized (ernie45)
    checkpoint is refused unless `quantized_ok`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ErnieError(f"checkpoint not found: {path}")
    if not os.path.isdir(path):
        raise ErnieError(f"{path} is not a checkpoint directory")
    reader = SafetensorsReader(path)
    layout = detect_layout(reader.specs)
    if expect is not None and layout != expect:
        raise ErnieError(
            f"{path} is a {LABEL[layout]} checkpoint (tensor names start with '{PREFIX[layout]}'), "
            f"not {LABEL[expect]}; use --from {layout}"
        )
    config = read_config(path, layout)
    if config.quantization_config and not quantized_ok:
        raise ErnieError(f"{path} is a quantized checkpoint; convert or export the unquantized model")
    return layout, config, reader


def open_as_hf(path: str | os.PathLike, dequantize: bool = False) -> tuple[ErnieConfig, TensorSource]:
    """Any ERNIE checkpoint (HF or Paddle) as HF-named, per-expert tensors. `dequantize`: also accept an
    ernie45 wint8/wint4 checkpoint, presented as the float checkpoint its quantized weights stand for."""
    layout, config, reader = open_checkpoint(path, quantized_ok=dequantize)
    if config.quantization_config:
        return dequantized_view(reader, config)
    return config, (paddle_to_hf(reader, config) if layout == "paddle" else hf_view(reader))


def dequantized_view(reader: SafetensorsReader, config: ErnieConfig) -> tuple[ErnieConfig, TensorSource]:
    """A wint8/wint4 checkpoint as float tensors (one Linear, or the int8 token embedding, dequantised at a time,
    in the scales' dtype) and its config without `quantization_config`: what `ernie45 export-gguf` re-quantizes
    from."""
    from ernie45.quant import kernels

    qc = config.quantization_config
    mode = qc.get("mode")
    if mode not in ("wint8", "wint4"):
        raise ErnieError(f"a {mode} checkpoint cannot be dequantized for export; export the float checkpoint")
    group = int(qc.get("group_size", 128))
    out = MappedSource()
    specs = reader.specs
    for name, spec in specs.items():
        module, _, leaf = name.rpartition(".")
        quantized = f"{module}.weight_scale" in specs
        if quantized and leaf != "weight":
            continue  # scales and zeros are folded into the weight
        if not quantized:
            out.add(name, spec.dtype, spec.shape, lambda n=name: reader.get(n))
            continue
        dtype = specs[f"{module}.weight_scale"].dtype
        # int8 rows, one scale each: wint8 Linears and the int8 token embedding (`"embedding": "int8"`, any mode)
        int8_rows = mode == "wint8" or (module == "model.embed_tokens" and qc.get("embedding") == "int8")
        n_out = spec.shape[0]
        n_in = spec.shape[1] * (1 if int8_rows else 2)

        def make(m=module, int8_rows=int8_rows) -> Tensor:
            w, s = reader.get(f"{m}.weight"), reader.get(f"{m}.weight_scale")
            if int8_rows:  # Int8Linear.dequantize / Int8Embedding.dequantize
                return (w.float() * s.float()[:, None]).to(s.dtype)
            z = reader.get(f"{m}.weight_zero")
            return kernels.dequantize_int4(w, s, z, group, kernels.ROWMAJOR_INT4_LAYOUT, s.dtype)

        out.add(name, dtype, (n_out, n_in), make)
    return config.replace(quantization_config=None), out


# ---- the command ---------------------------------------------------------------------------------------
def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    src_format: str,
    dst_format: str,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> str:
    """Convert a checkpoint directory between the Paddle and HF layouts (atomically, with a manifest).

    Args:
        src_format, dst_format: "paddle" or "hf" (different).
        dtype: "auto" keeps each tensor's dtype; otherwise floating tensors are cast (the router weight and
            the correction bias always stay float32).
        verify: re-read the written files and check them against the manifest before publishing them.
    Returns:
        the destination path.
    """
    for fmt in (src_format, dst_format):
        if fmt not in FORMATS:
            raise ErnieError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(FORMATS)}")
    if src_format == dst_format:
        raise ErnieError(
            f"--from and --to are both {src_format}; use `ernie45 split` to re-shard a checkpoint"
        )
    if dtype not in DTYPES:
        raise ErnieError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if src == dst:
        raise ErnieError("source and destination are the same directory")
    _, config, reader = open_checkpoint(src, expect=src_format)
    view = paddle_to_hf(reader, config) if src_format == "paddle" else hf_to_paddle(hf_view(reader), config)
    cast = DTYPES[dtype]
    specs = []
    for spec in view.specs.values():
        keep = cast is None or not spec.dtype.is_floating_point or spec.name.endswith(FP32_SUFFIXES)
        specs.append(TensorSpec(spec.name, spec.dtype if keep else cast, spec.shape))
    if cast is not None:
        config = config.replace(torch_dtype=dtype)
    to_paddle = dst_format == "paddle"
    with output_directory(dst, overwrite) as tmp:
        digests = write_shards(
            tmp,
            specs,
            lambda s: view.get(s.name).to(s.dtype),
            max_shard_size,
            metadata={"format": "np"} if to_paddle else {"format": "pt"},
            dtype_names={torch.bfloat16: "U16"} if to_paddle else None,
            progress=progress,
        )
        cfg = paddle_config_dict(config) if to_paddle else hf_config_dict(config)
        atomic_write_text(
            os.path.join(tmp, "config.json"), json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
        )
        copy_side_files(src, tmp, skip=("config.json",))
        write_manifest(tmp, digests)
        if verify:
            check_shards(tmp)
            verify_manifest(tmp)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 convert",
        description="Convert an ERNIE 4.5 checkpoint between the Paddle (-Paddle) and Hugging Face (-PT) layouts.",
    )
    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS, help="layout of --model")
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS, help="layout to write")
    add_model_arg(p, "checkpoint directory to read", positional="SRC")
    add_out_arg(p, "directory to create", positional="DST")
    add_dtype_arg(p, help="cast floating tensors (router and correction bias stay float32); auto: keep")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB (default 5GB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--verify", action="store_true", help="re-read the output and check its SHA-256 manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parse_args(build_parser(), argv)
    out = convert_checkpoint(
        a.model,
        a.out,
        a.src_format,
        a.dst_format,
        dtype=a.dtype,
        max_shard_size=a.max_shard_size,
        overwrite=a.overwrite,
        verify=a.verify,
        progress=not a.quiet,
    )
    print(f"wrote {LABEL[a.dst_format]} checkpoint to {out}" + (" (verified)" if a.verify else ""))
    return 0
