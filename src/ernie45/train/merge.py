"""`ernie45 merge-lora`: fold a LoRA adapter into its base model and write a plain HF-layout checkpoint.

The merged directory needs neither peft nor ernie45 to load (transformers, vLLM, llama.cpp converters); it
keeps the base checkpoint's dtype unless `--dtype` says otherwise, and is written atomically with the
tokenizer and generation config.
"""

from __future__ import annotations

import argparse
import os

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
        dtype: output dtype; "auto" keeps the base checkpoint's `torch_dtype`.
    Returns:
        the output directory.
    """
    from ernie45.checkpoint import load_checkpoint, save_checkpoint
    from ernie45.config import ErnieConfig
    from ernie45.device import resolve_dtype
    from ernie45.tokenizer import Tokenizer
    from ernie45.train.lora import load_adapter, merge_lora, resolve_adapter_dir

    if not os.path.isdir(model_dir):
        raise ErnieError(f"--model: checkpoint directory not found: {model_dir}")
    adapter_dir = resolve_adapter_dir(adapter_dir)
    if os.path.abspath(out_dir) in (os.path.abspath(model_dir), os.path.abspath(adapter_dir)):
        raise ErnieError("--out must differ from --model and --adapter")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ErnieError(f"destination exists and is not empty: {out_dir} (pass --overwrite to replace it)")
    stored = ErnieConfig.from_pretrained(model_dir).torch_dtype or "float32"
    target = resolve_dtype(stored if dtype == "auto" else dtype)
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
    p.add_argument("--model", required=True, help="base checkpoint directory")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (or a finetune run directory)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="output dtype (auto: the base checkpoint's)",
    )
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    out = merge_adapter(ns.model, ns.adapter, ns.out, ns.dtype, ns.max_shard_size, ns.overwrite)
    print(f"merged {ns.adapter} into {ns.model}: {out}")
    return 0
