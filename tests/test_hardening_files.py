"""No file escapes its checkpoint: index entries stay inside the directory, safetensors headers are checked as
the safetensors library checks them, convert/split copy only known side files from inside the source, and a
cached C kernel library is loaded only when it is this user's own private file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import struct
import types
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, save_hf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ernie45 import native
from ernie45.checkpoint import CheckpointReader, load_checkpoint
from ernie45.checkpoint_read import read_header
from ernie45.cli import main as cli
from ernie45.convert.paddle import convert_checkpoint
from ernie45.convert.split import split_checkpoint
from ernie45.errors import ErnieError

INDEX = "model.safetensors.index.json"


# ---- index entries -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return save_hf(make_hf_model("dense"), tmp_path_factory.mktemp("dense") / "hf")


def _indexed(tmp_path, dense_dir, shard: str) -> Path:
    """A checkpoint whose index maps every tensor to `shard`; the real weights lie outside it, in tmp_path."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(Path(dense_dir) / "config.json", ckpt)
    shutil.copy(Path(dense_dir) / "model.safetensors", tmp_path / "outside.safetensors")
    names = [n for n in read_header(str(tmp_path / "outside.safetensors"))[0] if n != "__metadata__"]
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, shard)}))
    return ckpt


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABS", "sub/../../outside.safetensors",
                                   "link.safetensors", "", 5, ["model.safetensors"]],
                         ids=["dotdot", "absolute", "nested-dotdot", "symlink-out", "empty", "number", "list"])
def test_index_entries_must_name_files_inside_the_checkpoint(tmp_path, dense_dir, shard, capsys):
    if shard == "ABS":
        shard = str(tmp_path / "outside.safetensors")
    ckpt = _indexed(tmp_path, dense_dir, shard)
    (ckpt / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(ErnieError) as e:
        CheckpointReader(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt / INDEX) in msg and repr(shard) in msg
    with pytest.raises(ErnieError, match="model.safetensors.index.json"):
        load_checkpoint(ckpt, device="cpu")
    assert cli(["info", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and repr(shard) in err


def test_index_entries_inside_the_checkpoint_load(tmp_path, dense_dir):
    """A symlink that stays inside the directory, and a Hugging Face hub cache snapshot (files are symlinks
    into the repository's blobs/), both load."""
    ref = CheckpointReader(dense_dir).read("model.norm.weight")
    ckpt = _indexed(tmp_path, dense_dir, "link.safetensors")
    (ckpt / "blobs").mkdir()
    shutil.move(tmp_path / "outside.safetensors", ckpt / "blobs" / "w")
    (ckpt / "link.safetensors").symlink_to("blobs/w")
    assert torch.equal(CheckpointReader(ckpt).read("model.norm.weight"), ref)

    repo = tmp_path / "hub" / "models--baidu--ERNIE-tiny"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(dense_dir) / name, repo / "blobs" / name.upper())
        (snap / name).symlink_to(f"../../blobs/{name.upper()}")
    assert torch.equal(CheckpointReader(snap).read("model.norm.weight"), ref)
    assert load_checkpoint(snap, dtype="float32", device="cpu").model.norm.weight.equal(ref)


def test_unindexed_weights_symlinked_outside_are_refused(tmp_path, dense_dir):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(Path(dense_dir) / "model.safetensors")
    with pytest.raises(ErnieError, match="outside the checkpoint directory"):
        CheckpointReader(ckpt)


# ---- safetensors headers -------------------------------------------------------------------------------
def _raw(path: Path, header, data: bytes = b"", n: int | None = None, head: bytes | None = None,
         cut: int | None = None) -> str:
    """A safetensors file written byte by byte: header JSON (or raw `head` bytes), declared length `n`, data,
    the whole cut to `cut` bytes."""
    raw = head if head is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes((struct.pack("<Q", len(raw) if n is None else n) + raw + data)[:cut])
    return str(path)


def _t(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    "too-short": dict(header={"a": _t()}, data=bytes(8), cut=5),
    "empty-header": dict(header=None, head=b""),
    "header-past-eof": dict(header={"a": _t()}, data=bytes(8), n=4096),
    "header-too-large": dict(header={"a": _t()}, data=bytes(8), n=2**62),
    "not-json": dict(header=None, head=b"{not json"),
    "not-utf8": dict(header=None, head=b'{"\xff": 1}'),
    "not-an-object": dict(header=[1, 2]),
    "entry-not-an-object": dict(header={"a": 5}),
    "bad-metadata": dict(header={"__metadata__": {"k": 1}, "a": _t()}, data=bytes(8)),
    "missing-offsets": dict(header={"a": {"dtype": "F32", "shape": [2]}}, data=bytes(8)),
    "unknown-dtype": dict(header={"a": _t(dtype="F13")}, data=bytes(8)),
    "negative-dim": dict(header={"a": _t(shape=(-2,))}, data=bytes(8)),
    "float-dim": dict(header={"a": _t(shape=(2.0,))}, data=bytes(8)),
    "truncated": dict(header={"a": _t(), "b": _t(offsets=(8, 16))}, data=bytes(12)),
    "overlap": dict(header={"a": _t(), "b": _t(offsets=(4, 12))}, data=bytes(12)),
    "gap": dict(header={"a": _t(), "b": _t(offsets=(12, 20))}, data=bytes(20)),
    "not-from-zero": dict(header={"a": _t(offsets=(8, 16))}, data=bytes(16)),
    "end-before-begin": dict(header={"a": _t(shape=(0,), offsets=(8, 0))}, data=bytes(8)),
    "size-not-dtype-x-shape": dict(header={"a": _t(shape=(3,))}, data=bytes(8)),
    "trailing-bytes": dict(header={"a": _t()}, data=bytes(12)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_rejected_like_the_library(tmp_path, case):
    file = _raw(tmp_path / "bad.safetensors", **MALFORMED[case])
    with pytest.raises(ErnieError) as e:
        CheckpointReader(file)
    assert file in str(e.value) and "\n" not in str(e.value)
    with pytest.raises((SafetensorError, ValueError, OSError)):  # the rules agree: the library refuses it too
        with safe_open(file, framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]  # noqa: B018


def test_valid_safetensors_files_load(tmp_path):
    tensors = {"w": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "h": torch.randn(4).bfloat16(),
               "e": torch.empty(0, 3), "s": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path / "lib.safetensors", normalise=False)
    assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())
    file = _raw(tmp_path / "mine.safetensors", {"b": _t(offsets=(8, 16)), "a": _t()}, bytes(16))
    with safe_open(file, framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b"]
    assert CheckpointReader(file).read("b").tolist() == [0.0, 0.0]


# ---- side files of convert and split -------------------------------------------------------------------
@pytest.mark.parametrize("tool", ["split", "convert"])
def test_side_files_known_and_inside_only(tmp_path, dense_dir, tokenizer_dir, tool, caplog):
    src = tmp_path / "src"
    shutil.copytree(dense_dir, src)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), src)
    (tmp_path / "secret").write_text("do not publish")
    (src / "README.md").symlink_to(tmp_path / "secret")
    (src / "notes.txt").write_text("unknown")
    (src / "modeling_ernie.py").write_text("import os")
    (src / "LICENSE").write_text("Apache-2.0")
    (src / "preprocessor_config.json").write_text("{}")
    (src / "sub").mkdir()
    shutil.move(src / "tokenizer_config.json", src / "sub" / "tok.json")
    (src / "tokenizer_config.json").symlink_to("sub/tok.json")
    dst = tmp_path / "dst"
    with caplog.at_level(logging.WARNING, logger="ernie45"):
        if tool == "split":
            split_checkpoint(src, dst, verify=True, progress=False)
        else:
            convert_checkpoint(src, dst, "hf", "paddle", verify=True, progress=False)
    got = set(os.listdir(dst))
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
            "config.json", "LICENSE", "preprocessor_config.json", "manifest.json"} <= got
    assert not got & {"README.md", "notes.txt", "modeling_ernie.py", "sub"}
    assert not (dst / "tokenizer_config.json").is_symlink()
    assert (dst / "tokenizer_config.json").read_bytes() == (src / "sub" / "tok.json").read_bytes()
    assert "README.md" in caplog.text and "outside" in caplog.text


# ---- native kernel cache -------------------------------------------------------------------------------
class FakeCC:
    """Stands in for the C compiler and ctypes: each build writes a new numbered 'library'; `loaded` records
    the content of every file handed to CDLL."""

    def __init__(self):
        self.builds = 0
        self.loaded: list[bytes] = []

    def run(self, cmd, **kw):
        if "--version" in cmd:
            return types.SimpleNamespace(returncode=0, stdout="fakecc 1.0", stderr="")
        self.builds += 1
        out = Path(cmd[cmd.index("-o") + 1])
        out.write_bytes(f"build {self.builds}".encode())
        out.chmod(0o775)  # as a linker under umask 002 leaves it
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    def cdll(self, path):
        assert not os.path.islink(path)
        self.loaded.append(Path(path).read_bytes())
        return types.SimpleNamespace(ernie_isa=types.SimpleNamespace(), ernie_dequant=types.SimpleNamespace())


@pytest.fixture
def fake_cc(tmp_path, monkeypatch):
    cc = FakeCC()
    monkeypatch.setenv("ERNIE45_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ERNIE45_NATIVE", "1")
    monkeypatch.setattr(native, "_compiler", lambda: "cc")
    monkeypatch.setattr(native, "can_execute", lambda level: True)
    monkeypatch.setattr(native.subprocess, "run", cc.run)
    monkeypatch.setattr(native.ctypes, "CDLL", cc.cdll)
    native.cache_clear()
    yield cc
    native.cache_clear()


def _load(cc: FakeCC) -> Path:
    native.cache_clear()
    assert native.load("decode", "generic") is not None
    libs = list(native._cache_dir().iterdir())
    assert len(libs) == 1
    return libs[0]


def test_kernel_cache_is_private(fake_cc):
    lib = _load(fake_cc)
    cache = native._cache_dir()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(lib.stat().st_mode) & 0o022 == 0
    assert fake_cc.builds == 1 and fake_cc.loaded == [b"build 1"]
    _load(fake_cc)  # a trusted cached library is reused
    assert fake_cc.builds == 1 and fake_cc.loaded == [b"build 1"] * 2
    cache.chmod(0o777)
    _load(fake_cc)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and fake_cc.builds == 1


@pytest.mark.parametrize("plant", ["group-writable", "world-writable", "symlink", "other-owner"])
def test_untrusted_cached_library_is_rebuilt_not_loaded(fake_cc, tmp_path, monkeypatch, plant):
    lib = _load(fake_cc)
    evil = tmp_path / "evil.so"
    evil.write_bytes(b"evil")
    if plant == "symlink":
        lib.unlink()
        lib.symlink_to(evil)
    else:
        lib.write_bytes(b"evil")
        lib.chmod({"group-writable": 0o620, "world-writable": 0o602, "other-owner": 0o600}[plant])
    if plant == "other-owner":
        real_lstat = os.lstat

        def lstat(p, *a, **k):
            st = real_lstat(p, *a, **k)
            if os.fspath(p) != str(lib):
                return st
            fields = list(st)
            fields[stat.ST_UID] = st.st_uid + 1
            return os.stat_result(fields)

        monkeypatch.setattr(native.os, "lstat", lstat)
    assert _load(fake_cc) == lib
    assert fake_cc.builds == 2 and fake_cc.loaded == [b"build 1", b"build 2"]
    assert not lib.is_symlink() and lib.read_bytes() == b"build 2" and evil.read_bytes() == b"evil"


def test_kernel_cache_of_another_user_is_not_used(fake_cc, monkeypatch):
    lib = _load(fake_cc)
    lib.write_bytes(b"evil")
    cache = str(native._cache_dir())
    real_stat = os.stat

    def other_owner(p, *a, **k):
        st = real_stat(p, *a, **k)
        if os.fspath(p) != cache:
            return st
        fields = list(st)
        fields[stat.ST_UID] = st.st_uid + 1
        return os.stat_result(fields)

    monkeypatch.setattr(native.os, "stat", other_owner)
    native.cache_clear()
    assert native.load("decode", "generic") is not None
    assert fake_cc.loaded == [b"build 1", b"build 2"] and lib.read_bytes() == b"evil"
    assert os.listdir(cache) == [lib.name]  # built and loaded in a temporary directory, since removed
