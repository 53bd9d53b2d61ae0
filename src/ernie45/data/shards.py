"""Packed token shards: the on-disk format `ernie45 preprocess` writes and `ernie45 pretrain` memory-maps.

Layout of a preprocess output directory:

    out/
      index.json            {"format": "ernie45-packed", "version": 1, "seq_len", "eos_token_id",
                             "pad_token_id", "dtype": "int32", "splits": {"train": {...}, "val": {...}}}
      report.json           what each preprocessing stage removed
      train/index.json      one split: seq_len, eos/pad ids, num_samples, num_tokens, num_documents and
      train/shard-00000.bin   "shards": [{"file", "num_samples", "sha256"}]
      val/index.json
      val/shard-00000.bin

A shard is raw little-endian int32, `[num_samples, seq_len]` row-major, no header. The samples of a split,
read in order, are its token stream: every document's tokens followed by one EOS. The stream is cut into
`seq_len` windows without regard to document boundaries; only the final sample of a split is padded with
`pad_token_id` past `num_tokens` (`PackedDataset.valid_length` tells how far a sample is real).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from typing import Any

import numpy as np

from ernie45.errors import ErnieError

FORMAT = "ernie45-packed"
VERSION = 1
DTYPE = np.dtype("<i4")
INDEX = "index.json"
SPLITS = ("train", "val")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PackedDataset:
    """Memory-mapped fixed-length samples of one split of a preprocess output.

    Usage (e.g. in `ernie45 pretrain`):

        ds = PackedDataset("out")               # the train split of `ernie45 preprocess --out out`
        ds = PackedDataset("out", split="val")  # or PackedDataset("out/val")
        len(ds)                                 # number of samples
        x = ds[i]                               # np.ndarray int32 [seq_len], read-only memmap view
        batch = torch.from_numpy(np.stack([ds[i] for i in idx]).astype(np.int64))  # [B, seq_len]
        n = ds.valid_length(i)                  # seq_len, except in the padded last sample: mask labels
                                                # at positions >= n (e.g. labels[n:] = -100)

    Attributes: `seq_len`, `eos_token_id`, `pad_token_id`, `num_tokens` (real tokens in the split),
    `num_documents`, `meta` (the split's index.json). `tokens()` returns the unpacked token stream and
    `verify()` checks the shard checksums. The object pickles without its memmaps (they reopen lazily),
    so it can go to DataLoader worker processes.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        path = os.fspath(path)
        index = os.path.join(path, INDEX)
        if not os.path.isfile(index):
            raise ErnieError(f"no {INDEX} in {path}: not an `ernie45 preprocess` output")
        meta = _read_json(index)
        if meta.get("format") != FORMAT:
            raise ErnieError(f"{index} is not an {FORMAT} index")
        if "splits" in meta:  # the output root: descend into the split directory
            if split not in meta["splits"]:
                raise ErnieError(f"no split {split!r} in {path} (has {', '.join(meta['splits'])})")
            path = os.path.join(path, split)
            meta = _read_json(os.path.join(path, INDEX))
        self.path, self.meta = path, meta
        self.seq_len: int = int(meta["seq_len"])
        self.eos_token_id: int = int(meta["eos_token_id"])
        self.pad_token_id: int = int(meta["pad_token_id"])
        self.num_tokens: int = int(meta["num_tokens"])
        self.num_documents: int = int(meta.get("num_documents", 0))
        self._files = [os.path.join(path, s["file"]) for s in meta["shards"]]
        self._counts = [int(s["num_samples"]) for s in meta["shards"]]
        self._starts = np.cumsum([0] + self._counts).tolist()
        for f, n in zip(self._files, self._counts):
            want = n * self.seq_len * DTYPE.itemsize
            if not os.path.isfile(f) or os.path.getsize(f) != want:
                raise ErnieError(f"shard {f} is missing or not {want} bytes: the output is incomplete")
        self._maps: list[np.memmap | None] = [None] * len(self._files)

    def __len__(self) -> int:
        return self._starts[-1]

    def _map(self, k: int) -> np.memmap:
        m = self._maps[k]
        if m is None:
            m = np.memmap(self._files[k], dtype=DTYPE, mode="r", shape=(self._counts[k], self.seq_len))
            self._maps[k] = m
        return m

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        k = bisect.bisect_right(self._starts, i) - 1
        return self._map(k)[i - self._starts[k]]

    def valid_length(self, i: int) -> int:
        """Number of real (non-padding) tokens in sample `i`."""
        i = int(i)
        if i < 0:
            i += len(self)
        return int(min(self.seq_len, self.num_tokens - i * self.seq_len))

    def tokens(self) -> np.ndarray:
        """The split's token stream (documents each followed by EOS), padding removed: `[num_tokens]`."""
        if not len(self):
            return np.zeros(0, dtype=DTYPE)
        return np.concatenate([self._map(k).reshape(-1) for k in range(len(self._files))])[: self.num_tokens]

    def verify(self) -> None:
        """Raise ErnieError if a shard's sha256 differs from the index (a corrupt or altered file)."""
        for f, s in zip(self._files, self.meta["shards"]):
            if file_sha256(f) != s["sha256"]:
                raise ErnieError(f"checksum mismatch in {f}")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._files)
        return state


class ShardWriter:
    """Append-only writer of one split's token stream into fixed-capacity shard files.

    `total` tokens are on disk; `restore(total)` truncates whatever a crashed run wrote past a checkpoint,
    which is what makes preprocessing resumable without duplicated or torn samples.
    """

    def __init__(self, directory: str, seq_len: int, shard_samples: int):
        self.dir, self.seq_len = directory, seq_len
        self.capacity = seq_len * shard_samples  # tokens per shard
        self.total = 0
        os.makedirs(directory, exist_ok=True)

    def restore(self, total: int) -> None:
        """Make the files hold exactly the first `total` tokens of the stream."""
        self.total = total
        last = total // self.capacity
        for name in os.listdir(self.dir):
            if name.startswith("shard-") and name.endswith(".bin") and int(name[6:11]) > last:
                os.unlink(os.path.join(self.dir, name))
        path = os.path.join(self.dir, shard_name(last))
        keep = (total - last * self.capacity) * DTYPE.itemsize
        if keep:
            with open(path, "ab") as f:
                f.truncate(keep)
        elif os.path.exists(path):
            os.unlink(path)

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=DTYPE)
        while tokens.size:
            k, off = divmod(self.total, self.capacity)
            take = min(tokens.size, self.capacity - off)
            with open(os.path.join(self.dir, shard_name(k)), "ab") as f:
                f.write(tokens[:take].tobytes())
                f.flush()
                os.fsync(f.fileno())
            self.total += take
            tokens = tokens[take:]

    def finalize(self, pad_id: int, meta: dict[str, Any]) -> dict[str, Any]:
        """Pad the last sample with `pad_id`, checksum the shards and write the split's index.json."""
        num_tokens = self.total
        pad = -num_tokens % self.seq_len
        self.append(np.full(pad, pad_id, dtype=DTYPE))
        n_shards = -(-self.total // self.capacity)
        shards = []
        for k in range(n_shards):
            path = os.path.join(self.dir, shard_name(k))
            shards.append(
                {
                    "file": shard_name(k),
                    "num_samples": os.path.getsize(path) // (DTYPE.itemsize * self.seq_len),
                    "sha256": file_sha256(path),
                }
            )
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": "int32",
            "seq_len": self.seq_len,
            **meta,
            "num_samples": sum(s["num_samples"] for s in shards),
            "num_tokens": num_tokens,
            "shards": shards,
        }
        from ernie45.utils import atomic_write_text

        atomic_write_text(os.path.join(self.dir, INDEX), json.dumps(index, indent=2) + "\n")
        return index


def finalize_splits(directory: str, writers: dict[str, ShardWriter], num_documents: dict[str, int], eos_id: int,
                    pad_id: int, vocab_size: int, tokenizer_dir: str) -> dict[str, dict[str, int]]:
    """Finalize each split's writer (`directory/<split>/`) and write the output's root index.json, which ties the
    token ids to the tokenizer that made them. -> {split: {num_documents, num_tokens, num_samples}}."""
    splits = {}
    for name, w in writers.items():
        index = w.finalize(pad_id, {"eos_token_id": eos_id, "pad_token_id": pad_id,
                                    "num_documents": num_documents[name]})
        splits[name] = {k: index[k] for k in ("num_documents", "num_tokens", "num_samples")}
    root = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "int32",
        "seq_len": next(iter(writers.values())).seq_len,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "vocab_size": vocab_size,
        "tokenizer_sha256": file_sha256(os.path.join(tokenizer_dir, "tokenizer.model")),
        "splits": splits,
    }
    from ernie45.utils import atomic_write_text

    atomic_write_text(os.path.join(directory, INDEX), json.dumps(root, indent=2) + "\n")
    return splits


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ErnieError(f"cannot read {path}: {e}") from None
