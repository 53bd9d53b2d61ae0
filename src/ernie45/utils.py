"""Small shared helpers: atomic writes (nothing half-written is ever left behind) and size strings."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from ernie45.errors import ErnieError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside `dst`; on success it is renamed to `dst`, on error removed.

    An interrupted run therefore never leaves a partial destination.
    """
    from ernie45.errors import ErnieError

    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ErnieError(f"destination exists and is not empty: {dst} (pass --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dst)}.tmp-")
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if os.path.isdir(dst):
            old = tmp + ".old"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
