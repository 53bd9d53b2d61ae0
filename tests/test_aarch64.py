"""The aarch64 (NEON) build of the C decode step, on any machine: cross-compiled with `aarch64-linux-gnu-gcc` and
run under `qemu-aarch64` (user-mode emulation), or natively on an aarch64 host.

`tests/helpers/step_driver.c` links csrc/decode.c into a program that reads a model written here (the Model struct
and everything it points to, exactly the structs `FastDecoder` hands the kernels through ctypes, relocatable) and
the K/V rows of a 300-token prompt prefilled by model.py, then feeds 12 more tokens one at a time (`ernie_step`,
positions 300..311: attention over a few hundred cached positions) and writes each step's logits. They are compared
with model.py's own cached decode of the same tokens, for fp32 / bf16 models with plain, int8 (one scale per row, and per 32 columns as GGUF's Q8_0) and int4
weights (groups of 64, and of 32 as GGUF's Q4_0), dense and MoE, with the tolerances of the x86 parity test
(test_fast.test_c_decode_long_context): fp32 1e-4, fp32 int8 1e-3, otherwise 2e-2, relative to the largest |logit|
(at least 1). As there, the prompt's rows are PyTorch's: a C step's rounding differences do not pile up over hundreds
of C-written rows (a bf16 MoE model's expert choice flips on one of them now and then, on x86 as here).

Four aarch64 builds, each on the emulated CPU it targets:
- `neon`: `-march=armv8-a` (the NEON kernels every aarch64 CPU runs) on a Cortex-A53 (Armv8.0: no dotprod, no bf16);
- `v8.6`: `-march=armv8.6-a+dotprod+bf16+i8mm` on qemu's `max` CPU: the bf16 GEMVs multiply with BFDOT;
- `plain`: `-DERNIE45_PLAIN_C`, the plain C loops (the scalar reference of every vector kernel) on `max`;
- `clang`: clang without OpenMP (the macOS build: one thread, no libomp), `-march=armv8-a`, on a Cortex-A53, where
  clang is installed (the nearest this machine gets to an Apple-silicon build, which is not tested here).
The two vector builds also run the steps again as row 0 of a batch of 3 over a paged cache (`ernie_step_batch`:
register tiles of several batch rows), whose logits must equal the single-row step's bit for bit, as on x86
(test_native_batch); the neon build also runs 20 steps of 3 rows over int8 KV pages (the server's
`--kv-cache-dtype int8`), whose logits must equal those over float pages holding the rows' int8 round trip bit for
bit (test_native_kv8). Emulation checks the numbers, not the speed: ARM speed is not measured here.

`.ci/run` installs `gcc-aarch64-linux-gnu`, `qemu-user` and `clang`; without the first two these tests skip and say
so.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fast import _textured

from ernie45.native_abi import _Layer, _Linear, _Model

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "src" / "ernie45" / "csrc"
DRIVER = ROOT / "tests" / "helpers" / "step_driver.c"
SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's aarch64 cross libc (libc6-dev-arm64-cross), for clang
PROMPT, STEPS = 300, 12  # positions prefilled by model.py, then tokens fed one at a time to the C step
KV8_STEPS = 20  # positions of the int8 KV cache check (the neon build): two pages of 16
NATIVE = platform.machine().lower() in ("aarch64", "arm64") and platform.system() == "Linux"
# build name -> (compiler flags, emulated CPU)
BUILDS = {
    "neon": (["-march=armv8-a"], "cortex-a53"),
    "v8.6": (["-march=armv8.6-a+dotprod+bf16+i8mm"], "max"),
    "plain": (["-march=armv8-a", "-DERNIE45_PLAIN_C"], "max"),
    "clang": (["-march=armv8-a"], "cortex-a53"),  # built by clang, without -fopenmp
}
# int8 groups of 32 (GGUF Q8_0) but not the bf16 MoE model: at this seed its last layer's 2nd and 3rd experts are
# 9e-5 apart at step 7, and the expert choice flips there on x86 too (every ISA level, one logit past the bound)
CONFIGS = [(name, dtype, mode, group) for name in ("tiny", "tiny-moe") for dtype in ("fp32", "bf16")
           for mode, group in ((None, 0), ("wint8", 0), ("wint8", 32), ("wint4", 64), ("wint4", 32))
           if (name, dtype, mode, group) != ("tiny-moe", "bf16", "wint8", 32)]


def _toolchain() -> tuple[str, list[str]] | None:
    """(the aarch64 C compiler, the command prefix that runs its programs), or None where they are missing."""
    if NATIVE:
        cc = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
        return (cc, []) if cc else None
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64") or shutil.which(
        "qemu-aarch64-static")
    return (cc, [qemu]) if cc and qemu else None


def _host_features() -> set[str]:
    from ernie45.device import cpu_info

    return set(cpu_info().get("Features", "").split())


@pytest.fixture(scope="module")
def aarch64_builds(tmp_path_factory) -> dict[str, tuple[list[str], str]]:
    """The driver built once per build: name -> (the command that runs it, the emulated CPU)."""
    tools = _toolchain()
    if tools is None:
        pytest.skip("no aarch64 cross compiler / qemu-aarch64: install gcc-aarch64-linux-gnu and qemu-user "
                    "(.ci/run does)")
    cc, prefix = tools
    out, builds = tmp_path_factory.mktemp("aarch64"), {}
    for name, (flags, cpu) in BUILDS.items():
        if not prefix and name == "v8.6" and "bf16" not in _host_features():
            continue  # on an aarch64 host: only what it executes
        exe = out / f"step_driver-{name}"
        cmd = [cc, "-O3", "-fopenmp", "-std=c11", "-static", *flags, f"-I{CSRC}", "-o", str(exe), str(DRIVER),
               "-lm"]
        if name == "clang":
            if shutil.which("clang") is None:
                continue
            cross = ["--target=aarch64-linux-gnu", f"--sysroot={SYSROOT}", "--gcc-toolchain=/usr"] if prefix else []
            cmd = ["clang", *cross, *[c for c in cmd[1:] if c != "-fopenmp"]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        builds[name] = ([*prefix, *(["-cpu", cpu] if prefix else []), str(exe)], cpu)
    return builds


def _blob(m: torch.nn.Module) -> bytes:
    """The model file of step_driver.c: a FastDecoder's Model struct and everything it points to, relocatable."""
    from ernie45.fast import FastDecoder

    def stub(*_a):
        return 0

    class NoLib:  # FastDecoder only records the kernels' signatures: the structs are all it builds here
        def __getattr__(self, name):
            f = (lambda: b"none") if name == "ernie_isa" else (lambda *a: stub(*a))
            setattr(self, name, f)
            return f

    dec = FastDecoder(m, NoLib())
    regions = [(ctypes.addressof(dec._m), ctypes.sizeof(dec._m), dec._m)]  # (address, bytes, ctypes object)
    seen = set()
    for t in dec._keep:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            addr, size, obj = st.data_ptr(), st.nbytes(), None
        else:
            addr, size, obj = ctypes.addressof(t), ctypes.sizeof(t), t
        if addr not in seen:
            seen.add(addr)
            regions.append((addr, size, obj))
    offsets, size = [], 0
    for _, n, _ in regions:
        offsets.append(size)
        size = (size + n + 63) // 64 * 64
    blob, relocs = bytearray(size), []
    for (addr, n, _), off in zip(regions, offsets, strict=True):
        blob[off:off + n] = ctypes.string_at(addr, n)

    def where(p: int) -> int:
        for (addr, n, _), off in zip(regions, offsets, strict=True):
            if addr <= p < addr + n:
                return off + p - addr
        raise AssertionError(f"pointer {p:#x} outside the model's tensors")

    def patch(st: ctypes.Structure, base: int) -> None:  # the pointer fields of the struct at blob[base:]
        for fname, ftype in st._fields_:
            fo = base + getattr(type(st), fname).offset
            v = getattr(st, fname)
            if isinstance(v, ctypes.Structure):
                patch(v, fo)
            elif ftype is ctypes.c_void_p and v:
                assert fname not in ("scratch", "scores")
                blob[fo:fo + 8] = struct.pack("<Q", where(v))
                relocs.append(fo)

    for (_, _, obj), off in zip(regions, offsets, strict=True):
        if isinstance(obj, ctypes.Structure):
            patch(obj, off)
        elif isinstance(obj, ctypes.Array) and issubclass(obj._type_, (_Layer, _Linear)):
            for i, el in enumerate(obj):
                patch(el, off + i * ctypes.sizeof(obj._type_))
    assert isinstance(regions[0][2], _Model)
    return b"ERNSTEP1" + struct.pack("<QQ", len(relocs), size) + struct.pack(f"<{len(relocs)}Q", *relocs) + blob


def _reference(m, ids: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    """model.py's logits (STEPS, V) fp32 for the tokens after the prompt, fed one at a time through its KV cache,
    and the prompt's K/V rows as the driver reads them (per layer K then V, (n_kv, PROMPT, head_dim))."""
    cache, out = m.new_cache(1, ids.shape[1]), []
    with torch.inference_mode():
        m(ids[:, :PROMPT], cache=cache)
        rows = b"".join(c[layer][0, :, :PROMPT].contiguous().view(torch.uint8).numpy().tobytes()
                        for layer in range(len(cache.k)) for c in (cache.k, cache.v))
        for t in range(PROMPT, ids.shape[1]):
            out.append(m(ids[:, t:t + 1], cache=cache).logits[0, -1].float())
    return torch.stack(out), rows


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # passive OpenMP waits: spinning threads on emulated, shared cores cost several times the work itself
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name, dtype, mode, group", CONFIGS,
                         ids=[f"{n}-{d}-{m or 'float'}{g or ''}" for n, d, m, g in CONFIGS])
def test_aarch64_step_matches_pytorch(aarch64_builds, name, dtype, mode, group, tmp_path):
    """Every aarch64 build's logits at each step equal model.py's within the x86 tolerances."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    m = _textured(name, torch_dtype, mode, group or 64)
    T = PROMPT + STEPS
    ids = torch.randint(3, 1000, (1, T), generator=torch.Generator().manual_seed(4))
    ref, rows = _reference(m, ids)
    (tmp_path / "model.bin").write_bytes(_blob(m))
    (tmp_path / "tokens.bin").write_bytes(struct.pack(f"<ii{T}i", T, PROMPT, *ids[0].tolist()) + rows)
    assert {"neon", "plain"} <= set(aarch64_builds) and ("clang" in aarch64_builds) == bool(shutil.which("clang"))
    tol = {("fp32", None): 1e-4, ("fp32", "wint8"): 1e-3}.get((dtype, mode), 2e-2)
    atol = tol * max(1.0, ref.abs().max().item())
    for build, (run, _) in aarch64_builds.items():
        out, batch = tmp_path / f"logits-{build}.bin", tmp_path / f"batch-{build}.bin"
        extra = {"neon": ["3", str(batch), str(KV8_STEPS)], "v8.6": ["3", str(batch)],
                 "clang": ["3", str(batch)]}.get(build, [])
        r = _run([*run, str(tmp_path / "model.bin"), str(tmp_path / "tokens.bin"), str(out), "2", *extra])
        assert r.returncode == 0, f"{build}: {r.stderr}"  # 2: the int8 KV pages differ from their round trip
        isa, width = r.stdout.split()
        assert (isa, width) == {"v8.6": ("neon+bf16", "128"), "plain": ("generic", "0")}.get(build, ("neon", "128"))
        got = torch.from_numpy(np.fromfile(out, dtype=np.float32).reshape(STEPS, -1))
        torch.testing.assert_close(got, ref, atol=atol, rtol=tol, msg=lambda s, b=build: f"{b}: {s}")
        if extra:
            row0 = torch.from_numpy(np.fromfile(batch, dtype=np.float32).reshape(STEPS, -1))
            assert torch.equal(row0, got), f"{build}: a batch row differs from its single-row step"


# ---- other systems: detection without /proc/cpuinfo, and the PyTorch path where nothing builds ----------------
def _fake_system(monkeypatch, system: str, machine: str, compiler: bool) -> None:
    """Act as `system` on a `machine` CPU: no /proc/cpuinfo (as on macOS), and no C compiler unless `compiler`."""
    from ernie45 import device, native

    real_open = open

    def no_proc_open(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(device, "open", no_proc_open, raising=False)
    if not compiler:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    device.cpu_info.cache_clear()
    native.cache_clear()


@pytest.fixture
def restore_native():
    from ernie45 import device, native

    yield
    device.cpu_info.cache_clear()
    native.cache_clear()


def _greedy(model) -> torch.Tensor:
    from ernie45.generation import generate

    ids = torch.tensor([[1, 100, 200, 300, 400, 500]])
    with torch.inference_mode():
        return generate(model, ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)


def test_macos_without_compiler_generates_on_the_pytorch_path(monkeypatch, caplog, restore_native):
    """No /proc/cpuinfo, no C compiler, not Linux (an Apple-silicon Mac as shipped): loading the bundled model as
    every command does (`load_model`) works, says in one line that the PyTorch path runs, and generates the tokens
    of the native path."""
    from ernie45 import native
    from ernie45.commands import load_model

    native.cache_clear()
    m, _ = load_model(None, "float32", "cpu")
    ref = _greedy(m)  # with the C step where this machine builds it
    monkeypatch.delenv("ERNIE45_ISA", raising=False)  # an x86 level asked of this session means nothing on the Mac
    _fake_system(monkeypatch, "Darwin", "arm64", compiler=False)
    assert native.levels() == ["native", "neon", "generic"]  # aarch64 levels need no /proc/cpuinfo
    with caplog.at_level("INFO", logger="ernie45"):
        m, _ = load_model(None, "float32", "cpu")
    assert getattr(m, "fast_decoder", None) is None
    notes = [r.getMessage() for r in caplog.records if "decode path" in r.getMessage()]
    assert notes == ["decode path: PyTorch (no C compiler found for the C decode kernels)"]
    assert native.path_note() == notes[0]
    assert torch.equal(_greedy(m), ref)


def test_windows_and_other_cpus_take_the_pytorch_path(monkeypatch, restore_native):
    """Windows builds nothing; a CPU with no vector kernels (here RISC-V) offers only `native`, the plain C loops,
    which the decoder does not use: both say so in one line."""
    from ernie45 import native

    _fake_system(monkeypatch, "Windows", "AMD64", compiler=True)
    assert native.load("decode") is None
    assert native.path_note() == "decode path: PyTorch (the C decode kernels are built on Linux and macOS only)"
    _fake_system(monkeypatch, "Linux", "riscv64", compiler=True)
    assert native.levels() == ["native"] and native._level_flags("native") == native.CFLAGS
    assert native._level_flags("avx2") is None and native._level_flags("neon") is None


def test_aarch64_levels_and_flags(monkeypatch, restore_native):
    """aarch64 Linux: native (-mcpu=native), neon (armv8-a) and generic (the plain C loops) on every CPU, with
    OpenMP; on macOS no OpenMP flag (Apple clang has none) and the compiler's own target for native."""
    from ernie45 import native

    _fake_system(monkeypatch, "Linux", "aarch64", compiler=False)
    assert native.levels() == ["native", "neon", "generic"]
    assert native._level_flags("neon") == [*native.CFLAGS, "-march=armv8-a"]
    assert native._level_flags("generic")[-1] == "-DERNIE45_PLAIN_C"
    assert native._level_flags("native") == [*native.CFLAGS, "-mcpu=native"]
    assert native._level_flags("avx2") is None and not native.can_execute("avx2")
    _fake_system(monkeypatch, "Darwin", "arm64", compiler=False)
    assert "-fopenmp" not in native._level_flags("neon")
    assert native._level_flags("native") == [f for f in native.CFLAGS if f != "-fopenmp"]


def test_build_without_openmp_gives_the_same_tokens(monkeypatch, tmp_path, restore_native):
    """The build of systems without OpenMP (macOS: one thread, the pragmas ignored), made here by acting as a
    non-Linux system on this CPU: it builds, attaches, and decodes the bundled model to the same tokens."""
    from ernie45 import native
    from ernie45.checkpoint import load_checkpoint
    from ernie45.fast import FastDecoder
    from ernie45.models import bundled_path

    m = load_checkpoint(bundled_path(), dtype="float32", device="cpu")
    ref = _greedy(m)
    monkeypatch.setenv("ERNIE45_CACHE", str(tmp_path))
    _fake_system(monkeypatch, "FreeBSD", platform.machine(), compiler=True)
    if native._compiler() is None:
        pytest.skip("no C compiler")
    assert "-fopenmp" not in native._level_flags("native")
    lib = native.load("decode")
    if lib is None or lib.ernie_simd_width() == 0:
        pytest.skip("no vector kernels for this CPU")
    assert native.path_note().endswith(", one thread, no OpenMP)")
    assert FastDecoder.attach(m) is not None
    assert torch.equal(_greedy(m), ref)
