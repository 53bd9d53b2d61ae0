"""`ernie45 info DIR`: what a checkpoint is, without loading its weights (reads config.json and the
safetensors headers only)."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from typing import Any


def checkpoint_info(path: str) -> dict[str, Any]:
    """Config summary, parameter counts (total and, for MoE, active per token), stored dtypes and files."""
    from ernie45.checkpoint import read_header, safetensors_files
    from ernie45.config import ErnieConfig
    from ernie45.models import resolve_model_path

    path = resolve_model_path(path)
    cfg = ErnieConfig.from_pretrained(path)
    params: Counter[str] = Counter()  # dtype -> parameter count
    routed = 0  # parameters inside routed experts (only moe_k of moe_num_experts run per token)
    for file in safetensors_files(path):
        header, _ = read_header(file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(entry.get("shape", []))
            params[entry["dtype"]] += n
            if ".mlp.experts." in name:
                routed += n
    total = sum(params.values())
    info: dict[str, Any] = {
        "path": os.path.abspath(path),
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
        "config_dtype": cfg.torch_dtype,
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
    if cfg.quantization_config:
        info["quantization_config"] = cfg.quantization_config
    info["files"] = {
        f: os.path.getsize(os.path.join(path, f))
        for f in sorted(os.listdir(path))
        if not f.startswith(".") and os.path.isfile(os.path.join(path, f))
    }
    return info


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n}{unit}"


def format_info(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}"]
    for k, v in info.items():
        if k in ("path", "files", "dtypes"):
            continue
        if k in ("parameters", "active_parameters"):
            v = f"{v:,} ({_human(v)})"
        lines.append(f"  {k:<24} {v}")
    lines.append(
        "  stored dtypes            " + ", ".join(f"{d}: {_human(n)}" for d, n in info["dtypes"].items())
    )
    lines.append("  files")
    lines += [f"    {name:<38} {_human(size, 'B'):>9}" for name, size in info["files"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ernie45 info", description="Show a checkpoint's config, parameter count, dtypes and files."
    )
    p.add_argument("model", metavar="DIR", help="checkpoint directory or bundled model name")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    info = checkpoint_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
