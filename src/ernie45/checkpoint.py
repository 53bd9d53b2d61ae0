"""Load and save Hugging Face-layout ERNIE 4.5 checkpoints (safetensors, single file or sharded).

The one loading pipeline: config -> model built on the meta device (quantized Linears swapped in for a
quantized checkpoint) -> a placement per tensor (its dtype and final storage: on CPU, the weights the decode
step streams get one huge-page arena in reading order) -> one pass over the shards in file order that reads
every tensor straight into that storage with positional reads. Nothing is memory-mapped, so no file page is
counted twice and nothing of the files stays resident after loading: the process holds one copy of the weights.
Router weights and the correction bias stay fp32; the `mtp*` keys (the multi-token-prediction head) load into
`ernie45.mtp`'s modules when the config declares `num_nextn_predict_layers`, and are ignored otherwise (as
transformers does). `CheckpointReader` is also what quantization, conversion and tensor-parallel loading read
with.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os

import torch
from torch import Tensor

from ernie45.checkpoint_read import (
    TIED_HEAD_KEYS,
    CheckpointReader,
    _numel,
    _short,
    build_model,
    plan_tensors,
)
from ernie45.config import ErnieConfig
from ernie45.errors import ErnieError
from ernie45.mtp import attach_before_swap, plan_mtp, read_mtp

ARENA_MIN_BYTES = 1 << 16  # smaller tensors (norms, biases, scales) are not worth an arena slot


# ---- building and loading --------------------------------------------------------------------------
def hugepage_buffer(nbytes: int) -> Tensor | None:
    """A uint8 tensor of `nbytes` on a 2 MiB boundary, backed by transparent huge pages (None if unsupported)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    buf = mmap.mmap(-1, nbytes + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return None
    arena = torch.frombuffer(buf, dtype=torch.uint8)  # views of it keep `buf` alive
    off = (-arena.data_ptr()) % (2 << 20)
    return arena[off:off + nbytes]


def release_pages(t: Tensor, arenas: list[tuple[int, int]]) -> int:
    """Return the whole pages under `t` to the system when `t` lies in one of `arenas` (buffers from
    `hugepage_buffer`) and nothing else will read it: for a weight replaced by another copy (e.g. pre-packed).
    Reading those bytes afterwards gives zeros. Returns the bytes released."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    if not any(a <= lo and hi <= b for a, b in arenas):
        return 0
    start, end = (lo + 4095) // 4096 * 4096, hi // 4096 * 4096
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(start, end - start, mmap.MADV_DONTNEED) != 0:
        return 0
    return end - start


def decode_stream_names(model) -> list[str]:
    """State-dict names of the large weights a decode step streams, in the order it reads them (embedding,
    each layer's projections and experts, lm_head): the tensors worth a huge-page arena slot."""
    from torch import nn

    from ernie45.quant import kernels
    from ernie45.quant.linear import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear

    names, seen = [], set()
    inner = model.model
    mods = [("model.embed_tokens", inner.embed_tokens)]
    mods += [(f"model.layers.{n}" if n else "model.layers", m) for n, m in inner.layers.named_modules()]
    mods.append(("lm_head", model.lm_head))
    for prefix, mod in mods:
        w = getattr(mod, "weight", None)
        plain = type(mod) in (nn.Linear, nn.Embedding, Int8Embedding, Int4Embedding, Int8Linear) or type(mod).__name__ in (
            "UpcastLinear", "DnnLinear")
        if w is None or not (plain or (type(mod) is Int4Linear and mod._layout == kernels.ROWMAJOR_INT4_LAYOUT)):
            continue
        if w.numel() * w.element_size() >= ARENA_MIN_BYTES and id(w) not in seen:
            seen.add(id(w))
            names.append(f"{prefix}.weight")
    return names


def _allocate(model, plan: dict[str, tuple[torch.dtype, tuple[int, ...]]], dev: torch.device) -> dict[str, Tensor]:
    """Final storage for every planned tensor: on CPU one huge-page arena holds the decode-streamed weights in
    reading order (batch-1 decode streams them once per token; 4 KiB pages cost ~15-20 % of the bandwidth in
    TLB misses), everything else gets its own tensor."""
    out: dict[str, Tensor] = {}
    if dev.type == "cpu":
        names = [n for n in decode_stream_names(model) if n in plan]
        sizes = [(_numel(plan[n][1]) * plan[n][0].itemsize + 4095) // 4096 * 4096 for n in names]
        arena = hugepage_buffer(sum(sizes)) if names else None
        if arena is not None:
            off = 0
            for n, size in zip(names, sizes):
                dtype, shape = plan[n]
                out[n] = arena[off:off + _numel(shape) * dtype.itemsize].view(dtype).view(shape)
                off += size
            model.weight_arenas = [(arena.data_ptr(), arena.data_ptr() + arena.numel())]
    for n, (dtype, shape) in plan.items():
        if n not in out:
            out[n] = torch.empty(shape, dtype=dtype, device=dev)
    return out


def load_config(path: str | os.PathLike) -> ErnieConfig:
    """The ErnieConfig of a checkpoint directory, or of a GGUF file (with the quantization its Q4_0 / Q4_K / Q8_0
    weights imply)."""
    from ernie45.gguf_file import is_gguf

    if is_gguf(path):
        from ernie45.gguf_load import GGUFCheckpoint

        return GGUFCheckpoint(path).config
    return ErnieConfig.from_pretrained(path)


def load_checkpoint(path: str | os.PathLike, dtype: str | torch.dtype = "auto",
                    device: str | torch.device = "auto", quantize: str | None = None):
    """Load an HF-layout checkpoint directory, or a GGUF file (`ernie45.gguf_load`), into an ErnieForCausalLM (eval
    mode), one copy of each weight.

    `quantize`: quantize a float checkpoint while loading ("wint8", "wint4" or uncalibrated "llm.int8", as
    `ernie45.quant.quantize_model` would, bit for bit), one tensor at a time: the float model is never held (a GGUF
    file's float weights are quantized after loading).
    Raises ErnieError naming every missing, unexpected or mis-shaped tensor.
    """
    from ernie45.device import resolve_device, resolve_dtype
    from ernie45.gguf_file import is_gguf

    path = os.fspath(path)
    dev = resolve_device(device)
    if is_gguf(path):
        return _load_gguf(path, resolve_dtype(dtype, dev), dev, quantize)
    config = ErnieConfig.from_pretrained(path)
    dt = resolve_dtype(dtype, dev)
    if dtype == "auto" and dev.type == "cpu" and (config.quantization_config or quantize) \
            and config.torch_dtype == "bfloat16":
        # Quantized weights keep their float rest (embedding, float head, norms) as stored: decode reads those
        # bytes every token, and the C kernels and the dequantising prefill run bf16 on every CPU. On an AVX2 CPU
        # (21B-A3B layers, wint4, 1,241-token prompt): decode 72 against 37 tok/s in fp32, prefill 243 against
        # 280 tok/s, peak RSS 1.97 against 2.56 GB.
        dt = torch.bfloat16
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(CheckpointReader(path))
        if quantize:
            from ernie45.quant.stream import StreamQuantizer

            source = stack.enter_context(StreamQuantizer(reader, config, quantize, dtype=dt))
            config = source.config
            plan = {s.name: (s.dtype, s.shape) for s in source.specs}
            order = list(plan)
        model = build_model(config, dt, dev, meta=True)
        mtp_plan, mtp_fix = {}, {}
        if config.quantization_config:
            from ernie45.quant import prepare_for_load

            attach_before_swap(model, reader.mtp_entries, bool(quantize))
            prepare_for_load(model, config.quantization_config)
        if not quantize:  # (a quantizing source plans and produces the MTP tensors with the others)
            plan = plan_tensors(model, reader, config, dt, path)
            order = sorted(plan, key=lambda n: (reader.entries[n].file, reader.entries[n].offset))  # file order
            mtp_plan, mtp_fix = plan_mtp(model, reader.mtp_entries, dt, path)
        storage = _allocate(model, plan, dev)
        for name in order:
            if quantize:
                storage[name].copy_(source.tensor(name))
            else:
                reader.read(name, out=storage[name])
        if mtp_plan:
            reader.keep_mtp()
            read_mtp(reader, mtp_plan, mtp_fix, storage)
            for name in mtp_plan:
                storage[name] = storage[name].to(dev)
    return _assemble(model, storage, dev, path)


def _load_gguf(path: str, dt: torch.dtype, dev: torch.device, quantize: str | None):
    """A GGUF file through the same steps: the model on the meta device (Int4Linear / Int8Linear where the file holds
    Q4_0 or Q4_K / Q8_0 Linear weights), a placement per tensor, one pass over the file; `model.gguf_layout` records how each tensor is held."""
    from ernie45.generation.config import GenerationConfig
    from ernie45.gguf_load import GGUFCheckpoint
    from ernie45.quant import prepare_for_load, quantize_model

    src = GGUFCheckpoint(path)
    if quantize and src.config.quantization_config:
        raise ErnieError(f"{path} holds Q4_0/Q4_K/Q8_0 weights, loaded as int4/int8 as they are: --quantize applies "
                         "to a file of float (F32/F16/BF16) or dequantized weights")
    model = build_model(src.config, dt, dev, meta=True)
    if src.config.quantization_config:
        prepare_for_load(model, src.config.quantization_config)
    storage = _allocate(model, src.plan(model, dt), dev)
    src.read_into(storage)
    model = _assemble(model, storage, dev, path)
    model.gguf_layout = src.layout(dt)
    model.generation_config = GenerationConfig.from_model_config(src.config)  # a GGUF has no generation_config.json
    if quantize:
        quantize_model(model, quantize, progress=False)
    return model


def _assemble(model, storage: dict[str, Tensor], dev: torch.device, path: str):
    """The loaded model: `storage` assigned, embeddings tied, buffers materialised, eval mode, frozen."""
    model.load_state_dict(storage, strict=False, assign=True)
    model.tie_weights()
    _materialise_buffers(model, dev)
    model.eval()
    model.requires_grad_(False)
    model.name_or_path = path
    return model


def _materialise_buffers(model, device) -> None:
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise ErnieError(f"tensors were not loaded: {_short(leftovers)}")
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                mod._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)


# ---- saving ----------------------------------------------------------------------------------------
def checkpoint_state_dict(model) -> dict[str, Tensor]:
    """The on-disk state dict: per-expert keys, tied lm_head omitted, router kept fp32."""
    sd = {}
    for k, v in model.state_dict().items():
        if k in TIED_HEAD_KEYS and model.config.tie_word_embeddings:
            continue
        sd[k] = v
    return sd


def write_safetensors_shards(sd: dict[str, Tensor], directory: str, max_shard_size: str | int = "2GB") -> None:
    """Write `sd` as model.safetensors, or as shards + model.safetensors.index.json when larger than the limit
    (the streaming writer of `ernie45.convert.safetensors_io`: tensors may share storage, e.g. an arena)."""
    from ernie45.convert.safetensors_io import TensorSpec, write_shards

    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    write_shards(directory, specs, lambda spec: sd[spec.name].detach().cpu(), max_shard_size, progress=False)


def save_checkpoint(model, out_dir: str | os.PathLike, max_shard_size: str | int = "2GB", tokenizer=None,
                    overwrite: bool = True, extra_files: dict[str, str] | None = None) -> None:
    """Save `model` (+ tokenizer) in the HF layout, atomically (a temp dir renamed into place).

    The result loads in transformers (`AutoModelForCausalLM.from_pretrained`) and in ernie45.
    """
    from ernie45.utils import atomic_directory

    cfg = model.config
    dtype_name = str(model.dtype).replace("torch.", "")
    cfg = cfg.replace(torch_dtype=dtype_name)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_safetensors_shards(checkpoint_state_dict(model), tmp, max_shard_size)
        cfg.save(tmp)
        gen = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "pad_token_id": cfg.pad_token_id}
        src_gen = os.path.join(getattr(model, "name_or_path", "") or "", "generation_config.json")
        if os.path.isfile(src_gen):
            with open(src_gen, encoding="utf-8") as f:
                gen = json.load(f)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
