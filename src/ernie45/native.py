"""Build (once, on first use) and load the C decode kernels in `ernie45/csrc/`.

They are compiled on the user's machine, so each CPU gets its own vector instructions without shipping
per-ISA binaries, and loaded with ctypes: the kernels take raw pointers into PyTorch tensors and need no
PyTorch headers, so the build takes about a second with any C compiler. One library per ISA level:

- `native`: `-march=native` (AVX-512 with BF16/VNNI, or AVX2 with AVX-VNNI, ... whatever the CPU has);
- `avx2`: `-march=x86-64-v3` (AVX2, FMA, F16C: Haswell and later, AMD Zen 1-3), the level most home CPUs have;
- `generic`: `-march=x86-64-v2`, the plain C loops (the scalar reference of every vector kernel).

`ERNIE45_ISA` (see `ernie45.device.isa_level`) picks the level for the whole process, so the AVX2 kernels can be
tested and timed on an AVX-512 machine. Built libraries are cached under `$ERNIE45_CACHE` (default
`~/.cache/ernie45`), keyed by the source, the compiler, the flags and the CPU. Without a compiler, or with
`ERNIE45_NATIVE=0`, everything falls back to the PyTorch path.
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

CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# -march per ISA level; the x86 levels also name the cpuinfo flags a CPU needs to execute them
LEVELS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3"], "generic": ["-march=x86-64-v2"]}
NEEDS = {"avx2": ("avx2", "fma", "f16c", "bmi2", "movbe"), "generic": ("sse4_2", "popcnt", "ssse3")}


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


def can_execute(level: str) -> bool:
    """Whether this CPU runs code built for `level` (native always; avx2 / generic on x86-64 with their flags)."""
    if level == "native":
        return True
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    from ernie45.device import cpu_info

    flags = set(cpu_info().get("flags", "").split())
    return all(f in flags for f in NEEDS[level])


def levels() -> list[str]:
    """The ISA levels this machine can execute, most capable first (what the kernel tests run once each)."""
    return [lv for lv in LEVELS if can_execute(lv)]


def load(name: str = "decode", isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled `csrc/<name>.c` for ISA level `isa` (default: `ERNIE45_ISA`, else native) as a ctypes
    library, or None (disabled, no compiler, build failed, or a level this CPU cannot execute)."""
    from ernie45.device import isa_level

    return _load(name, isa or isa_level())


@cache
def _load(name: str, isa: str) -> ctypes.CDLL | None:
    if isa not in LEVELS:
        raise ValueError(f"unknown ISA level {isa!r}; choose from {', '.join(LEVELS)}")
    if not enabled() or platform.system() != "Linux":
        return None
    if not can_execute(isa):
        log.warning("this CPU cannot run the %s kernels; using the PyTorch path", isa)
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
    flags = [*CFLAGS, *LEVELS[isa]]
    key = hashlib.sha256(
        src.read_bytes() + version.encode() + _cpu_signature().encode() + " ".join(flags).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{isa}-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            r = subprocess.run([cc, *flags, "-o", tmp, str(src), "-lm"], capture_output=True, text=True,
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
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        log.warning("could not load %s (%s); using the PyTorch path", out, e)
        return None
    lib.ernie_isa.restype = ctypes.c_char_p
    # (const Linear *, row0, row1, float *out, threads): the Linear struct is ernie45.fast._Linear
    lib.ernie_dequant.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return lib


def cache_clear() -> None:
    """Forget the loaded libraries (tests that change the environment or the cache directory)."""
    _load.cache_clear()
