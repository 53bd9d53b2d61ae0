"""Instruction-set levels for `ernie45 bench --isa`: which levels this CPU can run, and the worker environment that
caps ernie45's C kernels (ERNIE45_ISA) and PyTorch's ATen / oneDNN / MKL at a level; `--llama-cpp LEVEL=DIR` builds."""

from __future__ import annotations

import os

from ernie45.errors import ErnieError

# what the worker's environment gets, before torch is imported: the library kernels capped at the same level
_ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "neon": {},  # aarch64: every CPU runs NEON, PyTorch's kernels stay as they are
}
_ISA_VARS = ("ERNIE45_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
_ISA_MEANING = {"avx2": "x86-64-v3 kernels, AVX-512 off, on this CPU",
                "generic": "x86-64-v2 kernels (SSE4.2), AVX off, on this CPU",
                "neon": "armv8-a NEON kernels (aarch64), on this CPU"}


def normalize_isa(value: str) -> str:
    """`native` / `avx2` / `generic`, with the aliases x86-64-v3 = avx2 and x86-64-v2 = generic (the names
    `ernie45.device.isa_level()` accepts in ERNIE45_ISA, which the worker process gets)."""
    from ernie45.device import ISA_LEVELS

    level = ISA_LEVELS.get(value.strip().lower())
    if level is None:
        raise ErnieError(f"unknown ISA level {value!r}; choose from native, avx2 (x86-64-v3), generic (x86-64-v2)")
    return level


def check_isa(level: str) -> None:
    """ErnieError unless this CPU can execute `level` (its /proc/cpuinfo flags)."""
    from ernie45 import native
    from ernie45.device import cpu_info

    if not native.can_execute(level):
        flags = set(cpu_info().get("flags", "").split())
        if level not in native.NEEDS:
            raise ErnieError(f"this CPU cannot run the {level} level (it needs an aarch64 CPU)")
        missing = [f for f in native.NEEDS[level] if f not in flags] or ["an x86-64 CPU"]
        raise ErnieError(f"this CPU cannot run the {level} level (it needs {', '.join(native.NEEDS[level])}; "
                         f"missing: {', '.join(missing)})")


def isa_env(level: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment for `level`: ERNIE45_ISA plus the ATen / oneDNN / MKL caps (none for native,
    where caps inherited from the caller are dropped so native means this CPU's best)."""
    env = dict(os.environ if base is None else base)
    for key in _ISA_VARS[1:]:
        env.pop(key, None)
    env.update(_ISA_ENV[level], ERNIE45_ISA=level)
    return env


def _isa_meaning(level: str) -> str:
    if level != "native":
        return _ISA_MEANING[level]
    best = _vector_flags()
    return "the best kernels this CPU runs" + (f" ({', '.join(best)})" if best else "")


def _vector_flags() -> list[str]:
    """The cpuinfo flags that decide the kernels: the AVX-512 / AMX ones present, else avx2 if present."""
    from ernie45.device import cpu_info

    have = set(cpu_info().get("flags", "").split())
    return [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in have] or (
        ["avx2"] if "avx2" in have else [])


def parse_llama_cpp(values: list[str] | None) -> dict[str, str]:
    """`--llama-cpp LEVEL=DIR` options → {level: absolute DIR}; DIR must hold a `llama_cpp` package."""
    dirs: dict[str, str] = {}
    for value in values or []:
        level, sep, path = value.partition("=")
        if not sep or not path:
            raise ErnieError(f"--llama-cpp wants LEVEL=DIR (e.g. avx2=./llama-avx2), got {value!r}")
        level = normalize_isa(level)
        if not os.path.isdir(os.path.join(path, "llama_cpp")):
            raise ErnieError(f"--llama-cpp {value}: {path} does not exist or holds no llama_cpp/ package "
                             "(build one with pip install --target DIR llama-cpp-python)")
        dirs[level] = os.path.abspath(path)
    return dirs
