"""Streaming safetensors I/O, so that converting a checkpoint never holds more than a few tensors in memory.

Reading is `ernie45.checkpoint_read.CheckpointReader` (positional reads, no mapping). Writing is our own:
safetensors' `save_file` needs a whole shard as a dict in memory, whereas here the header is laid out from the
planned names/dtypes/shapes first and each tensor's bytes are appended as soon as it is produced, and hashed
(SHA-256) on the way out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ernie45.checkpoint_read import ST_DTYPES, CheckpointReader, inside_checkpoint
from ernie45.errors import ErnieError
from ernie45.utils import atomic_directory, parse_size

log = logging.getLogger("ernie45")

INDEX_FILE = "model.safetensors.index.json"
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What one output tensor will be, known before any data is read (it fixes the file layout)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def natural_key(name: str) -> list:
    """Sort `layers.10` after `layers.9`, so that shards hold whole consecutive layers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class TensorSource:
    """Named tensors readable one at a time: `specs` says what exists, `get` materialises one tensor."""

    specs: dict[str, TensorSpec]

    def get(self, name: str) -> Tensor:
        raise NotImplementedError


class SafetensorsReader(TensorSource):
    """The tensors of a safetensors checkpoint directory (single file or sharded), read one at a time with
    `ernie45.checkpoint_read.CheckpointReader` (positional reads: nothing stays resident), names as stored.

    The last `cache_size` tensors read are kept, so that a fused tensor split into consecutive outputs is read
    once.
    """

    def __init__(self, path: str | os.PathLike, cache_size: int = 1):
        self._reader = CheckpointReader(path, normalise=False)
        self.path = self._reader.path
        self.files = self._reader.files
        self.metadata = self._reader.metadata
        self.file_of = {n: e.file for n, e in self._reader.entries.items()}
        self.specs = {n: TensorSpec(n, e.dtype, e.shape) for n, e in self._reader.entries.items()}
        if not self.specs:
            raise ErnieError(f"{self.path} holds no tensors")
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._cache_size = cache_size

    def get(self, name: str) -> Tensor:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        t = self._reader.read(name)
        self._cache[name] = t
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return t


def plan_shards(specs: list[TensorSpec], max_shard_size: str | int) -> list[list[TensorSpec]]:
    """Group tensors in order into shards of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )


def _header(specs: list[TensorSpec], metadata: dict[str, str], dtype_names: dict[torch.dtype, str]) -> bytes:
    table: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        table[s.name] = {
            "dtype": dtype_names[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(table, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


@contextlib.contextmanager
def output_directory(dst: str, overwrite: bool = False) -> Iterator[str]:
    """`atomic_directory`, with any OS error on the way (full disk, permissions) reported as one line."""
    try:
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            yield tmp
    except OSError as e:
        raise ErnieError(f"writing {dst} failed: {e.strerror or e}; nothing was written") from None


@contextlib.contextmanager
def output_file(path: str) -> Iterator[str]:
    """A temporary file beside `path`, renamed to `path` on success and removed on any error."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.tmp-")
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise ErnieError(f"writing {path} failed: {e.strerror or e}; nothing was written") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_shards(
    directory: str,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], Tensor],
    max_shard_size: str | int = "5GB",
    metadata: dict[str, str] | None = None,
    dtype_names: dict[torch.dtype, str] | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Write tensors as `model.safetensors` or shards + index into `directory`, one tensor in memory at a time.

    Args:
        specs: the output tensors, in file order.
        produce: returns the tensor for a spec; its dtype and shape must match the spec.
        dtype_names: safetensors dtype tag per torch dtype (default: the standard tags).
    Returns:
        {file name: SHA-256} of the files written (shards and index).
    """
    from tqdm import tqdm

    names = {**TORCH_TO_ST, **(dtype_names or {})}
    shards = plan_shards(specs, max_shard_size)
    files = shard_names(len(shards))
    digests: dict[str, str] = {}
    bar = tqdm(
        total=sum(s.nbytes for s in specs),
        unit="B",
        unit_scale=True,
        desc="writing",
        disable=not progress,
        leave=False,
    )
    try:
        for file, shard in zip(files, shards):
            h = hashlib.sha256()
            with open(os.path.join(directory, file), "wb") as f:
                head = _header(shard, metadata or {"format": "pt"}, names)
                f.write(head)
                h.update(head)
                for spec in shard:
                    t = produce(spec)
                    if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                        raise RuntimeError(
                            f"{spec.name}: produced {t.dtype} {tuple(t.shape)}, "
                            f"planned {spec.dtype} {spec.shape}"
                        )
                    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                    f.write(data)
                    h.update(data)
                    bar.update(spec.nbytes)
            digests[file] = h.hexdigest()
    finally:
        bar.close()
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {s.name: file for file, shard in zip(files, shards) for s in shard},
        }
        raw = (json.dumps(index, indent=2) + "\n").encode("utf-8")
        with open(os.path.join(directory, INDEX_FILE), "wb") as f:
            f.write(raw)
        digests[INDEX_FILE] = hashlib.sha256(raw).hexdigest()
    return digests


def check_shards(directory: str) -> int:
    """Re-open every written shard and check that the index and the files agree. Returns the tensor count."""
    reader = SafetensorsReader(directory)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        actual = {n: os.path.basename(f) for n, f in reader.file_of.items()}
        if weight_map != actual:
            raise ErnieError(f"{index} does not match the tensors in its shards")
    return len(reader.specs)


# What a checkpoint carries beside its weights and what the tools copy of it: tokenizer, chat template,
# configs, ernie45's quantization report, README and licence. Anything else (remote code, scripts, stray
# files) stays behind: an output holds only files whose purpose is known.
SIDE_FILES = frozenset({
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "config.json", "generation_config.json",
    "quantization_report.json", "README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
})


def is_side_file(name: str) -> bool:
    """A known side file: one of `SIDE_FILES`, or any other `*_config.json` (preprocessor, processor, ...)."""
    return name in SIDE_FILES or (name.endswith("_config.json") and not name.startswith("."))


def copy_side_files(src: str, dst: str, skip: Iterable[str] = ()) -> list[str]:
    """Copy the known side files (`is_side_file`) of checkpoint directory `src` into `dst`.

    A side file that is a symlink resolving outside `src` (`inside_checkpoint`) is skipped with a warning rather
    than refused: its bytes are not the checkpoint's to publish, and the weights still convert without it.
    """
    skip = set(skip)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name in skip or not is_side_file(name) or not os.path.isfile(path):
            continue
        if not inside_checkpoint(src, path):
            log.warning("not copying %s: it is a symlink to a file outside %s", name, src)
            continue
        shutil.copyfile(os.path.realpath(path), os.path.join(dst, name))
        copied.append(name)
    return copied
