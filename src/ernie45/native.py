"""Build (once, on first use) and load the C decode kernels in `ernie45/csrc/`.

They are compiled on the user's machine, so each CPU gets its own vector instructions without shipping
per-ISA binaries, and loaded with ctypes: the kernels take raw pointers into PyTorch tensors and need no
PyTorch headers, so the build takes about a second with any C compiler. One library per ISA level; on x86-64:

- `native`: `-march=native` (AVX-512 with BF16/VNNI, or AVX2 with AVX-VNNI, ... whatever the CPU has);
- `avx2`: `-march=x86-64-v3` (AVX2, FMA, F16C: Haswell and later, AMD Zen 1-3), the level most home CPUs have;
- `generic`: `-march=x86-64-v2`, the plain C loops (the scalar reference of every vector kernel).

On aarch64 (ARM64_LEVELS): `native` (`-mcpu=native`), `neon` (`-march=armv8-a`: the NEON kernels, any aarch64 CPU)
and `generic` (the plain C loops). Other CPUs get `native` only, the plain C loops, which the decoder does not use
(`FastDecoder.attach`): they run on the PyTorch path.

`ERNIE45_ISA` (see `ernie45.device.isa_level`) picks the level for the whole process, so the AVX2 kernels can be
tested and timed on an AVX-512 machine. Built libraries are cached under `$ERNIE45_CACHE` (default
`~/.cache/ernie45`), keyed by the source, the compiler, the flags and the CPU, in a directory only this user may
write (0700); a cached library that is a symlink, another user's, or writable by others is rebuilt, never
loaded. Without a compiler, or with `ERNIE45_NATIVE=0`, everything falls back to the PyTorch path.

Systems: Linux builds with OpenMP (PyTorch's libgomp). macOS and other POSIX systems build without it (one thread,
the OpenMP pragmas ignored), so Apple clang needs no libomp; CPU features never come from /proc/cpuinfo alone (none
there: only `native` is offered). The macOS build is untested here. Windows has no build: the PyTorch path runs,
and `path_note()` says so in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger("ernie45")

CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# -march per ISA level; the x86 levels also name the cpuinfo flags a CPU needs to execute them
LEVELS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3"], "generic": ["-march=x86-64-v2"]}
NEEDS = {"avx2": ("avx2", "fma", "f16c", "bmi2", "movbe"), "generic": ("sse4_2", "popcnt", "ssse3")}
# aarch64: every level runs on every aarch64 CPU (AdvSIMD is part of Armv8-A); `native` adds what this one has
# (dotprod, bf16, i8mm, ... for the compiler: the kernels' int16 and fp32 arithmetic does not depend on them)
ARM64_LEVELS = {"native": ["-mcpu=native"], "neon": ["-march=armv8-a"],
                "generic": ["-march=armv8-a", "-DERNIE45_PLAIN_C"]}
ALL_LEVELS = ("native", "avx2", "neon", "generic")


def arch() -> str:
    """"x86_64", "aarch64", or the machine name as Python reports it (lower case)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _level_flags(isa: str) -> list[str] | None:
    """The compiler flags of `isa` on this machine and system (None: not a level of this CPU)."""
    a, system = arch(), platform.system()
    if a == "x86_64":
        flags = LEVELS.get(isa)
    elif a == "aarch64":
        flags = ARM64_LEVELS.get(isa)
        if flags and system == "Darwin" and isa == "native":
            flags = []  # Apple clang targets the machine's own Apple core by default
    else:
        flags = [] if isa == "native" else None  # the plain C loops, as the compiler targets this CPU
    if flags is None:
        return None
    base = CFLAGS if system == "Linux" else [f for f in CFLAGS if f != "-fopenmp"]  # no OpenMP off Linux
    return [*base, *flags]


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
    """Whether this CPU runs code built for `level` (native always; avx2 / generic on x86-64 with their
    /proc/cpuinfo flags, so not where there is none; neon / generic on every aarch64 CPU)."""
    if level == "native":
        return True
    if arch() == "aarch64":
        return level in ARM64_LEVELS
    if arch() != "x86_64" or level not in NEEDS:
        return False
    from ernie45.device import cpu_info

    flags = set(cpu_info().get("flags", "").split())
    return all(f in flags for f in NEEDS[level])


def levels() -> list[str]:
    """The ISA levels this machine can execute, most capable first (what the kernel tests run once each)."""
    return [lv for lv in ALL_LEVELS if can_execute(lv)]


def path_note() -> str:
    """One line saying which decode path runs on this machine and why: the C kernels (which build), or PyTorch."""
    from ernie45.device import isa_level

    system = platform.system()
    if not enabled():
        return "decode path: PyTorch (ERNIE45_NATIVE=0)"
    if system == "Windows":
        return "decode path: PyTorch (the C decode kernels are built on Linux and macOS only)"
    if _compiler() is None:
        return "decode path: PyTorch (no C compiler found for the C decode kernels)"
    lib = load("decode")
    if lib is None:
        return "decode path: PyTorch (the C decode kernels could not be built or loaded here)"
    if lib.ernie_simd_width() == 0 and isa_level() == "native":
        return f"decode path: PyTorch (no vector kernels for {arch()} CPUs; x86-64 and aarch64 have them)"
    threads = "OpenMP threads" if system == "Linux" else "one thread, no OpenMP"
    return f"decode path: C kernels ({lib.ernie_isa().decode()}, {threads})"


def load(name: str = "decode", isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled `csrc/<name>.c` for ISA level `isa` (default: `ERNIE45_ISA`, else native) as a ctypes
    library, or None (disabled, no compiler, build failed, or a level this CPU cannot execute)."""
    from ernie45.device import isa_level

    return _load(name, isa or isa_level())


@cache
def _load(name: str, isa: str) -> ctypes.CDLL | None:
    if isa not in ALL_LEVELS:
        raise ValueError(f"unknown ISA level {isa!r}; choose from {', '.join(ALL_LEVELS)}")
    if not enabled():
        return None
    if platform.system() == "Windows":
        log.warning(path_note())
        return None
    flags = _level_flags(isa)
    if flags is None or not can_execute(isa):
        log.warning("this CPU cannot run the %s kernels; using the PyTorch path", isa)
        return None
    cc = _compiler()
    if cc is None:  # a one-line note (a warning off Linux, where no compiler is common: macOS without Xcode's tools)
        (log.info if platform.system() == "Linux" else log.warning)(path_note())
        return None
    src = Path(__file__).parent / "csrc" / f"{name}.c"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    headers = b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))  # vec_neon.h, included by decode.c
    key = hashlib.sha256(
        src.read_bytes() + headers + version.encode() + _cpu_signature().encode() + " ".join(flags).encode()
    ).hexdigest()[:16]
    cache, tmpdir = _cache_dir(), None
    try:
        if not _private_dir(cache):
            log.warning("the kernel cache %s is not a private directory of this user; building in a temporary "
                        "one", cache)
            cache = tmpdir = Path(tempfile.mkdtemp(prefix="ernie45-native-"))
        out = cache / f"{name}-{isa}-{key}.so"
        if not _trusted(out) and not _build(cc, flags, src, out):
            return None
        import torch  # noqa: F401  (loads PyTorch's libgomp first, so the kernels share its OpenMP thread pool)

        lib = ctypes.CDLL(str(out))
    except OSError as e:
        log.warning("could not load the C decode kernels from %s (%s); using the PyTorch path", cache, e)
        return None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)  # a loaded library stays mapped
    if name == "decode":
        lib.ernie_isa.restype = ctypes.c_char_p
        # (const Linear *, row0, row1, float *out, threads): the Linear struct is ernie45.native_abi._Linear
        lib.ernie_dequant.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    elif name == "qmm":  # (kind, w, scale, zero, N, K, group, x, M, y, threads)
        i, p = ctypes.c_int, ctypes.c_void_p
        lib.ernie_qmm.argtypes = [i, p, p, p, i, i, i, p, i, p, i]
    return lib


def _private_dir(path: Path) -> bool:
    """Create the cache directory 0700 (tightening one of ours that is not): a library anyone else can write or
    rename into it would run as this user. False when it cannot be made private (another user's, not a
    directory, not creatable)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError:
        return False
    return True


def _trusted(lib: Path) -> bool:
    """Whether a cached library may be loaded: a regular file (not a symlink), ours, writable by nobody else.
    Anything else is rebuilt over, never loaded."""
    try:
        st = os.lstat(lib)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(cc: str, flags: list[str], src: Path, out: Path) -> bool:
    """Compile `src` to `out` through a private temporary file in the same directory, renamed over `out`
    (atomic: concurrent builders each rename a complete file, and a planted file or symlink is replaced)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        r = subprocess.run([cc, *flags, "-o", tmp, str(src), "-lm"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            log.warning("could not build the C decode kernels (%s); using the PyTorch path",
                        (r.stderr.strip().splitlines() or ["unknown error"])[-1])
            return False
        os.chmod(tmp, 0o700)  # the linker creates it under the umask, which may let the group write
        os.replace(tmp, out)
        tmp = None
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not build the C decode kernels (%s); using the PyTorch path", e)
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def cache_clear() -> None:
    """Forget the loaded libraries (tests that change the environment or the cache directory)."""
    _load.cache_clear()
