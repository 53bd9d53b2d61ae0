"""The bench's shapes and the random-weight checkpoints it runs: written tensor by tensor (so a checkpoint larger
than memory can be made), cached per shape in a work directory, quantized or exported to GGUF once beforehand."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from ernie45.errors import ErnieError

SHAPES: dict[str, dict[str, Any]] = {
    "0.3b": dict(model_type="ernie4_5"),
    # a scaled MoE: first layer dense, 64 experts top-6 of width 512, 2 shared experts
    "moe": dict(model_type="ernie4_5_moe", hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, head_dim=128, moe_num_experts=64, moe_k=6,
                moe_intermediate_size=512, moe_num_shared_experts=2, moe_layer_start_index=1,
                moe_layer_end_index=7, tie_word_embeddings=True),
    "tiny": dict(model_type="ernie4_5", vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    # ERNIE-4.5-21B-A3B's layers: layer 0 dense (FFN 12288), then MoE (64 experts of 1536, top-6, 2 shared);
    # `--layers N` keeps the first N of its 28 (default 3: one dense and two MoE layers)
    "a3b": dict(model_type="ernie4_5_moe", vocab_size=103424, hidden_size=2560, intermediate_size=12288,
                num_hidden_layers=3, num_attention_heads=20, num_key_value_heads=4, head_dim=128, moe_num_experts=64,
                moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2, moe_layer_start_index=1,
                moe_layer_end_index=2, tie_word_embeddings=True, rope_theta=500000.0),
}
FULL_LAYERS = {"a3b": 28}  # shapes whose depth `--layers` sets: the released model's layer count
DISK_DTYPE = {"a3b": "bfloat16"}  # how a shape's random checkpoint is stored (default float32)
_GGUF_TYPE = {"fp32": "f32", "bf16": "f16", "wint8": "q8_0", "wint4": "q4_0"}


def shape_config(shape: str, layers: int | None = None):
    """The ErnieConfig of a bench shape; `layers` (a3b only) keeps the first N layers, the MoE range ending at the
    last one."""
    from ernie45.config import ErnieConfig

    if shape not in SHAPES:
        raise ErnieError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    if shape in FULL_LAYERS and layers is not None:
        if not 1 <= layers <= FULL_LAYERS[shape]:
            raise ErnieError(f"--layers must be in 1..{FULL_LAYERS[shape]} for {shape}, got {layers}")
        spec.update(num_hidden_layers=layers, moe_layer_end_index=layers - 1)
    return ErnieConfig(**spec)


def init_std(config) -> float:
    """The std of the random normal weights: config.json's `initializer_range` (ERNIE 4.5 ships 0.02, the default
    of `ErnieForCausalLM.init_weights` too)."""
    return float(getattr(config, "initializer_range", None) or config.extra.get("initializer_range", 0.02))


def checkpoint_specs(config, dtype):
    """The tensors of `config`'s checkpoint, in file order, as `TensorSpec`s: what `save_checkpoint` would write
    for a model of `dtype` (per-expert tensors, the tied lm_head omitted, router and correction bias fp32). Built
    on the meta device, so nothing is allocated."""
    from ernie45.checkpoint import build_model, checkpoint_state_dict
    from ernie45.convert.safetensors_io import TensorSpec

    model = build_model(config, dtype, meta=True)
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in checkpoint_state_dict(model).items()]


def random_tensor(spec, std: float, seed: int, chunk: int = 1 << 22):
    """One tensor of the random checkpoint: norms 1, biases and the MoE correction bias 0, everything else (the
    router included) normal(0, std) drawn from its own seeded generator, `chunk` values at a time (the fp32 draws of
    the whole tensor are never held)."""
    import torch

    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=spec.dtype)
    if spec.name.endswith(".bias") or "e_score_correction_bias" in spec.name:
        return torch.zeros(spec.shape, dtype=spec.dtype)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(spec.shape, dtype=spec.dtype)
    flat = out.view(-1)
    draw = torch.empty(min(chunk, flat.numel()), dtype=torch.float32)
    for i in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - i)
        d = draw[:n].normal_(0.0, std, generator=g)
        flat[i:i + n].copy_(d)
    return out


def write_random_checkpoint(config, path: str, dtype: str = "float32", seed: int = 0, tokenizer: bool = True,
                            max_shard_size: str | int = "5GB", progress: bool = False) -> str:
    """Write a random-weight checkpoint of `config` (an ErnieConfig) to `path`, atomically, one tensor in memory at a
    time (`write_shards`): the model is never built, so a checkpoint larger than the machine's memory can be written.

    `dtype` is how the weights are stored ("float32" or "bfloat16"; router and correction bias stay fp32).
    `tokenizer`: add the bundled tokenizer, for tools that need one (GGUF export embeds a vocabulary).
    """
    import torch

    from ernie45.convert.safetensors_io import output_directory, write_shards

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ErnieError(f"a random checkpoint is stored as float32 or bfloat16, not {dtype!r}")
    specs = checkpoint_specs(config, torch_dtype)
    index = {s.name: i for i, s in enumerate(specs)}
    std = init_std(config)
    with output_directory(path, overwrite=True) as tmp:
        write_shards(tmp, specs, lambda spec: random_tensor(spec, std, seed * 1_000_003 + index[spec.name]),
                     max_shard_size=max_shard_size, progress=progress)
        config.replace(torch_dtype=dtype).save(tmp)
        gen = {"_from_model_config": True, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
               "pad_token_id": config.pad_token_id}
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)
        if tokenizer:
            from ernie45.models import bundled_path
            from ernie45.tokenizer import Tokenizer

            Tokenizer.from_pretrained(bundled_path()).save_pretrained(tmp)
    return path


def shape_label(shape: str, layers: int | None) -> str:
    """`tiny`, or `a3b (28 layers)` for a shape whose depth `--layers` sets."""
    return f"{shape} ({layers} layers)" if shape in FULL_LAYERS and layers else shape


def checkpoint_name(shape: str, layers: int | None = None) -> str:
    """The cache directory name of a shape's checkpoint: `ernie45-bench-a3b-3l` for a layered shape."""
    if shape in FULL_LAYERS:
        return f"ernie45-bench-{shape}-{shape_config(shape, layers).num_hidden_layers}l"
    return f"ernie45-bench-{shape}"


def make_checkpoint(shape: str, directory: str, layers: int | None = None) -> str:
    """Write (once; cached in `directory` by shape and layer count) the random-weight checkpoint of `shape`: fp32 on
    disk, or bf16 for a3b (as the released checkpoint), with the bundled tokenizer."""
    path = os.path.join(directory, checkpoint_name(shape, layers))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    write_random_checkpoint(shape_config(shape, layers), path, DISK_DTYPE.get(shape, "float32"),
                            progress=sys.stderr.isatty())
    return path


def quantized_path(ckpt: str, mode: str) -> str:
    # "e": the token embedding is quantized too (int8 per row); caches written before that end in -wint8 / -wint4
    return f"{ckpt.rstrip(os.sep)}-{mode}e"


def quantized_checkpoint(ckpt: str, mode: str) -> str:
    """`ckpt` quantized to `mode` (wint8 / wint4) with its output head and its token embedding (int8, one scale per
    row), as llama.cpp's q8_0 / q4_0 GGUF files quantize token_embd, written once beside it."""
    out = quantized_path(ckpt, mode)
    if not os.path.isfile(os.path.join(out, "config.json")):
        from ernie45.quant.cli import quantize_checkpoint

        quantize_checkpoint(ckpt, out, mode, quantize_lm_head=True, quantize_embedding=True, progress=False,
                            overwrite=True)
    return out


def gguf_path(ckpt: str, dtype: str) -> str:
    return os.path.join(ckpt, f"bench-{_GGUF_TYPE[dtype]}.gguf")


def export_gguf(ckpt: str, dtype: str) -> str:
    """The GGUF llama.cpp runs for `dtype` (f32 / f16 / q8_0 / q4_0), exported once into the checkpoint."""
    path = gguf_path(ckpt, dtype)
    if not os.path.exists(path):
        from ernie45.convert.gguf_export import export_gguf as export

        export(ckpt, path, _GGUF_TYPE[dtype], progress=False)
    return path
