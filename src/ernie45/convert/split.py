"""`ernie45 split`: re-shard a safetensors checkpoint (any layout) into shards of at most a given size.

Tensors keep their names, dtypes and bytes exactly; the index (`model.safetensors.index.json`) is rewritten,
the known side files are copied (`copy_side_files`), and the result carries a SHA-256 manifest. Streams one
tensor at a time.
"""

from __future__ import annotations

import argparse
import os

from ernie45.commands import add_model_arg, add_out_arg, parse_args
from ernie45.convert.manifest import verify_manifest, write_manifest
from ernie45.convert.safetensors_io import (
    SafetensorsReader,
    check_shards,
    copy_side_files,
    natural_key,
    output_directory,
    write_shards,
)
from ernie45.errors import ErnieError
from ernie45.utils import parse_size


def split_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> str:
    """Copy checkpoint `src` to `dst` with shards of at most `max_shard_size` (e.g. "2GB", "500MB").

    A single shard is written as `model.safetensors` without an index, as transformers does.
    Returns the destination path.
    """
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    limit = parse_size(max_shard_size)
    if not os.path.exists(src):
        raise ErnieError(f"checkpoint not found: {src}")
    if not os.path.isdir(src):
        raise ErnieError(f"{src} is not a checkpoint directory")
    if src == dst:
        raise ErnieError("source and destination are the same directory")
    reader = SafetensorsReader(src)
    specs = sorted(reader.specs.values(), key=lambda s: natural_key(s.name))
    with output_directory(dst, overwrite) as tmp:
        metadata = reader.metadata or {"format": "pt"}
        digests = write_shards(tmp, specs, lambda s: reader.get(s.name), limit, metadata, progress=progress)
        copy_side_files(src, tmp)
        write_manifest(tmp, digests)
        if verify:
            check_shards(tmp)
            verify_manifest(tmp)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 split", description="Re-shard a safetensors checkpoint directory."
    )
    add_model_arg(p, "checkpoint directory to read", positional="SRC")
    add_out_arg(p, "directory to create", positional="DST")
    p.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--verify", action="store_true", help="re-read the output and check its SHA-256 manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parse_args(build_parser(), argv)
    out = split_checkpoint(
        a.model, a.out, a.max_shard_size, overwrite=a.overwrite, verify=a.verify, progress=not a.quiet
    )
    print(f"wrote {out}" + (" (verified)" if a.verify else ""))
    return 0
