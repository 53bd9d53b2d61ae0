"""Build (once, on first use) and load the C decode kernels in `ernie45/csrc/`.

They are compiled on the user's machine with `-march=native`, so each CPU gets its own vector instructions
(AVX-512, AVX512-BF16, AVX2) without shipping per-ISA binaries, and loaded with ctypes: the kernels take raw
pointers into PyTorch tensors and need no PyTorch headers, so the build takes about a second with any C
compiler. Built libraries are cached under `$ERNIE45_CACHE` (default `~/.cache/ernie45`), keyed by the
source, the compiler and the CPU. Without a compiler, or with `ERNIE45_NATIVE=0`, everything falls back to
the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger("ernie45")

CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cache_dir() -> Path:
    root = os.environ.get("ERNIE45_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ernie45"
    )
    return Path(root) / "native"


def _cpu_signature() -> str:
    from ernie45.device import cpu_info

    info = cpu_info()
    return info.get("flags") or info.get("Features") or platform.processor() + platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def enabled() -> bool:
    return os.environ.get("ERNIE45_NATIVE", "1").lower() not in ("0", "false", "no", "off")


@cache
def load(name: str = "decode") -> ctypes.CDLL | None:
    """The compiled `csrc/<name>.c` as a ctypes library, or None (disabled, no compiler, build failed)."""
    if not enabled() or platform.system() != "Linux":
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: using the PyTorch decode path")
        return None
    src = Path(__file__).parent / "csrc" / f"{name}.c"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(
        src.read_bytes() + version.encode() + _cpu_signature().encode() + " ".join(CFLAGS).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(src), "-lm"], capture_output=True, text=True,
                               timeout=300)
            if r.returncode != 0:
                os.unlink(tmp)
                log.warning("could not build the C decode kernels (%s); using the PyTorch path",
                            (r.stderr.strip().splitlines() or ["unknown error"])[-1])
                return None
            os.replace(tmp, out)  # atomic: concurrent builders each rename a complete file
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("could not build the C decode kernels (%s); using the PyTorch path", e)
            return None
    import torch  # noqa: F401  (loads PyTorch's libgomp first, so the kernels share its OpenMP thread pool)

    try:
        return ctypes.CDLL(str(out))
    except OSError as e:
        log.warning("could not load %s (%s); using the PyTorch path", out, e)
        return None
