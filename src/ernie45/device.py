"""Device and dtype choice: `auto` picks CUDA when present and bf16 where the hardware runs it fast."""

from __future__ import annotations

import functools
import os

import torch

from ernie45.errors import ErnieError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# ERNIE45_ISA values (and the x86-64 microarchitecture level names) -> the level ernie45 behaves as
ISA_LEVELS = {"native": "native", "avx2": "avx2", "x86-64-v3": "avx2", "generic": "generic",
              "x86-64-v2": "generic", "neon": "neon", "armv8-a": "neon"}


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "flags", ...); empty where there is none."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def isa_level() -> str:
    """The ISA level ernie45 behaves as: "native" (the CPU's own), "avx2" or "generic", from `ERNIE45_ISA`.

    Lets a machine act like an older CPU (kernel choice, dtype="auto", the C kernels' build), so that the
    paths taken on CPUs without AVX-512 can be tested and timed anywhere. Read on every call: tests change it.
    """
    value = os.environ.get("ERNIE45_ISA", "").strip().lower() or "native"
    if value not in ISA_LEVELS:
        raise ErnieError(f"ERNIE45_ISA={value!r} is not an ISA level; use native, avx2 (x86-64-v3), "
                         "neon (aarch64: armv8-a) or generic (x86-64-v2 / the plain C loops)")
    return ISA_LEVELS[value]


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (oneDNN then runs bf16 matmuls natively); elsewhere PyTorch emulates
    bf16 matmuls ~4x slower than fp32, so no path should feed them. False whenever `ERNIE45_ISA` lowers the ISA."""
    if isa_level() != "native":
        return False
    flags = cpu_info().get("flags", "").split()
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ErnieError("--device cuda was asked for but no CUDA device is available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ErnieError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = device or resolve_device("auto")
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ErnieError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]
