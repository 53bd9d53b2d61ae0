"""GGUF files (llama.cpp's format, e.g. the 4-bit files people already have) as ernie45 models: the architectures
`ernie4_5` and `ernie4_5-moe`, named as llama.cpp's converter and `ernie45 export-gguf` name them
(ARCHITECTURE.md §7).

`GGUFCheckpoint` maps the metadata to an `ErnieConfig` and every tensor to the state-dict entries it fills;
`ernie45.checkpoint.load_checkpoint`, the one loading pipeline, builds the model on the meta device, allocates the
final storage and lets `read_into` fill it. Tensors are read through the `gguf` library's `GGUFReader` (a read-only
numpy memory map) in file order, a bounded block of rows at a time, and the file pages of each block are dropped from
the resident set once copied, so the process holds about one copy of the model. How each tensor is held:

- F32, F16, BF16: in the run's dtype (the router and correction bias fp32), as a float checkpoint.
- Q4_0 Linear weights: ernie45's wint4 `Int4Linear` with groups of 32, without requantizing. A Q4_0 block is 32
  codes q in [0, 15] and an fp16 scale d, w = (q - 8) * d: Int4Linear's w = (q - 8) * scale + zero with zero 0,
  bit for bit where the scales are held in fp32 or fp16 (a bf16 run rounds d to bf16).
- Q4_K Linear weights (most of a Q4_K_M file): the same int4 groups of 32, without requantizing. A Q4_K super-block
  of 256 weights holds 8 groups with 6-bit scale and min codes (sc, m) under fp16 (d, dmin): w = d sc q - dmin m,
  Int4Linear's (q - 8) * scale + zero with scale = d sc and zero = 8 scale - dmin m, computed in fp32 (a bf16 or
  fp16 run rounds the scales and zeros to its dtype).
- Q8_0 Linear weights: ernie45's wint8 `Int8Linear` with groups of 32, without requantizing. A Q8_0 block is an
  fp16 scale d and 32 int8 codes q, w = d q: Int8Linear's w = q * scale with one scale per 32 columns, bit for bit
  where the scales are held in fp32 or fp16 (a bf16 run rounds d to bf16). A Q8_0 token embedding: an
  `Int8Embedding` with the same groups, and a head tied to it an Int8Linear over the same tensors.
- a Q4_0 / Q4_K token embedding: an `Int4Embedding` in the same layout; where the output head is tied to it (no
  output.weight, as in the 0.3B), the head is an Int4Linear over the same tensors — one copy for both, as in the file.
- the rest, dequantized by `gguf.quants.dequantize` to the run's dtype: Q5_K / Q6_K (no 5- or 6-bit layout) and
  other types, and quantized routers.

A file mixing Q8_0 and Q4_0 / Q4_K Linears records the more common of wint8 / wint4 as the `quantization_config`
mode and the others under `module_overrides`.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from torch import Tensor

from ernie45.checkpoint_read import _FP32_KEYS, TIED_HEAD_KEYS, _short, build_model, mismatch_problems
from ernie45.config import DENSE, MOE, ErnieConfig
from ernie45.errors import ErnieError
from ernie45.gguf_file import ARCHITECTURES, REQUIRED, GGUFFile

MODEL_TYPES = dict(zip(ARCHITECTURES, (DENSE, MOE)))  # GGUF architecture -> ErnieConfig.model_type
Q4_0_GROUP = 32
Q8_0_GROUP = 32
# Weights converted at a time: the bounded bounce buffer, 4 MB as fp32; `gguf.quants.dequantize` makes a few
# temporaries of that size, and a block of Q4_0 bytes is 7x smaller than its dequantization.
BLOCK_WEIGHTS = 1 << 20
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_CORRECTION = "moe_statics.e_score_correction_bias"
EMBED = "model.embed_tokens"


def _types():
    import gguf

    return gguf.GGMLQuantizationType


def _scalar(f: GGUFFile, key: str, default=REQUIRED):
    """A numeric metadata value; per-layer arrays are accepted when all layers agree."""
    v = f.get(key, default)
    if isinstance(v, list):
        if not v or any(x != v[0] for x in v):
            raise ErnieError(f"{f.path}: {key} differs between layers ({_short([str(x) for x in v])}); ERNIE 4.5 "
                             "layers all have the same shape")
        v = v[0]
    if isinstance(v, float):
        return float(str(np.float32(v)))  # the value written (1e-05), not its float32 neighbour 9.9999997e-06
    return v


def read_config(f: GGUFFile) -> ErnieConfig:
    """The ErnieConfig of a GGUF file's metadata (llama.cpp's keys and defaults; ARCHITECTURE.md §7.3)."""
    arch = f.architecture

    def k(name: str, default=REQUIRED):
        return _scalar(f, f"{arch}.{name}", default)

    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise ErnieError(f"{f.path}: the tensor token_embd.weight is missing")
    vocab = int(embd.shape[-1])  # ggml ne = [hidden, vocab]
    if k("vocab_size", vocab) != vocab:
        raise ErnieError(f"{f.path}: {arch}.vocab_size is {k('vocab_size')} but token_embd.weight has {vocab} rows")
    hidden, heads = k("embedding_length"), k("attention.head_count")
    head_dim = k("attention.key_length", hidden // heads)
    if k("attention.value_length", head_dim) != head_dim or k("rope.dimension_count", head_dim) != head_dim:
        raise ErnieError(f"{f.path}: value_length and rope.dimension_count must equal key_length ({head_dim}) "
                         "in ERNIE 4.5")
    kw = dict(
        model_type=MODEL_TYPES[arch], vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=k("feed_forward_length"), num_hidden_layers=k("block_count"),
        num_key_value_heads=k("attention.head_count_kv", heads), head_dim=head_dim,
        max_position_embeddings=k("context_length"), rms_norm_eps=k("attention.layer_norm_rms_epsilon"),
        rope_theta=float(k("rope.freq_base", 10000.0)), use_bias=False,
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=int(f.get("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(f.get("tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=int(f.get("tokenizer.ggml.padding_token_id", 0)),
    )
    if arch == "ernie4_5-moe":
        inter, start = k("expert_feed_forward_length"), k("leading_dense_block_count")
        shexp = f.tensors.get(f"blk.{start}.ffn_gate_shexp.weight")  # its width, where the count is not written
        shared = k("expert_shared_count", 0 if shexp is None else int(shexp.shape[1]) // inter)
        kw.update(moe_num_experts=k("expert_count"), moe_k=k("expert_used_count"), moe_intermediate_size=inter,
                  moe_layer_start_index=start, moe_layer_interval=k("interleave_moe_layer_step"),
                  moe_num_shared_experts=shared)
    return ErnieConfig(**kw)


def gguf_name(key: str, tmap) -> tuple[str, int | None]:
    """(GGUF tensor, expert index or None) holding the state-dict entry `key` (experts are stacked per layer)."""
    expert = None
    hf = key
    if m := _EXPERT.match(key):
        hf, expert = f"model.layers.{m[1]}.mlp.experts.{m[3]}.weight", int(m[2])
    elif key.endswith(_CORRECTION):
        hf = key.replace("e_score_correction_bias", "e_score_correction.bias")
    name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ErnieError(f"{key} has no GGUF name")
    return name, expert


class GGUFCheckpoint:
    """A GGUF file as ernie45 loads it: `config` (with the `quantization_config` its Q4_0 / Q4_K and Q8_0 Linear
    weights make: wint4 / wint8 with groups of 32, every other Linear left float), and where each state-dict entry
    comes from."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        from ernie45.quant import quantizable_linears, quantization_config

        self.file = f = GGUFFile(path)
        self.path = f.path
        self.architecture = f.architecture
        self.file_type = f.get("general.file_type", None)
        config = read_config(f)
        # The reader keeps a few numpy objects per vocabulary entry (~270 MB for ERNIE's 103k tokens): the
        # tensors need none of the metadata, so drop it before any weight storage exists.
        f.reader.fields.clear()
        arch = gguf.MODEL_ARCH.ERNIE4_5_MOE if config.is_moe else gguf.MODEL_ARCH.ERNIE4_5
        tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        model = build_model(config, meta=True)
        expected = model.state_dict()
        self.sources: dict[str, tuple[str, int | None]] = {
            key: gguf_name(key, tmap) for key in expected
            if not (config.tie_word_embeddings and key == "lm_head.weight")
        }
        self._check(expected, config)
        Q = _types()
        linears = set(quantizable_linears(model))
        int4_types = (Q.Q4_0, Q.Q4_K)
        self.int4 = {name for name in linears if f"{name}.weight" in self.sources
                     and f.tensors[self.sources[f"{name}.weight"][0]].tensor_type in int4_types}
        # an int4 token embedding stays int4; a head tied to it is an Int4Linear over the same tensors
        self.int4_embedding = (f.tensors[self.sources[f"{EMBED}.weight"][0]].tensor_type in int4_types
                               and config.hidden_size % Q4_0_GROUP == 0)
        if self.int4_embedding and config.tie_word_embeddings:
            self.int4.add("lm_head")
        self.int8 = {name for name in linears - self.int4 if f"{name}.weight" in self.sources
                     and f.tensors[self.sources[f"{name}.weight"][0]].tensor_type == Q.Q8_0}
        # likewise an int8 token embedding, and an Int8Linear head over its tensors
        self.int8_embedding = f.tensors[self.sources[f"{EMBED}.weight"][0]].tensor_type == Q.Q8_0
        if self.int8_embedding and config.tie_word_embeddings:
            self.int8.add("lm_head")
        if self.int4 or self.int4_embedding or self.int8 or self.int8_embedding:
            float_linears = sorted(linears - self.int4 - self.int8)
            # the more common kind is the mode, the other one per module
            int8_mode = len(self.int8) > len(self.int4) or not (self.int4 or self.int4_embedding)
            mode, others = ("wint8", self.int4) if int8_mode else ("wint4", self.int8)
            other = {"mode": "wint4" if mode == "wint8" else "wint8", "group_size": Q4_0_GROUP}
            config.quantization_config = quantization_config(
                mode, float_linears, group_size=Q4_0_GROUP, int8_group_size=Q8_0_GROUP,
                embedding="int4" if self.int4_embedding else "int8" if self.int8_embedding else None,
                embedding_group_size=Q8_0_GROUP, module_overrides={name: other for name in sorted(others)})
        self.config = config

    def _check(self, expected: dict[str, Tensor], config: ErnieConfig) -> None:
        """ErnieError naming every missing, unexpected or mis-shaped tensor, or a type nothing can read."""
        import gguf

        Q = _types()
        tensors = self.file.tensors
        wanted = {name for name, _ in self.sources.values()}
        missing = sorted(wanted - set(tensors))
        unexpected = sorted(set(tensors) - wanted)
        bad_shape = []
        for key, (name, expert) in self.sources.items():
            if name not in tensors:
                continue
            t = tensors[name]
            shape = tuple(int(x) for x in reversed(t.shape))  # ggml ne is the row-major shape reversed
            want = tuple(expected[key].shape)
            if expert is not None:
                want = (config.moe_num_experts, *want)
            elif key.endswith(_CORRECTION):
                want = want[-1:]  # (1, E) in the model, (E,) in the file
            if shape != want:
                bad_shape.append(f"{name} {shape} (expected {want})")
        bad_type = []
        for qtype in {t.tensor_type for t in tensors.values()} - {Q.F32, Q.F16, Q.BF16}:
            try:  # one block of zeros
                gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
            except (NotImplementedError, KeyError, ValueError):
                bad_type.append(qtype.name)
        problems = mismatch_problems(missing, sorted(set(bad_shape)), unexpected)
        if bad_type:
            problems.append(f"tensor types the gguf library cannot dequantize: {', '.join(sorted(bad_type))}")
        if problems:
            raise ErnieError(f"{self.path} does not match its {self.architecture} metadata — "
                             + "; ".join(problems))

    def plan(self, model, dt: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """{state-dict name: (dtype, shape)} of the storage to allocate for `model` (built from `config`)."""
        plan = {}
        for key, ref in model.state_dict().items():
            if self.config.tie_word_embeddings and key in TIED_HEAD_KEYS:  # the embedding's tensors (`tie_weights`)
                continue
            if key.endswith(_FP32_KEYS):
                plan[key] = (torch.float32, tuple(ref.shape))
            else:
                plan[key] = (dt if ref.is_floating_point() else ref.dtype, tuple(ref.shape))
        return plan

    def read_into(self, storage: dict[str, Tensor]) -> None:
        """Fill `storage` (from `plan`) tensor by tensor in file order, releasing each block's file pages."""
        targets: dict[str, list[tuple[str, int | None]]] = {}
        for key, (name, expert) in self.sources.items():
            targets.setdefault(name, []).append((key, expert))
        for t in sorted(self.file.tensors.values(), key=lambda t: t.data_offset):
            for key, expert in targets[t.name]:
                module = key.removesuffix(".weight")
                held = self._held_as(module)
                if held == "int4":
                    read = self._read_q4_0 if t.tensor_type == _types().Q4_0 else self._read_q4_k
                    read(t, expert, *(storage[module + s] for s in (".weight", ".weight_scale", ".weight_zero")))
                elif held == "int8":
                    self._read_q8_0(t, expert, storage[module + ".weight"], storage[module + ".weight_scale"])
                else:
                    out = storage[key]
                    flat = out.view(-1, out.shape[-1]) if out.dim() > 1 else out.view(1, -1)
                    for r0, r1, block in self._blocks(t, expert):
                        flat[r0:r1].copy_(_as_torch(block, t.tensor_type))

    def _held_as(self, module: str) -> str | None:
        """"int4" / "int8" where `module`'s weight is held in ernie45's int4 / int8 groups of 32 (the Linears and
        the token embedding read without requantizing), else None."""
        if module in self.int4 or (module == EMBED and self.int4_embedding):
            return "int4"
        if module in self.int8 or (module == EMBED and self.int8_embedding):
            return "int8"
        return None

    def _blocks(self, t, expert: int | None):
        """(r0, r1, rows r0:r1 of tensor `t` (or of its expert) copied out of the map), in bounded blocks; each
        block's pages are released once the caller is done with it."""
        data = t.data if expert is None else t.data[expert]
        data = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
        row_bytes = data.shape[1] * data.itemsize
        start = t.data_offset + (expert or 0) * data.shape[0] * row_bytes
        step = max(1, BLOCK_WEIGHTS // int(t.shape[0]))  # ggml ne[0]: the weights in a row
        for r0 in range(0, data.shape[0], step):
            r1 = min(r0 + step, data.shape[0])
            yield r0, r1, np.array(data[r0:r1])  # a copy: a read-only mapped view cannot become a tensor
            self.file.release(start + r0 * row_bytes, start + r1 * row_bytes)

    def _read_q4_0(self, t, expert: int | None, weight: Tensor, scale: Tensor, zero: Tensor) -> None:
        """Q4_0 blocks (fp16 d, then 16 bytes: element j in the low nibble of byte j, element j + 16 in its high one)
        -> Int4Linear's row-major nibbles (byte i = q[2i] | q[2i + 1] << 4), scale d and zero 0."""
        zero.zero_()
        for r0, r1, block in self._blocks(t, expert):
            b = block.reshape(r1 - r0, -1, 2 + Q4_0_GROUP // 2)  # (rows, groups, 18 bytes)
            scale[r0:r1] = torch.from_numpy(np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0])
            # byte pairs as little-endian uint16 v = b0 | b1 << 8 (b0 = q[2p] | q[2p + 16] << 4, b1 = q[2p + 1] |
            # q[2p + 17] << 4): output byte p holds q[2p], q[2p + 1] and byte 8 + p holds q[2p + 16], q[2p + 17]
            v = np.ascontiguousarray(b[..., 2:]).view(np.uint16)  # (rows, groups, 8)
            lo = (v & 0xF) | ((v >> 4) & 0xF0)
            hi = ((v >> 4) & 0xF) | ((v >> 8) & 0xF0)
            weight[r0:r1] = torch.from_numpy(np.concatenate((lo, hi), axis=-1).astype(np.uint8).reshape(r1 - r0, -1))

    def _read_q8_0(self, t, expert: int | None, weight: Tensor, scale: Tensor) -> None:
        """Q8_0 blocks (fp16 d, then 32 int8 codes in column order) -> Int8Linear's int8 rows and scale d per
        group of 32 (rounded to the scale's dtype: exact in fp32 and fp16)."""
        for r0, r1, block in self._blocks(t, expert):
            b = block.reshape(r1 - r0, -1, 2 + Q8_0_GROUP)  # (rows, groups, 34 bytes)
            scale[r0:r1] = torch.from_numpy(np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0])
            weight[r0:r1] = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(r1 - r0, -1))

    def _read_q4_k(self, t, expert: int | None, weight: Tensor, scale: Tensor, zero: Tensor) -> None:
        """Q4_K super-blocks (fp16 d, fp16 dmin, 12 bytes of 6-bit scale/min codes, 128 bytes: each 32 bytes hold
        group 2c in their low nibbles and group 2c + 1 in their high ones) -> Int4Linear's row-major nibbles,
        scale d sc and zero 8 scale - dmin m (so that (q - 8) scale + zero = d sc q - dmin m)."""
        import gguf

        for r0, r1, block in self._blocks(t, expert):
            rows = r1 - r0
            b = block.reshape(rows, -1, 144)  # (rows, super-blocks, 144 bytes)
            d = np.ascontiguousarray(b[..., 0:2]).view(np.float16).astype(np.float32)  # (rows, nb, 1)
            dmin = np.ascontiguousarray(b[..., 2:4]).view(np.float16).astype(np.float32)
            sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
            s = d * sc.reshape(rows, -1, 8).astype(np.float32)  # (rows, nb, 8): one per group of 32
            scale[r0:r1] = torch.from_numpy(s.reshape(rows, -1))
            zero[r0:r1] = torch.from_numpy((8 * s - dmin * m.reshape(rows, -1, 8).astype(np.float32)).reshape(rows, -1))
            qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)  # (rows, nb, chunk, 1, 32 bytes)
            q = (qs >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15  # (rows, nb, chunk, nibble, 32)
            q = q.reshape(rows, -1, 2)  # codes in weight order, in pairs
            weight[r0:r1] = torch.from_numpy((q[..., 0] | (q[..., 1] << 4)).astype(np.uint8))

    def layout(self, dt: torch.dtype) -> list[tuple[str, str, str]]:
        """(GGUF tensor, its type, how ernie45 holds it) for every tensor, in file order."""
        Q = _types()
        out = []
        name_of = {name: key for key, (name, _) in self.sources.items()}
        for t in sorted(self.file.tensors.values(), key=lambda t: t.data_offset):
            key = name_of[t.name]
            module = key.removesuffix(".weight")
            held_as = self._held_as(module)
            if held_as:  # Q4_0's and Q8_0's scales are fp16: exact in fp32/fp16; Q4_K's d * sc only in fp32
                exact = dt == torch.float32 or (dt == torch.float16 and t.tensor_type in (Q.Q4_0, Q.Q8_0))
                held = f"{held_as}, group 32, " + ("exact" if exact else f"scales rounded to {str(dt)[6:]}")
                if module == EMBED and self.config.tie_word_embeddings:
                    held += "; also the tied output head"
            else:
                held = str(torch.float32 if key.endswith(_FP32_KEYS) else dt).replace("torch.", "")
                if t.tensor_type not in (Q.F32, Q.F16, Q.BF16):
                    held += ", dequantized"
            out.append((t.name, t.tensor_type.name, held))
        return out


def _as_torch(block: np.ndarray, qtype) -> Tensor:
    """A block of rows as a float tensor: F32/F16 as stored, BF16 from its bits, anything else dequantized."""
    Q = _types()
    if qtype in (Q.F32, Q.F16):
        return torch.from_numpy(block)
    if qtype == Q.BF16:
        return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(block, qtype))


def group_layout(layout: list[tuple[str, str, str]]) -> list[tuple[str, str, str, int]]:
    """`GGUFCheckpoint.layout` with the layers folded: (tensor group as blk.N.name, type, held as, tensor count)."""
    counts: dict[tuple[str, str, str], int] = {}
    for name, qtype, held in layout:
        key = (re.sub(r"^blk\.\d+\.", "blk.N.", name), qtype, held)
        counts[key] = counts.get(key, 0) + 1
    return [(*key, n) for key, n in counts.items()]
