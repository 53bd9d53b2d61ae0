"""Load and save Hugging Face-layout ERNIE 4.5 checkpoints (safetensors, single file or sharded).

Loading memory-maps the files: when the requested dtype equals the stored one, parameters are views into the
mapping (no copy), so peak RSS stays near the checkpoint size. Router weights and the correction bias stay fp32;
`mtp*` keys (the multi-token-prediction head) are ignored, as transformers does.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator

import torch
from torch import Tensor

from ernie45.config import ErnieConfig
from ernie45.errors import ErnieError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FP32_KEYS = ("mlp.gate.weight", "e_score_correction_bias")
_IGNORED_PREFIXES = ("model.mtp", "mtp")


# ---- reading ---------------------------------------------------------------------------------------
def safetensors_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory (index-listed shards, or model.safetensors)."""
    if not os.path.exists(path):
        raise ErnieError(f"model path not found: {path}")
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ErnieError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ErnieError(f"{path}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(path, f) for f in others]
    if any(f.endswith((".bin", ".pdparams", ".pt")) for f in os.listdir(path)):
        raise ErnieError(f"{path} has no safetensors weights; pickle formats (.bin/.pt/.pdparams) are not loaded "
                         "for safety. Convert them to safetensors first.")
    raise ErnieError(f"no model.safetensors (or index) in {path}")


def read_header(file: str) -> tuple[dict, int]:
    """Parse a safetensors header: (tensor table, byte offset of the data section). Validates bounds."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ErnieError(f"{file} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ErnieError(f"{file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ErnieError(f"{file} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ErnieError(f"{file} is not a safetensors file")
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ErnieError(f"{file}: malformed entry for tensor {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise ErnieError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        if data_start + end > size:
            raise ErnieError(f"{file} is truncated (tensor {name!r} ends past the end of the file)")
    return header, data_start


def iter_tensors(file: str, names: set[str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) from one safetensors file as zero-copy views of a private memory map."""
    header, data_start = read_header(file)
    entries = [(k, v) for k, v in header.items() if k != "__metadata__" and (names is None or k in names)]
    if not entries:
        return
    with open(file, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: tensors may be modified
    for name, info in entries:
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        shape = info["shape"]
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
        yield name, t


def read_state_dict(path: str, names: set[str] | None = None) -> dict[str, Tensor]:
    """All tensors of a checkpoint (or just `names`), memory-mapped, keyed by checkpoint names."""
    sd: dict[str, Tensor] = {}
    for file in safetensors_files(path):
        sd.update(iter_tensors(file, names))
    return sd


def _normalise_keys(sd: dict[str, Tensor], config: ErnieConfig) -> dict[str, Tensor]:
    """Drop MTP keys; accept transformers' fused in-memory expert layout too (split it per expert)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_IGNORED_PREFIXES):
            continue
        if k.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H): rows [0:I] gate, [I:2I] up
            base = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):  # (E, H, I)
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e]
        elif k.endswith("mlp.gate.moe_statics.e_score_correction_bias"):
            out[k.replace("mlp.gate.moe_statics", "mlp.moe_statics")] = v
        else:
            out[k] = v
    return out


# ---- building and loading --------------------------------------------------------------------------
def build_model(config: ErnieConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                meta: bool = False):
    """Construct an ErnieForCausalLM (optionally on the meta device, to be filled by `load_state_dict(assign)`)."""
    from ernie45.model import ErnieForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device("meta" if meta else device):
            model = ErnieForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model


def load_checkpoint(path: str | os.PathLike, dtype: str | torch.dtype = "auto",
                    device: str | torch.device = "auto"):
    """Load an HF-layout checkpoint directory into an ErnieForCausalLM (eval mode).

    Raises ErnieError naming every missing, unexpected or mis-shaped tensor.
    """
    from ernie45.device import resolve_device, resolve_dtype

    path = os.fspath(path)
    config = ErnieConfig.from_pretrained(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    files = safetensors_files(path)
    model = build_model(config, dt, dev, meta=True)
    if config.quantization_config:
        from ernie45.quant import prepare_for_load

        prepare_for_load(model, config.quantization_config)
    sd: dict[str, Tensor] = {}
    for file in files:
        sd.update(iter_tensors(file))
    sd = _normalise_keys(sd, config)
    expected = model.state_dict()
    tied = config.tie_word_embeddings
    missing = [k for k in expected if k not in sd and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in sd if k not in expected]
    if tied and "lm_head.weight" in sd and "lm_head.weight" not in expected:
        unexpected.remove("lm_head.weight")
    bad_shape = [f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})"
                 for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if bad_shape:
        problems.append(f"wrong shapes: {_short(bad_shape)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if problems:
        raise ErnieError(f"checkpoint {path} does not match its config.json — " + "; ".join(problems))
    new_sd = {}
    for k, ref in expected.items():
        if k not in sd:
            continue
        t = sd[k]
        target = torch.float32 if k.endswith(_FP32_KEYS) else (ref.dtype if not ref.is_floating_point() else dt)
        if ref.is_floating_point() or t.is_floating_point():
            t = t.to(device=dev, dtype=target if t.is_floating_point() else t.dtype)
        else:
            t = t.to(dev)
        new_sd[k] = t
    if tied:
        new_sd.pop("lm_head.weight", None)
    model.load_state_dict(new_sd, strict=False, assign=True)
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


def _short(items: list[str], n: int = 8) -> str:
    s = ", ".join(items[:n])
    return s + (f" … and {len(items) - n} more" if len(items) > n else "")


# ---- saving ----------------------------------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / '10KB' / bytes -> bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                val = float(s[: -len(unit)])
            except ValueError:
                break
            if val <= 0:
                break
            return int(val * mult)
    if s.isdigit() and int(s) > 0:
        return int(s)
    raise ErnieError(f"invalid size {size!r}; use e.g. 2GB, 500MB")


def checkpoint_state_dict(model) -> dict[str, Tensor]:
    """The on-disk state dict: per-expert keys, tied lm_head omitted, router kept fp32."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        sd[k] = v
    return sd


def write_safetensors_shards(sd: dict[str, Tensor], directory: str, max_shard_size: str | int = "2GB") -> None:
    """Write `sd` as model.safetensors, or as shards + model.safetensors.index.json when larger than the limit."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, Tensor]] = [{}]
    cur = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and cur + nbytes > limit:
            shards.append({})
            cur = 0
        shards[-1][k] = v
        cur += nbytes
    total = sum(v.numel() * v.element_size() for v in sd.values())
    if len(shards) == 1:
        save_file({k: v.detach().contiguous().cpu() for k, v in shards[0].items()},
                  os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, os.path.join(directory, name),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


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
