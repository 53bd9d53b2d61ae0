"""LoRA adapters: PEFT-layout interop with transformers + peft in both directions, merge, rsLoRA, errors."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.cli import main as cli
from ernie45.errors import ErnieError
from ernie45.train import lora

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")

DENSE_TARGETS = list(lora.ALL_TARGETS)


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny models' matmuls are far faster on one thread than on two contended ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer_dir):
    return save_hf(make_hf_model("dense", seed=1), tmp_path_factory.mktemp("m") / "dense", tokenizer_dir)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer_dir):
    return save_hf(
        make_hf_model("moe", seed=2, bias_scale=0.3), tmp_path_factory.mktemp("m") / "moe", tokenizer_dir
    )


def _ids(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, 400, shape, generator=torch.Generator().manual_seed(seed))


def _randomise_adapter(model, seed: int = 0) -> None:
    """Trained-looking adapter weights (lora_B starts at zero, which would make every check trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _ernie_with_adapter(path, rank=4, alpha=8.0, rslora=False, experts=False, targets=None, seed=0):
    model, _ = ernie45.load(path, dtype="float32", device="cpu")
    lora.add_lora(
        model, lora.lora_config(model, rank, alpha, targets=targets, rslora=rslora, experts=experts)
    )
    _randomise_adapter(model, seed)
    return model.eval()


@torch.no_grad()
def test_merged_logits_equal_unmerged(dense_dir, moe_dir):
    for path, experts in ((dense_dir, False), (moe_dir, True)):
        model = _ernie_with_adapter(path, experts=experts)
        ids = _ids()
        unmerged = model(ids).logits
        base_model, _ = ernie45.load(path, dtype="float32", device="cpu")
        assert (unmerged - base_model(ids).logits).abs().max() > 1e-3  # the adapter really changes the output
        lora.merge_lora(model)
        assert not any(".lora_" in n for n, _ in model.named_parameters())
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)


@torch.no_grad()
def test_rslora_scaling_and_manual_merge(dense_dir):
    model = _ernie_with_adapter(dense_dir, rank=4, alpha=6.0, rslora=True)
    q = model.model.layers[1].self_attn.q_proj
    W, A, B = q.base_layer.weight.clone(), q.lora_A["default"].weight, q.lora_B["default"].weight
    expected = W + (6.0 / 4**0.5) * (B @ A)  # rsLoRA: alpha / sqrt(r)
    lora.merge_lora(model)
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_router_and_experts_not_targeted_by_default(moe_dir):
    model, _ = ernie45.load(moe_dir, dtype="float32", device="cpu")
    lora.add_lora(model, lora.lora_config(model, 4))
    wrapped = {n for n, _ in lora.lora_layers(model)}
    assert not any(n.endswith("mlp.gate") for n in wrapped)
    assert not any(".mlp.experts." in n for n in wrapped)
    assert "model.layers.1.mlp.shared_experts.up_proj" in wrapped
    assert "model.layers.0.mlp.down_proj" in wrapped and "model.layers.2.self_attn.o_proj" in wrapped
    with pytest.raises(ErnieError, match="router"):
        lora.lora_config(model, 4, targets=["gate"])


def test_ernie_adapter_loads_in_transformers_peft(dense_dir, tmp_path):
    """Acceptance 2: same weights under the same keys, same logits through PeftModel on Ernie4_5ForCausalLM."""
    import transformers

    model = _ernie_with_adapter(dense_dir)
    lora.save_adapter(model, tmp_path / "ad", base_model_name_or_path=dense_dir)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert sorted(cfg["target_modules"]) == sorted(DENSE_TARGETS)
    hf = transformers.Ernie4_5ForCausalLM.from_pretrained(
        dense_dir, dtype=torch.float32, attn_implementation="eager"
    )
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    ours = lora.adapter_state_dict(model)
    theirs = peft.get_peft_model_state_dict(pm)  # keys as PeftModel.save_pretrained writes them
    assert set(ours) == set(theirs) and len(ours) == 3 * 7 * 2
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0)
    ids = _ids(1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(ids).logits, atol=1e-4, rtol=0)


def test_transformers_peft_adapter_loads_in_ernie(dense_dir, tmp_path):
    """An adapter trained with peft on the transformers model gives the same logits in ernie45."""
    import transformers

    hf = transformers.Ernie4_5ForCausalLM.from_pretrained(
        dense_dir, dtype=torch.float32, attn_implementation="eager"
    )
    cfg = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    pm = peft.get_peft_model(hf, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(2, (2, 10))
    for _ in range(3):  # a few real peft training steps, so lora_B is non-zero
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "hf_ad")
    pm.eval()
    model, _ = ernie45.load(dense_dir, dtype="float32", device="cpu")
    lora.load_adapter(model, str(tmp_path / "hf_ad"))
    assert {n.rsplit(".", 1)[-1] for n, _ in lora.lora_layers(model)} == {"q_proj", "v_proj", "down_proj"}
    test = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(model(test).logits, pm(input_ids=test).logits, atol=1e-4, rtol=0)


def test_moe_attention_adapter_loads_in_transformers(moe_dir, tmp_path):
    """MoE models: attention adapters cross over to transformers + peft. (peft rewrites MLP targets of
    transformers' MoE models to its fused expert parameters, so MLP adapters stay ernie45-only there.)"""
    model = _ernie_with_adapter(moe_dir, targets=list(lora.ATTENTION), seed=3)
    lora.save_adapter(model, tmp_path / "ad")
    hf = make_hf_model("moe", seed=2, bias_scale=0.3)  # the same weights the fixture saved
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    ids = _ids(4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(ids).logits, atol=1e-4, rtol=0)


def test_merge_cli_writes_plain_checkpoint(dense_dir, tmp_path):
    import transformers

    model = _ernie_with_adapter(dense_dir, seed=5)
    lora.save_adapter(model, tmp_path / "ad")
    out = tmp_path / "merged"
    assert (
        cli(["merge-lora", "--model", dense_dir, "--adapter", str(tmp_path / "ad"), "--out", str(out)]) == 0
    )
    assert {"config.json", "model.safetensors", "tokenizer.model", "generation_config.json"} <= set(
        os.listdir(out)
    )
    merged, _ = ernie45.load(str(out), dtype="float32", device="cpu")
    hf = transformers.Ernie4_5ForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    ids = _ids(6)
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(merged(ids).logits, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-5, rtol=0)
    # refuses to overwrite; a failing merge leaves nothing behind
    assert (
        cli(["merge-lora", "--model", dense_dir, "--adapter", str(tmp_path / "ad"), "--out", str(out)]) == 1
    )
    assert (
        cli(["merge-lora", "--model", dense_dir, "--adapter", str(tmp_path), "--out", str(tmp_path / "x")])
        == 1
    )
    assert not (tmp_path / "x").exists()


def test_merge_dtype_auto_is_the_stored_one(dense_dir, tmp_path):
    """auto keeps the dtype the base weights are stored in, even where config.json names another."""
    import shutil

    from ernie45.checkpoint_read import read_header

    base = tmp_path / "base"
    shutil.copytree(dense_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))  # the tensors are fp32
    lora.save_adapter(_ernie_with_adapter(str(base), seed=8), tmp_path / "ad")
    argv = ["merge-lora", "--model", str(base), "--adapter", str(tmp_path / "ad")]
    for dtype, stored in ((None, "F32"), ("bf16", "BF16"), ("fp32", "F32")):
        out = tmp_path / f"merged-{dtype}"
        assert cli([*argv, "--out", str(out), *(["--dtype", dtype] if dtype else [])]) == 0
        header, _ = read_header(str(out / "model.safetensors"))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {stored}, dtype


def test_example_script_matches_cli(dense_dir, tmp_path, monkeypatch):
    import runpy

    model = _ernie_with_adapter(dense_dir, seed=7)
    lora.save_adapter(model, tmp_path / "ad")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "merge_lora.py")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            script,
            "--model_name_or_path",
            dense_dir,
            "--lora_path",
            str(tmp_path / "ad"),
            "--merge_lora_model_path",
            str(tmp_path / "m"),
        ],
    )
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    assert done.value.code == 0
    merged, _ = ernie45.load(str(tmp_path / "m"), dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()).logits, model(_ids()).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_adapters_disabled_is_the_base(dense_dir):
    model = _ernie_with_adapter(dense_dir)
    base, _ = ernie45.load(dense_dir, dtype="float32", device="cpu")
    ids = _ids()
    with lora.adapters_disabled(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
    assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_bad_adapters_give_clear_errors(dense_dir, tmp_path, tokenizer_dir):
    other = save_hf(make_hf_model("dense", hidden_size=32, head_dim=8), tmp_path / "small", tokenizer_dir)
    small = _ernie_with_adapter(other)
    lora.save_adapter(small, tmp_path / "small_ad")
    model, _ = ernie45.load(dense_dir, dtype="float32", device="cpu")
    with pytest.raises(ErnieError, match="wrong shapes"):
        lora.load_adapter(model, str(tmp_path / "small_ad"))
    with pytest.raises(ErnieError, match="adapter directory not found"):
        lora.load_adapter(model, str(tmp_path / "nope"))
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ErnieError, match="only LoRA"):
        lora.load_adapter(model, str(tmp_path / "ia3"))
    (tmp_path / "bin").mkdir()
    lora.lora_config(model, 4).save_pretrained(str(tmp_path / "bin"))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\0")
    with pytest.raises(ErnieError, match="pickle"):
        lora.load_adapter(ernie45.load(dense_dir, dtype="float32", device="cpu")[0], str(tmp_path / "bin"))
