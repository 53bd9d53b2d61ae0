"""`ernie45 merge-lora`: fold a LoRA adapter into its base model and write a plain HF-layout checkpoint.

The merged directory needs neither peft nor ernie45 to load (transformers, vLLM, llama.cpp converters); it
keeps the dtype the base checkpoint's weights are stored in unless `--dtype` says otherwise, and is written
atomically with the tokenizer and generation config.
"""

from __future__ import annotations

import argparse
import os

from ernie45.commands import add_dtype_arg, add_model_arg, add_out_arg
from ernie45.errors import ErnieError


def merge_adapter(
    model_dir: str,
    adapter_dir: str,
    out_dir: str,
    dtype: str = "auto",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> str:
    """Load `model_dir`, apply and merge `adapter_dir` (W += scale * B @ A in fp32), save to `out_dir`.

    Args:
        dtype: output dtype; "auto" keeps the dtype the base weights are stored in (not config.json's).
    Returns:
        the output directory.
    """
    from ernie45.checkpoint import load_checkpoint, save_checkpoint
    from ernie45.device import resolve_dtype
    from ernie45.tokenizer import Tokenizer
    from ernie45.train.core import stored_dtype
    from ernie45.train.lora import load_adapter, merge_lora, resolve_adapter_dir

    if not os.path.isdir(model_dir):
        raise ErnieError(f"--model: checkpoint directory not found: {model_dir}")
    adapter_dir = resolve_adapter_dir(adapter_dir)
    if os.path.abspath(out_dir) in (os.path.abspath(model_dir), os.path.abspath(adapter_dir)):
        raise ErnieError("--out must differ from --model and --adapter")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ErnieError(f"destination exists and is not empty: {out_dir} (pass --overwrite to replace it)")
    target = stored_dtype(model_dir) if dtype == "auto" else resolve_dtype(dtype)
    model = load_checkpoint(model_dir, dtype=target, device="cpu")
    load_adapter(model, adapter_dir)
    merge_lora(model)
    tokenizer = (
        Tokenizer.from_pretrained(model_dir)
        if os.path.isfile(os.path.join(model_dir, "tokenizer.model"))
        else None
    )
    save_checkpoint(model, out_dir, max_shard_size=max_shard_size, tokenizer=tokenizer, overwrite=overwrite)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45 merge-lora", description=__doc__.splitlines()[0])
    add_model_arg(p, "base checkpoint directory")
    p.add_argument(
        "--adapter", required=True, metavar="DIR", help="LoRA adapter directory (or a finetune run directory)"
    )
    add_out_arg(p, "output checkpoint directory")
    add_dtype_arg(p, help="output dtype; auto: the dtype the base checkpoint's weights are stored in")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    out = merge_adapter(ns.model, ns.adapter, ns.out, ns.dtype, ns.max_shard_size, ns.overwrite)
    print(f"merged {ns.adapter} into {ns.model}: {out}")
    return 0
