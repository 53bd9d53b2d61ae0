"""Opening a GGUF file (llama.cpp's one-file format) and reading its metadata, with one-line ErnieErrors.

What the GGUF loader (`ernie45.gguf_load`) and the tokenizer rebuilt from a GGUF vocabulary
(`ernie45.gguf_tokenizer`) share; it imports no other ernie45 module, so that any module can recognise a GGUF path
(`is_gguf`) without import cycles.
"""

from __future__ import annotations

import os
from typing import Any

from ernie45.errors import ErnieError

ARCHITECTURES = ("ernie4_5", "ernie4_5-moe")  # llama.cpp's names of the dense and the MoE model
MAGIC = b"GGUF"
REQUIRED = object()  # `GGUFFile.get`'s default: the key must be present


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file to load as GGUF: named *.gguf, or starting with the GGUF magic."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class GGUFFile:
    """An ERNIE 4.5 GGUF file opened with the `gguf` library's `GGUFReader`: its metadata, and its tensors as numpy
    views of one read-only memory map (pages are read only when a tensor is touched)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise ErnieError(f"cannot read {self.path}: {e.strerror}") from None
        if head != MAGIC:
            raise ErnieError(f"{self.path} is not a GGUF file (it does not start with the GGUF magic)")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, OverflowError, MemoryError) as e:
            # a file cut short fails here: its last tensors' views cannot take their declared shapes
            raise ErnieError(f"{self.path} is a truncated or corrupt GGUF file ({e})") from None
        size = os.path.getsize(self.path)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ErnieError(f"{self.path} is truncated: tensor {t.name} ends past the end of the file")
        self.tensors = {t.name: t for t in self.reader.tensors}
        # checked first: another model's tensors, vocabulary and chat template are not ERNIE's
        self.architecture = self.get("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ErnieError(f"{self.path}: GGUF architecture {self.architecture!r} is not ERNIE 4.5 (ernie45 loads "
                             f"{' and '.join(ARCHITECTURES)})")

    def get(self, key: str, default: Any = REQUIRED) -> Any:
        """The value of metadata `key` (str, number, bool or list), or `default`; ErnieError if required."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is REQUIRED:
                raise ErnieError(f"{self.path}: the GGUF metadata key {key} is missing")
            return default
        try:
            return field.contents()
        except UnicodeDecodeError:
            raise ErnieError(f"{self.path}: the GGUF metadata key {key} is not valid UTF-8") from None


    def release(self, start: int, end: int) -> None:
        """Drop the pages of file bytes start:end from this process's resident set (they stay in the page cache):
        a tensor copied into its final storage then no longer counts twice."""
        import mmap

        buf = self.reader.data.base
        if not isinstance(buf, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(buf), end)
        if hi > lo:
            buf.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
