"""What a Hugging Face-layout checkpoint holds and how it is read: its safetensors files (the index's entries must
name files inside the checkpoint), their headers (validated as the safetensors library does), `CheckpointReader`
(positional reads straight into preallocated storage), and the plan of which tensor loads as what (`plan_tensors`,
on a model built on the meta device). The loading pipeline (`ernie45.checkpoint`), quantization, conversion and
tensor-parallel loading all read through this module; it imports none of them.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from ernie45.config import ErnieConfig
from ernie45.errors import ErnieError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "BOOL": torch.bool,
}
_FP32_KEYS = ("mlp.gate.weight", "e_score_correction_bias")
# a tied head's entries: the embedding's tensors (an int4 head tied to an int4 embedding shares all three)
TIED_HEAD_KEYS = ("lm_head.weight", "lm_head.weight_scale", "lm_head.weight_zero")
_IGNORED_PREFIXES = ("model.mtp", "mtp")
READ_CHUNK = 16 << 20  # bytes per read when a tensor is converted on the way in (a bounded bounce buffer)

MAX_HEADER_BYTES = 100_000_000  # as the safetensors library: a longer header is refused, never read


def inside_checkpoint(directory: str, file: str) -> bool:
    """Whether `file`, symlinks resolved, lies in checkpoint `directory`, so that nothing a checkpoint names is
    read from (or copied out of) anywhere else. A snapshot of the Hugging Face hub cache
    (`models--org--name/snapshots/<rev>/`) holds symlinks into its repository's `blobs/`: those count as inside."""
    root = os.path.realpath(directory)
    roots = [root]
    snapshots = os.path.dirname(root)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        roots.append(os.path.join(repo, "blobs"))
    real = os.path.realpath(file)
    return any(os.path.commonpath([real, r]) == r for r in roots)


def _index_files(path: str, index: str) -> list[str]:
    """The shard names of a safetensors index, each a relative name of a file inside the checkpoint directory."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ErnieError(f"{index} is not a valid safetensors index: {e}") from None
    if not isinstance(weight_map, dict):
        raise ErnieError(f"{index} is not a valid safetensors index: weight_map is not an object")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise ErnieError(f"{index}: tensor {name!r} maps to {file!r}, not a file name")
    files = sorted(set(weight_map.values()))
    for file in files:
        if (not file or "\0" in file or os.path.isabs(file) or ".." in re.split(r"[\\/]", file)
                or not inside_checkpoint(path, os.path.join(path, file))):
            raise ErnieError(f"{index}: shard {file!r} is not a file inside the checkpoint directory")
    return files


def safetensors_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory (index-listed shards, or model.safetensors), each checked to lie
    inside it (`inside_checkpoint`)."""
    if not os.path.exists(path):
        raise ErnieError(f"model path not found: {path}")
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = _index_files(path, index)
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ErnieError(f"{path}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    files = [single] if os.path.isfile(single) else [
        os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    outside = [f for f in files if not inside_checkpoint(path, f)]
    if outside:
        raise ErnieError(f"{outside[0]} is a symlink to a file outside the checkpoint directory {path}")
    if files:
        return files
    if any(f.endswith((".bin", ".pdparams", ".pt")) for f in os.listdir(path)):
        raise ErnieError(f"{path} has no safetensors weights; pickle formats (.bin/.pt/.pdparams) are not loaded "
                         "for safety. Convert them to safetensors first.")
    raise ErnieError(f"no model.safetensors (or index) in {path}")


def _is_count(x) -> bool:
    return type(x) is int and x >= 0  # not bool, not float: the library reads these as unsigned integers


def read_header(file: str) -> tuple[dict, int]:
    """Parse a safetensors header: (tensor table, byte offset of the data section).

    Checked as the safetensors library checks it (`SafeTensors::read_metadata`), so that ernie45 reads exactly
    the files the library accepts: a bounded header length inside the file, a JSON object, per tensor a known
    dtype, a shape of non-negative integers and data offsets [begin, end] spanning shape x dtype bytes, and the
    tensors, in offset order, tiling the data section exactly (no gap, no overlap, nothing past the file's end,
    nothing after the last tensor).
    """
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ErnieError(f"{file} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ErnieError(f"{file} is not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError):
            raise ErnieError(f"{file} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ErnieError(f"{file} is not a safetensors file (header is not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ErnieError(f"{file}: __metadata__ is not a map of strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ErnieError(f"{file}: malformed entry for tensor {name!r}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(map(_is_count, shape)) and isinstance(offsets, list)
                and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise ErnieError(f"{file}: malformed entry for tensor {name!r}")
        if dtype not in ST_DTYPES:
            raise ErnieError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        begin, end = offsets
        if end - begin != _numel(shape) * ST_DTYPES[dtype].itemsize:
            raise ErnieError(f"{file}: tensor {name!r} has a size that does not match its shape")
        spans.append((begin, end, name))
    data_start = 8 + n
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps another tensor" if begin < pos else "leaves a gap before it"
            raise ErnieError(f"{file}: the data of tensor {name!r} {what} (offsets must tile the data section)")
        pos = end
    if data_start + pos > size:
        raise ErnieError(f"{file} is truncated ({data_start + pos} bytes declared, {size} present)")
    if data_start + pos < size:
        raise ErnieError(f"{file} has {size - data_start - pos} bytes after its last tensor")
    return header, data_start


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor's bytes are: `file` at absolute byte `offset`, row-major, `dtype` x `shape`."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape[1:]:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.row_bytes * (self.shape[0] if self.shape else 1)

    def rows_entry(self, start: int, end: int) -> TensorEntry:
        """Rows start:end of dim 0 (a view of the same bytes)."""
        return TensorEntry(self.file, self.dtype, (end - start, *self.shape[1:]), self.offset + start * self.row_bytes)


def _preadv_into(fd: int, buf: Tensor, offset: int, file: str) -> None:
    """Fill the contiguous CPU tensor `buf` with the bytes at `offset` of `fd` (short reads retried)."""
    view = memoryview(buf.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        if n <= 0:
            raise ErnieError(f"{file} is truncated (read past its end)")
        done += n


class CheckpointReader:
    """The tensors of a safetensors checkpoint (file or directory), read with positional reads, no mapping.

    A mapping keeps every page it touched resident (and counted in the process's RSS) while it lives; plain
    reads go through the page cache, which the kernel drops under pressure, so a reader holds only what it
    returns. Entries are keyed by the names the model uses (`normalise=True`): MTP tensors are set apart
    (`mtp_entries`, see `keep_mtp`), and the fused expert tensors of transformers' in-memory layout are split per expert (row ranges of the same bytes).
    """

    def __init__(self, path: str | os.PathLike, normalise: bool = True):
        self._fds: dict[str, int] = {}
        self.path = os.fspath(path)
        self.files = safetensors_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            header, start = read_header(file)
            self.metadata.update(header.get("__metadata__") or {})
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.entries:
                    raise ErnieError(f"tensor {name!r} appears in both {self.entries[name].file} and {file}")
                self.entries[name] = TensorEntry(file, ST_DTYPES[info["dtype"]], tuple(info["shape"]),
                                                 start + info["data_offsets"][0])
        self.mtp_entries: dict[str, TensorEntry] = {}  # MTP tensors, apart until `keep_mtp` (ernie45.mtp)
        if normalise:
            self.mtp_entries = {k: e for k, e in self.entries.items() if k.startswith(_IGNORED_PREFIXES)}
            self.entries = _normalise_entries(self.entries)

    def keep_mtp(self) -> None:
        """Make the MTP tensors readable entries (the model has MTP modules to load them into)."""
        self.entries.update(self.mtp_entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def read(self, name: str, out: Tensor | None = None, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None) -> Tensor:
        """Tensor `name` (or rows start:end of its dim 0) read into `out`, or into a new CPU tensor of `dtype`
        (default: as stored). A different dtype (or a non-CPU `out`) converts through a bounded buffer."""
        e = self.entries[name]
        if rows is not None:
            e = e.rows_entry(*rows)
        if out is None:
            out = torch.empty(e.shape, dtype=dtype or e.dtype)
        if tuple(out.shape) != e.shape:
            raise ErnieError(f"tensor {name}: {tuple(out.shape)} requested, the checkpoint has {e.shape}")
        if e.nbytes == 0:
            return out
        fd = self._fd(e.file)
        if out.dtype == e.dtype and out.device.type == "cpu" and out.is_contiguous():
            _preadv_into(fd, out, e.offset, e.file)
            return out
        flat = out.view(out.shape[0] if out.dim() else 1, -1)  # (rows, row elements)
        step = max(1, READ_CHUNK // max(e.row_bytes, 1))
        buf = torch.empty(min(step, flat.shape[0]) * e.row_bytes, dtype=torch.uint8)
        for r in range(0, flat.shape[0], step):
            k = min(step, flat.shape[0] - r)
            chunk = buf[: k * e.row_bytes]
            _preadv_into(fd, chunk, e.offset + r * e.row_bytes, e.file)
            flat[r:r + k].copy_(chunk.view(e.dtype).view(k, -1))
        return out

    def cols(self, name: str, start: int, end: int, dtype: torch.dtype | None = None) -> Tensor:
        """Columns start:end of the 2-D tensor `name` (read a bounded block of rows at a time)."""
        e = self.entries[name]
        n_rows, n_cols = e.shape
        out = torch.empty(n_rows, end - start, dtype=dtype or e.dtype)
        step = max(1, READ_CHUNK // max(e.row_bytes, 1))
        for r in range(0, n_rows, step):
            k = min(step, n_rows - r)
            out[r:r + k] = self.read(name, rows=(r, r + k))[:, start:end]
        return out


def read_state_dict(path: str, names: set[str] | None = None) -> dict[str, Tensor]:
    """All tensors of a checkpoint (or just `names`) as stored, keyed by checkpoint names (for tools and tests)."""
    with CheckpointReader(path, normalise=False) as reader:
        return {n: reader.read(n) for n in reader.entries if names is None or n in names}


def _normalise_entries(entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """Drop MTP keys; accept transformers' fused in-memory expert layout too (split it per expert)."""
    out: dict[str, TensorEntry] = {}
    for k, e in entries.items():
        if k.startswith(_IGNORED_PREFIXES):
            continue
        if k.endswith("mlp.experts.gate_up_proj") and len(e.shape) == 3:  # (E, 2I, H): rows [0:I] gate, [I:2I] up
            base = k[: -len("gate_up_proj")]
            n_exp, two_i, _ = e.shape
            flat = TensorEntry(e.file, e.dtype, (n_exp * two_i, e.shape[2]), e.offset)
            inter = two_i // 2
            for x in range(n_exp):
                out[f"{base}{x}.gate_proj.weight"] = flat.rows_entry(x * two_i, x * two_i + inter)
                out[f"{base}{x}.up_proj.weight"] = flat.rows_entry(x * two_i + inter, (x + 1) * two_i)
        elif k.endswith("mlp.experts.down_proj") and len(e.shape) == 3:  # (E, H, I)
            base = k[: -len("down_proj")]
            n_exp, h, _ = e.shape
            flat = TensorEntry(e.file, e.dtype, (n_exp * h, e.shape[2]), e.offset)
            for x in range(n_exp):
                out[f"{base}{x}.down_proj.weight"] = flat.rows_entry(x * h, (x + 1) * h)
        elif k.endswith("mlp.gate.moe_statics.e_score_correction_bias"):
            out[k.replace("mlp.gate.moe_statics", "mlp.moe_statics")] = e
        else:
            out[k] = e
    return out


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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_tensors(model, reader: CheckpointReader, config: ErnieConfig, dt: torch.dtype,
          path: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{state-dict name: (dtype, shape)} of every tensor to read; ErnieError listing every mismatch. An attached
    MTP layer's tensors are not among them: `ernie45.mtp.plan_mtp` plans those (as the reader keeps them apart)."""
    entries = {k: e for k, e in reader.entries.items() if not k.startswith(_IGNORED_PREFIXES)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(_IGNORED_PREFIXES)}
    tied = config.tie_word_embeddings
    missing = [k for k in expected if k not in entries and not (tied and k in TIED_HEAD_KEYS)]
    unexpected = [k for k in entries if k not in expected and not (tied and k in TIED_HEAD_KEYS)]
    bad_shape = [f"{k} {entries[k].shape} (expected {tuple(expected[k].shape)})"
                 for k in expected if k in entries and entries[k].shape != tuple(expected[k].shape)]
    problems = mismatch_problems(missing, bad_shape, unexpected)
    if problems:
        raise ErnieError(f"checkpoint {path} does not match its config.json — " + "; ".join(problems))
    plan = {}
    for k, ref in expected.items():
        if k not in entries or (tied and k in TIED_HEAD_KEYS):
            continue
        stored = entries[k].dtype
        if k.endswith(_FP32_KEYS) and stored.is_floating_point:
            target = torch.float32
        elif ref.is_floating_point() and stored.is_floating_point:
            target = dt
        else:
            target = stored if not ref.is_floating_point() else ref.dtype
        plan[k] = (target, tuple(ref.shape))
    return plan


def mismatch_problems(missing: list[str], bad_shape: list[str], unexpected: list[str]) -> list[str]:
    """The parts of a "does not match" error (each list shortened), in the order users fix them; [] when none."""
    parts = (("missing tensors", missing), ("wrong shapes", bad_shape), ("unexpected tensors", unexpected))
    return [f"{what}: {_short(items)}" for what, items in parts if items]


def _short(items: list[str], n: int = 8) -> str:
    s = ", ".join(items[:n])
    return s + (f" … and {len(items) - n} more" if len(items) > n else "")
