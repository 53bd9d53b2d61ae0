"""`ernie45 export --format aoti SRC OUT`: compile the model ahead of time for the libtorch C++ runtime.

`torch.export` traces `StepModule`, one cached forward step whose KV cache is a pair of plain tensors, and
AOTInductor (`torch._inductor.aoti_compile_and_package`) compiles it into `model.pt2`, which
`torch::inductor::AOTIModelPackageLoader` runs from C++ (deploy/cpp/infer_demo.cc). The sequence length is
dynamic (1..max_seq_len), so the same graph does the prefill (the whole prompt) and each decode step
(one token), and the weights are stored once. The tokenizer, generation config and a manifest
(`ernie45_aoti.json`: shapes, EOS / special ids, chat template pieces) are written alongside; the manifest
is also embedded in the package metadata, which is what the C++ program reads (libtorch has no JSON parser).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ernie45.checkpoint import load_config
from ernie45.errors import ErnieError
from ernie45.model import ErnieForCausalLM, rope_cos_sin

FORMAT_VERSION = 1
PACKAGE_FILE = "model.pt2"
MANIFEST_FILE = "ernie45_aoti.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SEQ_LEN = 2048
# Above this many bytes of weights the constants are appended to the shared library and memory-mapped
# instead of being linked into its data section (torch's advice for models past ~1B parameters).
MMAP_WEIGHTS_BYTES = 1 << 30


class StepModule(nn.Module):
    """One cached forward step over explicit cache tensors: what `torch.export` can trace.

    forward(input_ids (B, S) int64, k_cache, v_cache (L, B, nKV, M, d), pos (1,) int64 = positions filled)
    -> (logits (B, V) fp32 of the last position, new_k, new_v (L, B, nKV, S, d) for positions [pos, pos + S)).
    The layers run their export variants (`DecoderLayer.forward_step`: one SDPA call over [cache slots, new keys]
    for any S, every expert on every token), so the logits match `ErnieForCausalLM` with a `KVCache` to ~1e-6
    (fp32).
    """

    def __init__(self, model: ErnieForCausalLM, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len

    def forward(
        self, input_ids: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        inner, cfg = self.model.model, self.model.config
        S = input_ids.shape[1]
        dev = input_ids.device
        x = inner.embed_tokens(input_ids)
        positions = pos + torch.arange(S, device=dev)  # (S,)
        cos, sin = rope_cos_sin(positions[None], cfg.head_dim, cfg.rope_theta)  # (1, S, d/2)
        filled = torch.arange(self.max_seq_len, device=dev) < pos  # (M,) cache slots holding earlier tokens
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([filled.expand(S, -1), causal], dim=1)  # (S, M + S), True = may attend
        new_k, new_v = [], []
        for i, layer in enumerate(inner.layers):
            x, k, v = layer.forward_step(x, cos, sin, mask, k_cache[i], v_cache[i])
            new_k.append(k)
            new_v.append(v)
        logits = self.model.lm_head(inner.norm(x[:, -1:]))[:, -1].float()  # (B, V)
        return logits, torch.stack(new_k), torch.stack(new_v)

    def empty_cache(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        """Zeroed (k_cache, v_cache) of shape (L, B, nKV, M, d) in the model's dtype."""
        m = self.model
        shape = (m.config.num_hidden_layers, batch_size, m.kv_heads, self.max_seq_len, m.config.head_dim)
        k = torch.zeros(shape, dtype=m.dtype, device=m.device)
        return k, torch.zeros_like(k)


# ---- manifest ------------------------------------------------------------------------------------
def chat_pieces(tokenizer: Any) -> dict[str, str]:
    """The chat template reduced to fixed text around the messages, for a runtime without Jinja.

    ERNIE's template renders `<|begin_of_sentence|>User: {msg}\\nAssistant: ` (one user turn) and
    `<|begin_of_sentence|>{system}\\nUser: {msg}\\nAssistant: ` (with a system message).
    """
    user, system = "\x00user\x00", "\x00system\x00"
    one = tokenizer.apply_chat_template([{"role": "user", "content": user}])
    two = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}]
    )
    if (
        one.count(user) != 1
        or two.count(user) != 1
        or two.count(system) != 1
        or two.find(system) > two.find(user)
    ):
        raise ErnieError(
            "the tokenizer's chat template does not render a single user turn as fixed text around "
            "the message; the C++ runtime cannot apply it"
        )
    user_prefix, user_suffix = one.split(user)
    system_prefix, rest = two.split(system)
    system_between, system_suffix = rest.split(user)
    if system_suffix != user_suffix:
        raise ErnieError(
            "the tokenizer's chat template ends a turn differently with a system message; "
            "the C++ runtime cannot apply it"
        )
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    if probe != user_prefix + "Hi" + user_suffix:
        raise ErnieError(
            "the tokenizer's chat template depends on the message text; the C++ runtime cannot apply it"
        )
    return {
        "user_prefix": user_prefix,
        "user_suffix": user_suffix,
        "system_prefix": system_prefix,
        "system_between": system_between,
    }


def build_manifest(model: ErnieForCausalLM, tokenizer: Any, max_seq_len: int, dtype: str) -> dict[str, Any]:
    """Everything a runtime needs besides the weights: tensor shapes, token ids, chat pieces, sampling defaults."""
    from ernie45.generation import resolve_config

    cfg = model.config
    gen = resolve_config(model)
    n_kv = model.kv_heads
    cache = [cfg.num_hidden_layers, 1, n_kv, max_seq_len, cfg.head_dim]
    new = [cfg.num_hidden_layers, 1, n_kv, "S", cfg.head_dim]
    return {
        "format": "ernie45-aoti",
        "format_version": FORMAT_VERSION,
        "package": PACKAGE_FILE,
        "tokenizer": "tokenizer.model",
        "model_type": cfg.model_type,
        "moe": "all experts computed per token (dense formulation)" if cfg.is_moe else None,
        "dtype": dtype,
        "device": "cpu",
        "max_seq_len": max_seq_len,
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": n_kv,
        "head_dim": cfg.head_dim,
        "inputs": [
            {"name": "input_ids", "shape": [1, "S"], "dtype": "int64", "note": "1 <= S <= max_seq_len - pos"},
            {"name": "k_cache", "shape": cache, "dtype": dtype},
            {"name": "v_cache", "shape": cache, "dtype": dtype},
            {"name": "pos", "shape": [1], "dtype": "int64", "note": "positions already in the cache"},
        ],
        "outputs": [
            {"name": "logits", "shape": [1, cfg.vocab_size], "dtype": "float32", "note": "last position"},
            {"name": "new_k", "shape": new, "dtype": dtype, "note": "write to k_cache[:, :, :, pos:pos+S]"},
            {"name": "new_v", "shape": new, "dtype": dtype, "note": "write to v_cache[:, :, :, pos:pos+S]"},
        ],
        "eos_token_ids": gen.eos_token_ids,
        "stop_token_ids": list(dict.fromkeys(gen.eos_token_ids + tokenizer.stop_token_ids)),
        "special_token_ids": sorted(tokenizer.special_ids),
        "added_tokens": dict(sorted(tokenizer.added_tokens.items(), key=lambda kv: kv[1])),
        "chat_template": chat_pieces(tokenizer),
        "generation": {
            "do_sample": gen.do_sample,
            "temperature": gen.temperature,
            "top_k": gen.top_k,
            "top_p": gen.top_p,
        },
    }


def package_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest as the flat string map stored in the package (read in C++ by `get_metadata()`)."""

    def ints(xs: list[int]) -> str:
        return " ".join(map(str, xs))

    meta = {
        "ernie45.format_version": str(manifest["format_version"]),
        "ernie45.dtype": manifest["dtype"],
        "ernie45.max_seq_len": str(manifest["max_seq_len"]),
        "ernie45.vocab_size": str(manifest["vocab_size"]),
        "ernie45.num_hidden_layers": str(manifest["num_hidden_layers"]),
        "ernie45.num_key_value_heads": str(manifest["num_key_value_heads"]),
        "ernie45.head_dim": str(manifest["head_dim"]),
        "ernie45.eos_token_ids": ints(manifest["eos_token_ids"]),
        "ernie45.stop_token_ids": ints(manifest["stop_token_ids"]),
        "ernie45.special_token_ids": ints(manifest["special_token_ids"]),
        # one "id<TAB>text" per line: the added tokens matched whole before SentencePiece runs
        "ernie45.added_tokens": "\n".join(f"{i}\t{t}" for t, i in manifest["added_tokens"].items()),
    }
    meta.update({f"ernie45.chat.{k}": v for k, v in manifest["chat_template"].items()})
    meta.update(
        {
            f"ernie45.generation.{k}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in manifest["generation"].items()
        }
    )
    return meta


# ---- export --------------------------------------------------------------------------------------
def export_program(step: StepModule) -> torch.export.ExportedProgram:
    """Trace `step` with a dynamic sequence length in [1, max_seq_len] (batch 1)."""
    M = step.max_seq_len
    example = min(M, 5)  # any length >= 2 keeps the dimension symbolic
    ids = torch.zeros((1, example), dtype=torch.long, device=step.model.device)
    k, v = step.empty_cache()
    pos = torch.zeros(1, dtype=torch.long, device=ids.device)
    seq = torch.export.Dim("seq", min=1, max=M)
    with torch.no_grad():
        return torch.export.export(
            step, (ids, k, v, pos), dynamic_shapes=({1: seq}, None, None, None), strict=False
        )


def export_aoti(
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    max_seq_len: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write OUT/{model.pt2, ernie45_aoti.json, tokenizer files, generation_config.json, config.json}.

    Args:
        src: checkpoint directory or bundled model name (None: the bundled default).
        max_seq_len: KV cache length (prompt + generated tokens); default min(context window, 2048).
        dtype: weight and cache dtype, "float32" or "bfloat16".

    Returns:
        OUT, written atomically (nothing is left behind if compilation fails).
    """
    from tqdm import tqdm

    import ernie45
    from ernie45.generation.generate import model_generation_config
    from ernie45.models import resolve_model_path
    from ernie45.utils import atomic_directory, atomic_write_text

    if dtype not in DTYPES:
        raise ErnieError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(src)
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise ErnieError(f"destination exists and is not empty: {out} (pass --overwrite to replace it)")
    config = load_config(path)
    if config.quantization_config:
        raise ErnieError(
            "the AOTInductor export takes an unquantized checkpoint (float32 or bfloat16 weights)"
        )
    context = config.max_position_embeddings
    if max_seq_len is None:
        max_seq_len = min(context, DEFAULT_MAX_SEQ_LEN)
    if not 2 <= max_seq_len <= context:
        raise ErnieError(
            f"--max-seq-len must be in [2, {context}] (the model's context window), got {max_seq_len}"
        )
    bar = tqdm(total=4, desc="load", disable=not progress, unit="stage")
    model, tokenizer = ernie45.load(path, dtype=dtype, device="cpu")
    manifest = build_manifest(model, tokenizer, max_seq_len, dtype)
    bar.update()
    bar.set_description("torch.export")
    program = export_program(StepModule(model, max_seq_len).eval())
    bar.update()
    bar.set_description("AOTInductor compile")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    configs = {
        "aot_inductor.metadata": package_metadata(manifest),
        "aot_inductor.force_mmap_weights": weight_bytes >= MMAP_WEIGHTS_BYTES,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp, warnings.catch_warnings():
        # torch's own pytree deprecation notice, raised inside the compiler: nothing the user can act on
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(tmp, PACKAGE_FILE), inductor_configs=configs
            )
        bar.update()
        bar.set_description("write")
        tokenizer.save_pretrained(tmp)
        model_generation_config(model).save(tmp)
        model.config.save(tmp)
        atomic_write_text(
            os.path.join(tmp, MANIFEST_FILE), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        )
        bar.update()
    bar.close()
    return out


def build_parser() -> argparse.ArgumentParser:
    from ernie45.commands import add_dtype_arg, add_model_arg, add_out_arg

    p = argparse.ArgumentParser(
        prog="ernie45 export",
        description="Compile the model ahead of time (torch.export + AOTInductor) into a package that the "
        "libtorch C++ runtime loads; see deploy/cpp and docs/cpp.md.",
    )
    add_model_arg(p, "checkpoint directory or bundled model name (e.g. ernie-tiny)", positional="SRC")
    add_out_arg(p, "output directory", positional="OUT")
    p.add_argument("--format", default="aoti", choices=["aoti"], help="export format (default aoti)")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        metavar="N",
        help=f"KV cache length, prompt plus generated tokens (default: min(context, {DEFAULT_MAX_SEQ_LEN}))",
    )
    add_dtype_arg(p, "float32", help="weights and KV cache: float32 or bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from ernie45.commands import parse_args

    args = parse_args(build_parser(), argv)
    out = export_aoti(
        args.model,
        args.out,
        max_seq_len=args.max_seq_len,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(out)
    return 0
