"""`ernie45 info DIR` / `ernie45 info FILE.gguf`: what a checkpoint is, without loading its weights (reads
config.json and the safetensors headers, or a GGUF file's metadata and tensor table, only). `--memory` predicts the
resident memory of an inference run before anything is loaded: the weights as they will be held, the KV cache and the
runtime's own overhead. For a GGUF file, whose weights a run holds in another form than the file's, it also tells per
tensor group the GGUF type and how ernie45 holds it, and always predicts the memory."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from typing import Any

from ernie45.commands import add_dtype_arg, add_model_arg, parse_args
from ernie45.errors import ErnieError

# Resident memory of the runtime itself, beside the weights and the KV cache: the Python interpreter, torch (with
# oneDNN / MKL), ernie45 with its compiled C kernels, the tokenizer and the decode scratch buffers. Measured as the
# VmHWM (peak RSS) of processes that import everything and run a tiny model: `ernie45 generate` with 128 new tokens
# on the bundled ernie-tiny and ernie-tiny-moe in fp32, bf16, auto, wint8 and wint4 (torch 2.13 CPU, x86-64 with
# AVX-512, 2 threads) peaked at 326-342 MiB, 354 MiB with the HTTP server modules imported as well, of which the
# models' own weights and cache are under 25 MiB. Rounded up to 400 MiB.
RUNTIME_OVERHEAD_BYTES = 400 * 2**20
DEFAULT_MAX_MODEL_LEN = 4096  # as `ernie45 serve`: min(the context window, 4096)


def checkpoint_info(path: str, dtype: str = "auto") -> dict[str, Any]:
    """Config summary, parameter counts (total and, for MoE, active per token), stored dtypes, files, and the KV
    cache bytes per token in the run dtype `dtype` (auto: what loading picks on this CPU)."""
    from ernie45.checkpoint_read import read_header, safetensors_files
    from ernie45.config import ErnieConfig
    from ernie45.gguf_file import is_gguf
    from ernie45.models import resolve_model_path

    path = resolve_model_path(path)
    if is_gguf(path):
        return gguf_info(path, dtype)
    cfg = ErnieConfig.from_pretrained(path)
    params: Counter[str] = Counter()  # dtype -> parameter count
    routed = 0  # parameters inside routed experts (only moe_k of moe_num_experts run per token)
    mtp = 0  # parameters of the multi-token-prediction layer (a draft model for --speculative mtp)
    for file in safetensors_files(path):
        header, _ = read_header(file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(entry.get("shape", []))
            params[entry["dtype"]] += n
            if ".mlp.experts." in name:
                routed += n
            if name.startswith(("model.mtp", "mtp")):
                mtp += n
    info: dict[str, Any] = {"path": os.path.abspath(path)}
    info.update(_summary(cfg, params, routed, dtype, config_dtype=cfg.torch_dtype))
    info.update(_mtp_summary(cfg, mtp))
    if mtp and "active_parameters" in info:
        info["active_parameters"] -= mtp  # the MTP layer runs only when drafting (--speculative mtp)
    if cfg.quantization_config:
        info["quantization_config"] = cfg.quantization_config
    info["files"] = {
        f: os.path.getsize(os.path.join(path, f))
        for f in sorted(os.listdir(path))
        if not f.startswith(".") and os.path.isfile(os.path.join(path, f))
    }
    return info


def gguf_info(path: str, dtype: str = "auto") -> dict[str, Any]:
    """`checkpoint_info` of a GGUF file: the config its metadata gives, parameters per GGUF type, and per tensor group
    (layers folded into blk.N) its GGUF type and how a run in `dtype` holds it: Q4_0 Linear weights as int4 (group
    32, as stored), other quantized types dequantized to the run dtype."""
    from ernie45.gguf_load import GGUFCheckpoint, group_layout

    src = GGUFCheckpoint(path)
    params: Counter[str] = Counter()
    routed = 0
    for t in src.file.tensors.values():
        params[t.tensor_type.name] += int(t.n_elements)
        if "_exps." in t.name:
            routed += int(t.n_elements)
    info: dict[str, Any] = {
        "path": os.path.abspath(path),
        "format": "gguf",
        "architecture": src.architecture,
        "file_type": None if src.file_type is None else _file_type_name(src.file_type),
    }
    info.update(_summary(src.config, params, routed, dtype))
    if src.config.quantization_config:
        info["quantization_config"] = src.config.quantization_config
    info["tensors"] = [{"group": g, "gguf_type": q, "held_as": held, "count": n}
                       for g, q, held, n in group_layout(src.layout(run_dtype(dtype)))]
    info["files"] = {os.path.basename(path): os.path.getsize(path)}
    return info


def _file_type_name(value: int) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(value).name
    except ValueError:  # written by a newer llama.cpp
        return str(value)


def _summary(cfg, params: Counter[str], routed: int, dtype: str, **extra: Any) -> dict[str, Any]:
    """The config, parameter counts (for MoE also active per token) and KV cache bytes per token in `dtype`."""
    total = sum(params.values())
    info: dict[str, Any] = {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "context_window": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "parameters": total,
        "dtypes": dict(params),
        **extra,
    }
    if cfg.is_moe:
        info.update(
            moe_num_experts=cfg.moe_num_experts,
            moe_k=cfg.moe_k,
            moe_num_shared_experts=cfg.moe_num_shared_experts,
            moe_intermediate_size=cfg.moe_intermediate_size,
            moe_layers=sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)),
            active_parameters=total - routed + routed * cfg.moe_k // cfg.moe_num_experts,
        )
    dt = run_dtype(dtype)
    info["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(cfg, dt)
    info["kv_cache_dtype"] = str(dt).replace("torch.", "")
    return info


def _mtp_summary(cfg, mtp_params: int) -> dict[str, Any]:
    """The MTP layer (`ernie45.mtp`): layers the config declares, their stored parameters (counted in
    `parameters` too, not in a MoE model's `active_parameters`), which hidden state feeds them."""
    from ernie45.mtp import mtp_depth, mtp_variant

    depth = mtp_depth(cfg)
    if not depth and not mtp_params:
        return {}
    out: dict[str, Any] = {"mtp_layers": depth, "mtp_parameters": mtp_params}
    if depth and mtp_params:
        out["mtp_hidden_state"] = mtp_variant(cfg)
    elif depth:
        out["mtp_layers"] = f"{depth} declared, no mtp_* weights (--speculative mtp unavailable)"
    else:
        out["mtp_layers"] = "0 (mtp_* weights ignored: num_nextn_predict_layers is not set)"
    return out


def kv_cache_bytes_per_token(config, dtype, kv_dtype: str = "auto") -> int:
    """Bytes one cached position takes across all layers: keys and values, kv_heads rows each, per layer
    (`kv_dtype` int8: the serving engine's 8-bit cache)."""
    from ernie45.serve.kv import kv_row_bytes

    return 2 * config.num_hidden_layers * config.num_key_value_heads * kv_row_bytes(config.head_dim, dtype, kv_dtype)


def run_dtype(dtype: str = "auto"):
    """The float dtype an inference run on the CPU holds its weights, activations and cache in (`auto`: what the
    loader picks, bf16 where this CPU runs it fast, else fp32)."""
    import torch

    from ernie45.device import resolve_dtype

    return resolve_dtype(dtype, torch.device("cpu"))


def quantization_config_for(model, mode: str, quantize_embedding: bool = False) -> dict[str, Any]:
    """The `quantization_config` `ernie45.quant.quantize_model(model, mode)` would record with its defaults (the
    output head left in float, wint4's group size 128 where it divides every width, else 64); raises the
    ErnieError it would raise (an unknown mode, a width no group size divides). `quantize_embedding`: the token
    embedding in int8 too (`quantize_embedding=True`); embeddings tied to the head need the head quantized as
    well (`quantize_lm_head=True`), so there the head is quantized too."""
    from ernie45.quant import (
        FORMAT_VERSION,
        QUANT_METHOD,
        check_embedding_option,
        quantizable_linears,
        validate_options,
    )

    validate_options(mode)
    tied = bool(model.config.tie_word_embeddings)
    not_convert = [] if quantize_embedding and tied else ["lm_head"]
    if quantize_embedding:
        check_embedding_option(mode, tied, not not_convert)
    qc: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "mode": mode,
                          "modules_to_not_convert": not_convert}
    if quantize_embedding:
        qc["embedding"] = "int8"
    if mode == "wint4":
        from ernie45.quant.linear import check_group_size

        targets = quantizable_linears(model, not_convert)
        group = 128 if all(m.in_features % 128 == 0 for m in targets.values()) else 64
        for name, lin in targets.items():
            check_group_size(group, lin.in_features, name)
        qc["group_size"] = group
    elif mode == "llm.int8":  # uncalibrated: outlier columns are found per batch, none is stored
        qc.update(threshold=6.0, calibration=None, outlier_columns={})
    elif mode == "nf4":
        qc.update(quant_type="nf4", blocksize=64, double_quant=True)
    return qc


def weight_bytes(config, dtype, quantize: str | None = None, quantize_embedding: bool = False,
                 mtp: str | None = None) -> int:
    """Bytes of the weights as a run holds them: one copy of every parameter and buffer of the model built on the
    meta device (nothing is allocated) in `dtype`, the router and correction bias fp32, a tied lm_head once, and
    quantized layers at their quantized sizes — the checkpoint's `quantization_config`, or `quantize`'s
    (`quantize_embedding`: with an int8 token embedding, see `quantization_config_for`). `mtp`: how the checkpoint
    holds an MTP layer the config declares (`_mtp_storage`: "float" or "quantized"); loading quantizes it with the
    rest in wint8 / wint4 (`ernie45.quant.MTP_MODES`), and a quantized checkpoint written before ernie45 did so
    keeps it in `dtype` (`ernie45.mtp.attach_before_swap`)."""
    import itertools

    from ernie45.checkpoint import build_model

    model = build_model(config, dtype, meta=True)
    qc = config.quantization_config
    if quantize_embedding and not quantize:
        raise ErnieError("--quantize-embedding needs --quantize MODE (a quantized checkpoint records its own)")
    if quantize:
        if qc:
            raise ErnieError(f"the checkpoint is already quantized ({qc.get('mode')}); --quantize applies to a "
                             "float checkpoint")
        qc = quantization_config_for(model, quantize, quantize_embedding)
        if quantize_embedding:  # the head gets its own (quantized) tensor
            model.config = config.replace(tie_word_embeddings=False)
    from ernie45.mtp import attach_mtp, has_mtp, mtp_depth

    if mtp and qc and (quantize or mtp == "quantized"):
        attach_mtp(model, mtp_depth(config))  # before the swap: quantized with the rest
    if qc:
        from ernie45.quant import prepare_for_load

        prepare_for_load(model, qc)
        model.tie_weights()  # an int4 head tied to an int4 embedding shares its buffers
    if mtp and not has_mtp(model):
        attach_mtp(model, mtp_depth(config))
    seen: set[int] = set()
    total = 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in seen:  # parameters() already drops the tied lm_head; guard against shared buffers too
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def memory_estimate(path: str, quantize: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                    max_num_seqs: int = 1, quantize_embedding: bool = False,
                    kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """Predicted resident memory of an inference run of `path`: weights (`weight_bytes`) + KV cache
    (`max_num_seqs` sequences of `max_model_len` positions, default min(context window, 4096)) + the runtime's
    fixed overhead (`RUNTIME_OVERHEAD_BYTES`). Nothing is loaded. `quantize_embedding` (with `quantize`): predict
    the checkpoint `ernie45 quantize --quantize-embedding` writes (the token embedding in int8)."""
    from ernie45.checkpoint import load_config
    from ernie45.models import resolve_model_path

    if quantize is not None:
        from ernie45.quant import validate_options

        validate_options(quantize)
    if quantize_embedding and quantize is None:
        raise ErnieError("--quantize-embedding needs --quantize MODE (a quantized checkpoint records its own)")
    if max_model_len is not None and max_model_len <= 0:
        raise ErnieError(f"--max-model-len must be positive, got {max_model_len}")
    if max_num_seqs <= 0:
        raise ErnieError(f"--max-num-seqs must be positive, got {max_num_seqs}")
    cfg = load_config(resolve_model_path(path))
    if max_model_len is None:
        max_model_len = min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    elif max_model_len > cfg.max_position_embeddings:
        raise ErnieError(f"--max-model-len {max_model_len} exceeds the model's context window "
                         f"({cfg.max_position_embeddings})")
    dt = run_dtype(dtype)
    weights = weight_bytes(cfg, dt, quantize, quantize_embedding, mtp=_mtp_storage(resolve_model_path(path), cfg))
    if kv_cache_dtype not in ("auto", "int8"):
        raise ErnieError(f"--kv-cache-dtype must be auto or int8, got {kv_cache_dtype!r}")
    per_token = kv_cache_bytes_per_token(cfg, dt, kv_cache_dtype)
    kv = per_token * max_model_len * max_num_seqs
    qc = cfg.quantization_config
    return {
        "dtype": str(dt).replace("torch.", ""),
        "quantization": quantize or (qc.get("mode") if qc else None),
        "embedding": "int8" if quantize_embedding else (qc.get("embedding") if qc else None),
        "weights_bytes": weights,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_dtype": "int8" if kv_cache_dtype == "int8" else str(dt).replace("torch.", ""),
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "kv_cache_bytes": kv,
        "overhead_bytes": RUNTIME_OVERHEAD_BYTES,
        "total_bytes": weights + kv + RUNTIME_OVERHEAD_BYTES,
    }


def _mtp_storage(path: str, cfg) -> str | None:
    """Whether loading `path` attaches an MTP layer (the config declares one and the files hold `model.mtp_*`),
    and how the files hold it: None, "float", or "quantized" (int8 / int4 weights among its tensors)."""
    from ernie45.checkpoint_read import ST_DTYPES, read_header, safetensors_files
    from ernie45.gguf_file import is_gguf
    from ernie45.mtp import MTP_PREFIX, mtp_depth

    if not mtp_depth(cfg) or is_gguf(path):
        return None
    dtypes = [ST_DTYPES[e["dtype"]] for f in safetensors_files(path) for name, e in read_header(f)[0].items()
              if name.startswith(MTP_PREFIX)]
    if not dtypes:
        return None
    return "float" if all(d.is_floating_point for d in dtypes) else "quantized"


def _binary(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or suffix == "GiB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.2f} {suffix}"
        n /= 1024
    return f"{n}"


def format_memory(mem: dict[str, Any]) -> str:
    q = f", {mem['quantization']} weights" if mem["quantization"] else ""
    if mem.get("embedding"):
        q += f", {mem['embedding']} embedding"
    rows = [
        ("weights", mem["weights_bytes"], f"one copy, {mem['dtype']}{q}"),
        ("KV cache", mem["kv_cache_bytes"], f"{mem['max_num_seqs']} x {mem['max_model_len']:,} positions x "
                                            f"{mem['kv_cache_bytes_per_token']:,} B per token "
                                            f"({mem['kv_cache_dtype']})"),
        ("runtime overhead", mem["overhead_bytes"], "Python, torch, ernie45, C kernels, scratch"),
        ("total", mem["total_bytes"], "predicted peak resident memory"),
    ]
    lines = ["memory (predicted, before loading)"]
    lines += [f"  {name:<18} {_binary(n):>11}  {note}" for name, n, note in rows]
    return "\n".join(lines)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n}{unit}"


def format_info(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}"]
    for k, v in info.items():
        if k in ("path", "files", "dtypes", "tensors"):
            continue
        if k in ("parameters", "active_parameters", "mtp_parameters"):
            v = f"{v:,} ({_human(v)})"
        elif k == "kv_cache_bytes_per_token":
            v = f"{v:,} ({info.get('kv_cache_dtype')})"
        elif k in ("kv_cache_dtype", "memory"):
            continue
        lines.append(f"  {k:<24} {v}")
    lines.append(
        "  stored dtypes            " + ", ".join(f"{d}: {_human(n)}" for d, n in info["dtypes"].items())
    )
    if "tensors" in info:
        lines.append(f"  tensors (GGUF type -> held as, in a {info['kv_cache_dtype']} run)")
        width = max(len(t["group"]) + len(str(t["count"])) + 2 for t in info["tensors"])
        lines += [f"    {t['group'] + ' x' + str(t['count']):<{width}}  {t['gguf_type']:<6} -> {t['held_as']}"
                  for t in info["tensors"]]
    lines.append("  files")
    lines += [f"    {name:<38} {_human(size, 'B'):>9}" for name, size in info["files"].items()]
    if "memory" in info:
        lines.append(format_memory(info["memory"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 info",
        description="Show a checkpoint's config, parameter count, dtypes and files; with --memory, predict the "
        "resident memory of an inference run before loading it.",
    )
    add_model_arg(p, "checkpoint directory, GGUF file or bundled model name", positional="DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--memory", action="store_true",
                   help="predict resident memory: weights as held + KV cache + runtime overhead (implied by "
                        "--quantize, --max-model-len, --max-num-seqs, --kv-cache-dtype)")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="predict for weights quantized on loading: wint8, wint4, llm.int8 or nf4 (as generate / "
                        "serve --quantize; the output head stays float)")
    p.add_argument("--quantize-embedding", action="store_true",
                   help="with --quantize: predict the checkpoint `ernie45 quantize --quantize-embedding` writes, "
                        "the token embedding in int8 with one scale per row (where the embeddings are tied to the "
                        "head, that needs --quantize-lm-head, so the head is counted quantized too)")
    add_dtype_arg(p, help="run dtype; auto: what loading picks on this CPU, bf16 where it is fast, else fp32",
                  one_line_error=True)
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help=f"positions cached per sequence (default: min(context window, {DEFAULT_MAX_MODEL_LEN}))")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="S",
                   help="sequences cached at once (default 1: generate / chat; ernie45 serve allocates its "
                        "--max-num-seqs, default 8)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "int8"],
                   help="the KV cache's dtype: auto (the run dtype) or int8 (ernie45 serve --kv-cache-dtype int8)")
    return p


def main(argv: list[str] | None = None) -> int:
    from ernie45.gguf_file import is_gguf

    args = parse_args(build_parser(), argv)
    memory = args.memory or is_gguf(args.model) or args.quantize_embedding or any(
        v is not None for v in (args.quantize, args.max_model_len, args.max_num_seqs, args.kv_cache_dtype))
    mem = None
    if memory:  # options are checked before anything is read
        mem = memory_estimate(args.model, args.quantize, args.dtype, args.max_model_len,
                              1 if args.max_num_seqs is None else args.max_num_seqs, args.quantize_embedding,
                              args.kv_cache_dtype or "auto")
    info = checkpoint_info(args.model, args.dtype)
    if mem is not None:
        info["memory"] = mem
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
