"""`ernie45 export-gguf`: one GGUF file that llama.cpp and Ollama run directly (weights + tokenizer + template).

Follows llama.cpp's own converter for ERNIE 4.5 (`convert_hf_to_gguf.py`, classes Ernie4_5Model /
Ernie4_5MoeModel; ARCHITECTURE.md §7): architectures `ernie4_5` / `ernie4_5-moe`, the `gguf` library's
tensor-name map, experts stacked per layer, the correction bias as `exp_probs_b.bias`, MTP tensors dropped,
and the SentencePiece vocabulary in llama.cpp's "llama" tokenizer convention. Tensors are read, converted
and written one at a time, so memory stays near the largest (stacked) tensor.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ernie45.commands import add_model_arg, add_out_arg, parse_args
from ernie45.config import ErnieConfig
from ernie45.convert.manifest import sha256_file, verify_checksum_file, write_checksum_file
from ernie45.convert.paddle import open_as_hf
from ernie45.convert.safetensors_io import TensorSource, output_file
from ernie45.errors import ErnieError

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _gguf():
    import gguf

    return gguf


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, logical shape (row-major, i.e. ggml `ne` reversed), type and data recipe."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    make: Callable[[], Tensor]


def _types(outtype: str):
    g = _gguf()
    q, f = g.GGMLQuantizationType, g.LlamaFileType
    return {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
        "q4_0": (q.Q4_0, f.MOSTLY_Q4_0),
    }[outtype]


def tensor_qtype(name: str, shape: tuple[int, ...], outtype: str) -> int:
    """llama.cpp's rule: 1-D tensors, norms, the router and biases stay F32; Q8_0 and Q4_0 fall back to F16
    for rows that are not a multiple of their 32-element block."""
    g = _gguf()
    q = g.GGMLQuantizationType
    if (
        len(shape) <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or ".ffn_gate_inp." in name
    ):
        return q.F32
    qtype = _types(outtype)[0]
    if qtype in (q.Q8_0, q.Q4_0) and shape[-1] % g.GGML_QUANT_SIZES[qtype][0]:
        return q.F16
    return qtype


def plan_tensors(config: ErnieConfig, hf: TensorSource, outtype: str) -> list[PlannedTensor]:
    """The GGUF tensors of a model given as HF-named per-expert tensors."""
    g = _gguf()
    arch = g.MODEL_ARCH.ERNIE4_5_MOE if config.is_moe else g.MODEL_ARCH.ERNIE4_5
    tmap = g.get_tensor_name_map(arch, config.num_hidden_layers)
    experts: dict[tuple[str, str], dict[int, str]] = {}  # (layer, proj) -> {expert: HF name}
    for key in hf.specs:
        if m := _EXPERT.match(key):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = key
    for (layer, proj), members in experts.items():
        if sorted(members) != list(range(config.moe_num_experts)):
            raise ErnieError(
                f"layer {layer}: expected experts 0..{config.moe_num_experts - 1} for {proj}, "
                f"found {sorted(members)}"
            )
    planned: list[PlannedTensor] = []

    def add(key: str, shape: tuple[int, ...], make: Callable[[], Tensor]) -> None:
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ErnieError(
                f"tensor {key} has no llama.cpp (GGUF) name for architecture {g.MODEL_ARCH_NAMES[arch]}"
            )
        planned.append(PlannedTensor(name, tuple(shape), tensor_qtype(name, shape, outtype), make))

    mtp = [key for key in hf.specs if key.startswith("model.mtp")]
    if mtp:  # llama.cpp has no MTP support: say so rather than drop the head silently
        print(f"note: the MTP head ({len(mtp)} model.mtp_* tensors) is not exported: llama.cpp does not use it",
              file=sys.stderr)
    for key, spec in hf.specs.items():
        m = _EXPERT.match(key)
        if key.startswith("model.mtp"):
            continue  # the multi-token-prediction head (see the note above)
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp falls back to token_embd
        if m and m[2] == "0":  # all experts of a layer's projection, stacked: [E, out, in]
            keys = [experts[(m[1], m[3])][j] for j in range(config.moe_num_experts)]
            add(
                f"model.layers.{m[1]}.mlp.experts.{m[3]}.weight",
                (len(keys), *spec.shape),
                lambda keys=keys: torch.stack([hf.get(k) for k in keys]),
            )
        elif m:
            continue
        elif key.endswith("moe_statics.e_score_correction_bias"):  # [1, E] -> [E]
            add(
                key.replace("e_score_correction_bias", "e_score_correction.bias"),
                (spec.shape[-1],),
                lambda key=key: hf.get(key).reshape(-1),
            )
        elif key.endswith(".bias"):
            raise ErnieError(
                f"{key}: llama.cpp's ERNIE 4.5 graph has no biases (use_bias=true models cannot be "
                "exported to GGUF)"
            )
        else:
            add(key, spec.shape, lambda key=key: hf.get(key))
    return planned


def _encode(t: Tensor, qtype: int) -> np.ndarray:
    """Tensor data in the GGUF type (bytes for Q8_0 / Q4_0; bf16 bits as uint16)."""
    g = _gguf()
    q = g.GGMLQuantizationType
    if qtype == q.F32:
        return t.to(torch.float32).numpy()
    if qtype == q.F16:
        return t.to(torch.float16).numpy()
    if qtype == q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return g.quants.quantize(t.to(torch.float32).numpy(), qtype)


def _nbytes_and_info(p: PlannedTensor) -> tuple[tuple[int, ...], np.dtype, int]:
    """What `GGUFWriter.add_tensor_info` needs before the data exists: shape, numpy dtype, byte count."""
    g = _gguf()
    q = g.GGMLQuantizationType
    numel = int(np.prod(p.shape)) if p.shape else 1
    if p.qtype == q.F32:
        return p.shape, np.dtype(np.float32), numel * 4
    if p.qtype == q.F16:
        return p.shape, np.dtype(np.float16), numel * 2
    if p.qtype == q.BF16:
        return p.shape, np.dtype(np.uint16), numel * 2
    byte_shape = g.quant_shape_to_byte_shape(p.shape, p.qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def vocab(path: str, config: ErnieConfig):
    """(tokens, scores, types) as llama.cpp's `_create_vocab_sentencepiece` builds them.

    SentencePiece pieces via the gguf library; tokens listed in `added_tokens_decoder` become CONTROL (special)
    or USER_DEFINED; ids up to `vocab_size` that the model has but the tokenizer lacks are `[PAD{id}]`.
    """
    from ernie45.tokenizer import Tokenizer

    g = _gguf()
    tt = g.TokenType
    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise ErnieError(f"no tokenizer.model in {path}: the GGUF file embeds the tokenizer")
    spv = g.SentencePieceVocab(Path(path))
    base = list(spv.all_tokens())
    n = config.vocab_size
    if len(base) > n:
        raise ErnieError(f"the tokenizer has {len(base)} tokens but the model's vocab_size is {n}")
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(tt.UNUSED)] * n
    for i, (text, score, typ) in enumerate(base):
        tokens[i], scores[i], types[i] = text, float(score), int(typ)
    tok = Tokenizer.from_pretrained(path)
    for sid, entry in (tok.config.get("added_tokens_decoder") or {}).items():
        i = int(sid)
        if i >= n:
            continue
        content = entry["content"] if isinstance(entry, dict) else str(entry)
        special = isinstance(entry, dict) and entry.get("special")
        if not special:
            content = content.replace("\u2581", " ")  # user-defined pieces are matched on raw text
        tokens[i], scores[i] = content.encode("utf-8"), -1000.0
        types[i] = int(tt.CONTROL if special else tt.USER_DEFINED)
    return tokens, scores, types, tok


def add_metadata(w, config: ErnieConfig, name: str, outtype: str) -> None:
    """Model hyper-parameters under llama.cpp's keys (ARCHITECTURE.md §7.3)."""
    g = _gguf()
    w.add_type(g.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(_types(outtype)[1])
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)  # 0.3B: 128, not hidden/heads = 64
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    if config.is_moe:
        w.add_expert_count(config.moe_num_experts)
        w.add_expert_used_count(config.moe_k)
        w.add_interleave_moe_layer_step(config.moe_layer_interval)
        w.add_leading_dense_block_count(config.moe_layer_start_index)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_count(config.moe_num_shared_experts)
        if config.moe_num_shared_experts > 0:
            # llama.cpp's converter writes intermediate_size // num_key_value_heads here, which equals the
            # real shared width only for 21B-A3B (12288 // 4 == 1536 * 2); the real width is right for all.
            w.add_expert_shared_feed_forward_length(
                config.moe_intermediate_size * config.moe_num_shared_experts
            )


def add_tokenizer(w, path: str, config: ErnieConfig) -> None:
    tokens, scores, types, tok = vocab(path, config)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.sp.unk_id())
    w.add_pad_token_id(config.pad_token_id)
    if tok.sep_token_id is not None and tok.sep_token_id != tok.sp.unk_id():
        # <|end_of_sentence|> closes each assistant turn: as EOT, llama.cpp and Ollama stop chat replies on it.
        w.add_sep_token_id(tok.sep_token_id)
        w.add_eot_token_id(tok.sep_token_id)
    w.add_add_bos_token(bool(tok.config.get("add_bos_token", False)))
    w.add_add_eos_token(bool(tok.config.get("add_eos_token", False)))
    w.add_add_space_prefix(bool(tok.config.get("add_prefix_space", False)))
    w.add_chat_template(tok.chat_template)


def export_gguf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    outtype: str = "f16",
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> str:
    """Write `out` (GGUF) from an HF or Paddle checkpoint directory (or an ernie45 wint8/wint4 one, whose
    weights are dequantized and re-encoded), atomically, plus `out.sha256`.

    Args:
        outtype: f32 | f16 | bf16 | q8_0 | q4_0 for the 2-D weights (norms, router and biases stay f32).
        verify: read the file back (tensor table, checksum) before publishing it.
    Returns:
        the output path.
    """
    from tqdm import tqdm

    if outtype not in OUTTYPES:
        raise ErnieError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    src, out = os.fspath(src), os.path.abspath(os.fspath(out))
    if os.path.isdir(out):
        raise ErnieError(f"{out} is a directory; give the path of the .gguf file to write")
    if os.path.exists(out) and not overwrite:
        raise ErnieError(f"{out} exists (pass --overwrite to replace it)")
    config, hf = open_as_hf(src, dequantize=True)
    for i in range(config.num_hidden_layers):
        # llama.cpp: MoE iff i >= leading_dense_block_count and (i + 1) % step == 0 (no end index)
        llama_moe = (
            config.is_moe and i >= config.moe_layer_start_index and (i + 1) % config.moe_layer_interval == 0
        )
        if llama_moe != config.is_moe_layer(i):
            raise ErnieError(
                f"layer {i}: llama.cpp cannot express this MoE layer layout (it has no "
                "moe_layer_end_index); the model cannot be exported to GGUF"
            )
    g = _gguf()
    planned = plan_tensors(config, hf, outtype)
    arch = g.MODEL_ARCH_NAMES[g.MODEL_ARCH.ERNIE4_5_MOE if config.is_moe else g.MODEL_ARCH.ERNIE4_5]
    with output_file(out) as tmp:
        w = g.GGUFWriter(tmp, arch)
        try:
            add_metadata(w, config, os.path.basename(os.path.abspath(src).rstrip(os.sep)), outtype)
            add_tokenizer(w, src, config)
            for p in planned:
                shape, dtype, nbytes = _nbytes_and_info(p)
                w.add_tensor_info(p.name, shape, dtype, nbytes, raw_dtype=p.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for p in tqdm(planned, desc="export-gguf", unit="tensor", disable=not progress, leave=False):
                data = _encode(p.make(), p.qtype)
                if tuple(data.shape) != _nbytes_and_info(p)[0]:
                    raise RuntimeError(f"{p.name}: produced shape {data.shape}, planned {p.shape}")
                w.write_tensor_data(data)
        finally:
            w.close()
        digest = sha256_file(tmp)
        if verify:
            check_gguf(tmp, planned)
    write_checksum_file(out, digest)
    if verify:
        verify_checksum_file(out)
    return out


def check_gguf(path: str, planned: list[PlannedTensor]) -> None:
    """Read a written GGUF back and compare its tensor table with the plan."""
    g = _gguf()
    try:
        reader = g.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ErnieError(f"{path} cannot be read back as GGUF: {e}") from None
    got = {t.name: (tuple(int(x) for x in t.shape[::-1]), int(t.tensor_type)) for t in reader.tensors}
    want = {p.name: (tuple(p.shape), int(p.qtype)) for p in planned}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:5]
        raise ErnieError(f"{path}: the written tensor table differs from the plan: {diff}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 export-gguf",
        description="Export an ERNIE 4.5 checkpoint (HF or Paddle) to GGUF for llama.cpp / Ollama.",
    )
    add_model_arg(p, "checkpoint directory (with tokenizer.model)", positional="SRC")
    add_out_arg(p, "GGUF file to write", metavar="FILE.gguf", positional="OUT.gguf")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES, help="weight type (default f16)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--verify", action="store_true", help="read the file back and check it before publishing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parse_args(build_parser(), argv)
    out = export_gguf(a.model, a.out, a.outtype, overwrite=a.overwrite, verify=a.verify, progress=not a.quiet)
    print(f"wrote {out} ({a.outtype})" + (" (verified)" if a.verify else ""))
    return 0
