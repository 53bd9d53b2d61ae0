"""`ernie45 split`: exact re-sharding with a valid index and manifest, loadable by transformers; bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, save_hf
from safetensors import safe_open
from safetensors.torch import load_file

from ernie45.cli import main as cli
from ernie45.convert.manifest import verify_manifest
from ernie45.convert.paddle import convert_checkpoint
from ernie45.convert.safetensors_io import natural_key
from ernie45.convert.split import split_checkpoint
from ernie45.errors import ErnieError
from ernie45.utils import parse_size


@pytest.fixture(scope="module")
def moe(tmp_path_factory, tokenizer_dir):
    model = make_hf_model("moe", bias_scale=0.3)
    return model, save_hf(model, tmp_path_factory.mktemp("moe") / "hf", tokenizer_dir)


def all_tensors(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_split_round_trips_every_tensor_with_a_valid_index(moe, tmp_path):
    model, src = moe
    assert cli(["split", src, str(tmp_path / "s"), "--max-shard-size", "60KB", "--verify", "--quiet"]) == 0
    out = tmp_path / "s"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    a, b = all_tensors(src), all_tensors(out)
    assert sorted(a) == sorted(b) == sorted(index["weight_map"])
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in a.values())
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            names = sorted(f.keys())
            assert names == sorted(k for k, v in index["weight_map"].items() if v == shard)
            assert f.metadata() == {"format": "pt"}
            assert sum(b[k].nbytes for k in names) <= 60_000 or len(names) == 1
    # layers stay together and in order: shard numbers never decrease along the natural tensor order
    order = [int(index["weight_map"][k][6:11]) for k in sorted(b, key=natural_key)]
    assert order == sorted(order)
    for side in ("config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (Path(src) / side).read_bytes()
    assert verify_manifest(str(out)) == len(os.listdir(out)) - 1

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    ids = torch.tensor([[1, 7, 99, 250, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_resplitting_into_one_file_drops_the_index(moe, tmp_path):
    _, src = moe
    split_checkpoint(src, tmp_path / "many", "40KB", progress=False)
    split_checkpoint(tmp_path / "many", tmp_path / "one", "10GB", progress=False, verify=True)
    files = sorted(os.listdir(tmp_path / "one"))
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    assert not [f for f in files if f.startswith("model-")]
    a, b = all_tensors(src), all_tensors(tmp_path / "one")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_split_keeps_paddle_checkpoints_bit_exact(moe, tmp_path):
    _, src = moe
    convert_checkpoint(src, tmp_path / "pd", "hf", "paddle", dtype="bfloat16", progress=False)
    split_checkpoint(tmp_path / "pd", tmp_path / "pd2", "50KB", progress=False)
    for p in (tmp_path / "pd", tmp_path / "pd2"):
        with safe_open(next(p.glob("*.safetensors")), "np") as f:
            assert f.metadata() == {"format": "np"}
    a, b = all_tensors(tmp_path / "pd"), all_tensors(tmp_path / "pd2")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in b.values()} == {torch.uint16, torch.float32}


@pytest.mark.parametrize(
    "text,value",
    [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("10KB", 10**4), ("1.5GB", 15 * 10**8), ("12345", 12345)],
)
def test_sizes(text, value):
    assert parse_size(text) == value


def test_bad_input(moe, tmp_path, capsys):
    _, src = moe
    for bad in ("0GB", "-1MB", "big", ""):
        with pytest.raises(ErnieError, match="invalid size"):
            split_checkpoint(src, tmp_path / "o", bad)
    assert cli(["split", str(tmp_path / "missing"), str(tmp_path / "o")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "notdir").write_text("x")
    assert cli(["split", str(tmp_path / "notdir"), str(tmp_path / "o")]) == 1
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert cli(["split", src, src]) == 1
    assert "same directory" in capsys.readouterr().err
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    data = (Path(src) / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert cli(["split", str(trunc), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and "Traceback" not in err
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "x").write_text("x")
    assert cli(["split", src, str(dst)]) == 1
    assert "destination exists" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
