"""SHA-256 manifests: every output of the checkpoint tools says what its files must hash to.

A directory output carries `manifest.json` ({"algorithm": "sha256", "files": {name: {sha256, size}}}); a
single-file output (GGUF) carries `<file>.sha256` in `sha256sum` format, so `sha256sum -c` checks it too.
`--verify` re-reads the files from disk and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

from ernie45.commands import add_model_arg, parse_args
from ernie45.errors import ErnieError
from ernie45.utils import atomic_write_text

MANIFEST = "manifest.json"
_CHUNK = 16 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str, known: dict[str, str] | None = None) -> dict:
    """Write `manifest.json` for every regular file in `directory` (not recursive).

    Args:
        known: SHA-256 digests already computed while writing (those files are not read again).
    """
    known = known or {}
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == MANIFEST or not os.path.isfile(path):
            continue
        files[name] = {"sha256": known.get(name) or sha256_file(path), "size": os.path.getsize(path)}
    manifest = {"algorithm": "sha256", "files": files}
    atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(directory: str) -> int:
    """Re-hash every file listed in `directory/manifest.json`. Returns the number of files checked.

    Raises ErnieError naming each missing, resized, altered or unlisted file.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ErnieError(f"no {MANIFEST} in {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ErnieError(f"{path} is not a valid manifest: {e}") from None
    problems = []
    for name, entry in files.items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
        elif os.path.getsize(file) != entry["size"]:
            problems.append(f"{name} has {os.path.getsize(file)} bytes, expected {entry['size']}")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{name} has a different SHA-256")
    unlisted = [
        n
        for n in os.listdir(directory)
        if n != MANIFEST and os.path.isfile(os.path.join(directory, n)) and n not in files
    ]
    problems += [f"{n} is not in the manifest" for n in sorted(unlisted)]
    if problems:
        raise ErnieError(f"verification of {directory} failed: " + "; ".join(problems))
    return len(files)


def write_checksum_file(path: str, digest: str | None = None) -> str:
    """Write `<path>.sha256` (sha256sum format). Returns the digest."""
    digest = digest or sha256_file(path)
    atomic_write_text(path + ".sha256", f"{digest}  {os.path.basename(path)}\n")
    return digest


def verify_checksum_file(path: str, checksum_file: str | None = None) -> None:
    """Check `path` against its `.sha256` file (by default `<path>.sha256`)."""
    checksum_file = checksum_file or path + ".sha256"
    if not os.path.isfile(checksum_file):
        raise ErnieError(f"no checksum file {checksum_file}")
    with open(checksum_file, encoding="utf-8") as f:
        parts = f.read().split()
    if not parts or len(parts[0]) != 64:
        raise ErnieError(f"{checksum_file} is not a sha256sum file")
    if sha256_file(path) != parts[0]:
        raise ErnieError(f"verification of {path} failed: its SHA-256 differs from {checksum_file}")


def verify(path: str) -> str:
    """Verify a directory (manifest.json) or a file (<file>.sha256). Returns a one-line summary."""
    if os.path.isdir(path):
        return f"verified {verify_manifest(path)} files in {path}"
    if os.path.isfile(path):
        verify_checksum_file(path)
        return f"verified {path}"
    raise ErnieError(f"path not found: {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 verify",
        description="Check a converted checkpoint (or GGUF file) against its SHA-256s.",
    )
    add_model_arg(p, "checkpoint directory with manifest.json, or a file with a .sha256 beside it",
                  positional="PATH")
    p.add_argument("--quiet", action="store_true", help="print nothing on success (the exit code says it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    result = verify(args.model)
    if not args.quiet:
        print(result)
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except ErnieError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
