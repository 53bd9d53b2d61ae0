"""`ernie45 convert`: Paddle ⇄ HF layouts against hand-built expectations, bit-exact round trips, transformers
loading, manifests, bad input, peak memory, and the commands of docs/convert.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_hf_model, save_hf
from safetensors import safe_open
from safetensors.numpy import load_file as np_load
from safetensors.numpy import save_file as np_save
from safetensors.torch import load_file, save_file

from ernie45.cli import main as cli
from ernie45.config import ErnieConfig
from ernie45.convert import manifest
from ernie45.convert.paddle import PADDLE_ONLY_KEYS, convert_checkpoint
from ernie45.errors import ErnieError

CASES = {
    "dense_tied": ("dense", {}),
    "dense_untied": ("dense", dict(tie_word_embeddings=False)),
    "moe_untied": ("moe", {}),
    "moe_tied": ("moe", dict(tie_word_embeddings=True)),
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "convert.md"


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory, tokenizer_dir):
    """case -> (transformers model, saved HF checkpoint dir), built once per module."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            kind, kw = CASES[case]
            model = make_hf_model(kind, bias_scale=0.3, **kw)
            cache[case] = (model, save_hf(model, tmp_path_factory.mktemp(case) / "hf", tokenizer_dir))
        return cache[case]

    return get


def tensors(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def config_without_version(path) -> dict:
    return {
        k: v for k, v in ErnieConfig.from_pretrained(path).to_dict().items() if k != "transformers_version"
    }


def paddle_expected(hf: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """The Paddle checkpoint, written out by hand from ARCHITECTURE.md §4 (numpy, as tran_4_5t.py reads it)."""
    f32 = np.float32
    exp = {
        "ernie.embed_tokens.weight": hf["model.embed_tokens.weight"],
        "ernie.norm.weight": hf["model.norm.weight"],
    }
    exp["lm_head.weight"] = (
        hf["model.embed_tokens.weight"] if cfg.tie_word_embeddings else hf["lm_head.weight"].T
    )

    def swiglu(p: str, q: str) -> None:  # fused [gate | up] columns, transposed down
        exp[p + "up_gate_proj.weight"] = np.concatenate(
            [hf[q + "gate_proj.weight"].T, hf[q + "up_proj.weight"].T], 1
        )
        exp[p + "down_proj.weight"] = hf[q + "down_proj.weight"].T

    for i in range(cfg.num_hidden_layers):
        p, q = f"ernie.layers.{i}.", f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            exp[p + norm + ".weight"] = hf[q + norm + ".weight"]
        qkv = [hf[q + f"self_attn.{x}_proj.weight"].T for x in "qkv"]
        exp[p + "self_attn.qkv_proj.weight"] = np.concatenate(qkv, axis=1)  # columns [Q | K | V]
        exp[p + "self_attn.o_proj.weight"] = hf[q + "self_attn.o_proj.weight"].T
        if q + "mlp.gate.weight" in hf:
            exp[p + "mlp.gate.weight"] = hf[q + "mlp.gate.weight"].T.astype(f32)
            bias = q + "mlp.moe_statics.e_score_correction_bias"
            exp[p + "mlp.moe_statics.e_score_correction_bias"] = hf[bias].astype(f32)
            for j in range(cfg.moe_num_experts):
                swiglu(p + f"mlp.experts.{j}.", q + f"mlp.experts.{j}.")
            if cfg.moe_num_shared_experts:
                swiglu(p + "mlp.shared_experts.", q + "mlp.shared_experts.")
        else:
            swiglu(p + "mlp.", q + "mlp.")
    return exp


# ---- layout and round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_paddle_to_hf_is_bit_exact(case, hf_ckpt, tmp_path):
    _, src = hf_ckpt(case)
    convert_checkpoint(src, tmp_path / "pd", "hf", "paddle", progress=False)
    convert_checkpoint(tmp_path / "pd", tmp_path / "hf", "paddle", "hf", progress=False, verify=True)
    a, b = tensors(src), tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert config_without_version(tmp_path / "hf") == config_without_version(src)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (Path(src) / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_paddle_layout_matches_the_spec(case, hf_ckpt, tmp_path):
    model, src = hf_ckpt(case)
    cfg = model.config
    hf = {k: v.numpy() for k, v in tensors(src).items()}
    convert_checkpoint(src, tmp_path / "pd", "hf", "paddle", progress=False)
    got = np_load(str(tmp_path / "pd" / "model.safetensors"))
    exp = paddle_expected(hf, cfg)
    assert sorted(got) == sorted(exp)
    for k, v in exp.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k
    d, H = cfg.head_dim, cfg.hidden_size
    assert got["ernie.layers.0.self_attn.qkv_proj.weight"].shape == (
        H,
        (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d,
    )
    assert got["lm_head.weight"].shape == (
        (cfg.vocab_size, H) if cfg.tie_word_embeddings else (H, cfg.vocab_size)
    )
    pcfg = json.loads((tmp_path / "pd" / "config.json").read_text())
    moe = cfg.model_type == "ernie4_5_moe"
    assert pcfg["architectures"] == ["Ernie4_5_MoeForCausalLM" if moe else "Ernie4_5_ForCausalLM"]
    assert (
        pcfg["model_type"] == cfg.model_type and pcfg["rope_theta"] == 10000.0 and pcfg["dtype"] == "float32"
    )
    assert "rope_parameters" not in pcfg and "transformers_version" not in pcfg
    assert pcfg["tie_word_embeddings"] == cfg.tie_word_embeddings and pcfg["head_dim"] == d
    if moe:
        assert (pcfg["moe_num_experts"], pcfg["moe_k"], pcfg["moe_num_shared_experts"]) == (6, 2, 1)


@pytest.mark.parametrize("case", ["dense_tied", "moe_untied"])
def test_hand_built_paddle_checkpoint_converts_and_loads_in_transformers(
    case, hf_ckpt, tokenizer_dir, tmp_path
):
    """Paddle → HF on a checkpoint written by hand (numpy, Paddle config keys): the HF result equals the original
    tensors and gives the original logits in transformers."""
    from transformers import AutoModelForCausalLM

    model, src = hf_ckpt(case)
    hf = {k: v.numpy() for k, v in tensors(src).items()}
    pd_dir = tmp_path / "paddle"
    pd_dir.mkdir()
    pd = paddle_expected(hf, model.config)
    names = sorted(pd)
    np_save(
        {k: np.ascontiguousarray(pd[k]) for k in names[: len(names) // 2]},
        str(pd_dir / "model-00001-of-00002.safetensors"),
        metadata={"format": "np"},
    )
    np_save(
        {k: np.ascontiguousarray(pd[k]) for k in names[len(names) // 2 :]},
        str(pd_dir / "model-00002-of-00002.safetensors"),
        metadata={"format": "np"},
    )
    index = {
        "metadata": {},
        "weight_map": {
            k: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors" for i, k in enumerate(names)
        },
    }
    (pd_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    raw = json.loads((Path(src) / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.pop("transformers_version")
    raw |= {
        "rope_theta": 10000.0,
        "architectures": [raw["architectures"][0].replace("Ernie4_5For", "Ernie4_5_For")],
        "fuse_rms_norm": True,
        "use_flash_attention": True,
        "max_sequence_length": 4096,
        "paddlenlp_version": "3.0",
        "moe_z_loss_lambda": 0.0,
    }
    (pd_dir / "config.json").write_text(json.dumps(raw))
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), pd_dir / f)

    assert (
        cli(["convert", "--from", "paddle", "--to", "hf", str(pd_dir), str(tmp_path / "hf"), "--quiet"]) == 0
    )
    a, b = tensors(src), tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    out_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert not set(PADDLE_ONLY_KEYS) & set(out_cfg)
    assert out_cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}

    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    ids = torch.tensor([[1, 5, 77, 300, 12, 9, 401, 33]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bf16_is_stored_as_uint16_and_router_as_fp32(hf_ckpt, tmp_path):
    """Paddle stores bf16 as numpy uint16 (tran_4_5t.py re-views uint16 as bf16); the router stays fp32."""
    _, src = hf_ckpt("moe_untied")
    bf = tmp_path / "bf16"
    shutil.copytree(src, bf)
    sd = {
        k: (v if k.endswith(("mlp.gate.weight", "e_score_correction_bias")) else v.to(torch.bfloat16))
        for k, v in load_file(bf / "model.safetensors").items()
    }
    save_file(sd, bf / "model.safetensors", metadata={"format": "pt"})
    convert_checkpoint(bf, tmp_path / "pd", "hf", "paddle", progress=False)
    with safe_open(tmp_path / "pd" / "model.safetensors", "np") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["ernie.layers.1.mlp.gate.weight"] == "F32"
    assert dtypes["ernie.layers.1.mlp.moe_statics.e_score_correction_bias"] == "F32"
    assert {v for k, v in dtypes.items() if "mlp.gate." not in k and "moe_statics" not in k} == {"U16"}
    raw = np_load(str(tmp_path / "pd" / "model.safetensors"))["ernie.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(
        torch.from_numpy(raw).view(torch.bfloat16), sd["model.layers.0.self_attn.o_proj.weight"].T
    )
    convert_checkpoint(tmp_path / "pd", tmp_path / "hf", "paddle", "hf", progress=False)
    back = tensors(tmp_path / "hf")
    assert sorted(back) == sorted(sd)
    assert all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)


def test_fused_in_memory_expert_layout_is_read(hf_ckpt, tmp_path):
    """A state dict saved straight from transformers 5 memory (fused experts) converts like the on-disk layout."""
    model, src = hf_ckpt("moe_untied")
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    assert "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias" in sd
    save_file(sd, fused / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(Path(src) / "config.json", fused / "config.json")
    convert_checkpoint(fused, tmp_path / "pd_fused", "hf", "paddle", progress=False)
    convert_checkpoint(src, tmp_path / "pd_disk", "hf", "paddle", progress=False)
    a, b = tensors(tmp_path / "pd_fused"), tensors(tmp_path / "pd_disk")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    convert_checkpoint(tmp_path / "pd_fused", tmp_path / "hf", "paddle", "hf", progress=False)
    per_expert = tensors(tmp_path / "hf")
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in per_expert
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in per_expert)


def test_mtp_head_converts_like_the_rest_and_is_left_out_of_gguf(hf_ckpt, tmp_path):
    import gguf

    from ernie45.convert.gguf_export import export_gguf

    _, src = hf_ckpt("moe_untied")
    mtp = tmp_path / "mtp"
    shutil.copytree(src, mtp)
    sd = load_file(mtp / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    b = "model.mtp_block.0."
    shapes = {
        "model.mtp_emb_norm.0.weight": (64,),
        "model.mtp_hidden_norm.0.weight": (64,),
        "model.mtp_linear_proj.0.weight": (64, 128),
        b + "input_layernorm.weight": (64,),
        b + "post_attention_layernorm.weight": (64,),
        b + "self_attn.q_proj.weight": (64, 64),
        b + "self_attn.k_proj.weight": (32, 64),
        b + "self_attn.v_proj.weight": (32, 64),
        b + "self_attn.o_proj.weight": (64, 64),
        b + "mlp.gate_proj.weight": (96, 64),
        b + "mlp.up_proj.weight": (96, 64),
        b + "mlp.down_proj.weight": (64, 96),
    }
    sd |= {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    save_file(sd, mtp / "model.safetensors", metadata={"format": "pt"})
    convert_checkpoint(mtp, tmp_path / "pd", "hf", "paddle", progress=False)
    pd = tensors(tmp_path / "pd")
    assert torch.equal(pd["ernie.mtp_linear_proj.0.weight"], sd["model.mtp_linear_proj.0.weight"].T)
    qkv = torch.cat([sd[b + f"self_attn.{x}_proj.weight"] for x in "qkv"]).T
    assert torch.equal(pd["ernie.mtp_block.0.self_attn.qkv_proj.weight"], qkv)
    up_gate = torch.cat([sd[b + "mlp.gate_proj.weight"], sd[b + "mlp.up_proj.weight"]]).T
    assert torch.equal(pd["ernie.mtp_block.0.mlp.up_gate_proj.weight"], up_gate)
    convert_checkpoint(tmp_path / "pd", tmp_path / "hf", "paddle", "hf", progress=False)
    back = tensors(tmp_path / "hf")
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    export_gguf(mtp, tmp_path / "mtp.gguf", "f32", progress=False)
    export_gguf(src, tmp_path / "plain.gguf", "f32", progress=False)
    names = [t.name for t in gguf.GGUFReader(tmp_path / "mtp.gguf").tensors]
    assert names == [t.name for t in gguf.GGUFReader(tmp_path / "plain.gguf").tensors]


def test_dtype_cast_keeps_router_fp32(hf_ckpt, tmp_path):
    _, src = hf_ckpt("moe_untied")
    convert_checkpoint(src, tmp_path / "pd", "hf", "paddle", dtype="bfloat16", progress=False)
    convert_checkpoint(tmp_path / "pd", tmp_path / "hf", "paddle", "hf", progress=False)
    a, b = tensors(src), tensors(tmp_path / "hf")
    for k in a:
        want = torch.float32 if k.endswith(("mlp.gate.weight", "e_score_correction_bias")) else torch.bfloat16
        assert b[k].dtype == want and torch.equal(b[k], a[k].to(want)), k
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


# ---- sharding, manifest, verify -------------------------------------------------------------------------
def test_sharded_output_manifest_and_verify(hf_ckpt, tmp_path):
    _, src = hf_ckpt("moe_untied")
    out = tmp_path / "pd"
    assert (
        cli(
            [
                "convert",
                "--from",
                "hf",
                "--to",
                "paddle",
                src,
                str(out),
                "--max-shard-size",
                "100KB",
                "--verify",
                "--quiet",
            ]
        )
        == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
        with safe_open(out / shard, "np") as f:
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == shard)
            data = sum(f.get_tensor(k).nbytes for k in f.keys())
            assert data <= 100_000 or len(f.keys()) == 1  # only a tensor bigger than the limit stands alone
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in np_load_all(out).values())
    man = json.loads((out / "manifest.json").read_text())
    listed = sorted(man["files"])
    assert listed == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    for name, entry in man["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert manifest.verify(str(out)).startswith(f"verified {len(listed)} files")
    assert manifest.main([str(out)]) == 0
    with open(out / shards[0], "r+b") as f:  # flip one byte of tensor data
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ErnieError, match=f"{shards[0]} has a different SHA-256"):
        manifest.verify_manifest(str(out))
    (out / "stray.txt").write_text("x")
    with pytest.raises(ErnieError, match="stray.txt is not in the manifest"):
        manifest.verify_manifest(str(out))


def np_load_all(path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(np_load(str(f)))
    return out


# ---- bad input ------------------------------------------------------------------------------------------
def run_cli(args, capsys) -> tuple[int, str]:
    rc = cli(args)
    return rc, capsys.readouterr().err


def test_bad_sources_give_one_line_errors(hf_ckpt, tmp_path, capsys):
    _, src = hf_ckpt("dense_tied")
    conv = ["convert", "--from", "hf", "--to", "paddle"]
    rc, err = run_cli(conv + [str(tmp_path / "nope"), str(tmp_path / "o")], capsys)
    assert rc == 1 and "error: checkpoint not found" in err
    (tmp_path / "file.txt").write_text("x")
    rc, err = run_cli(conv + [str(tmp_path / "file.txt"), str(tmp_path / "o")], capsys)
    assert rc == 1 and "is not a checkpoint directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    rc, err = run_cli(conv + [str(empty), str(tmp_path / "o")], capsys)
    assert rc == 1 and "no model.safetensors" in err
    (empty / "model.pdparams").write_bytes(b"\x80\x04pickle")
    rc, err = run_cli(conv + [str(empty), str(tmp_path / "o")], capsys)
    assert rc == 1 and "pickle formats" in err
    (empty / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    rc, err = run_cli(conv + [str(empty), str(tmp_path / "o")], capsys)
    assert rc == 1 and "safetensors" in err and "Traceback" not in err
    rc, err = run_cli(["convert", "--from", "paddle", "--to", "hf", src, str(tmp_path / "o")], capsys)
    assert rc == 1 and "is a Hugging Face checkpoint" in err and "use --from hf" in err
    rc, err = run_cli(["convert", "--from", "hf", "--to", "hf", src, str(tmp_path / "o")], capsys)
    assert rc == 1 and "ernie45 split" in err
    quant = tmp_path / "quant"
    shutil.copytree(src, quant)
    cfg = json.loads((quant / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "wint8"}}))
    rc, err = run_cli(conv + [str(quant), str(tmp_path / "o")], capsys)
    assert rc == 1 and "is a quantized checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_mixed_formats_and_config_mismatch(hf_ckpt, tmp_path):
    _, src = hf_ckpt("dense_tied")
    mixed = tmp_path / "mixed"
    shutil.copytree(src, mixed)
    sd = load_file(mixed / "model.safetensors")
    sd["ernie.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(64, 160)
    save_file(sd, mixed / "model.safetensors")
    with pytest.raises(ErnieError, match="mixed formats"):
        convert_checkpoint(mixed, tmp_path / "o", "hf", "paddle")
    convert_checkpoint(src, tmp_path / "pd", "hf", "paddle", progress=False)
    cfg = json.loads((tmp_path / "pd" / "config.json").read_text())
    (tmp_path / "pd" / "config.json").write_text(json.dumps(cfg | {"num_key_value_heads": 1}))
    with pytest.raises(ErnieError, match="qkv_proj.weight has 192 outputs but config.json implies 144"):
        convert_checkpoint(tmp_path / "pd", tmp_path / "o", "paddle", "hf")
    assert not (tmp_path / "o").exists()


def test_parameters_and_existing_destination(hf_ckpt, tmp_path, capsys):
    _, src = hf_ckpt("dense_tied")
    with pytest.raises(ErnieError, match="unknown dtype 'float8'"):
        convert_checkpoint(src, tmp_path / "o", "hf", "paddle", dtype="float8")
    with pytest.raises(ErnieError, match="unknown checkpoint format 'onnx'"):
        convert_checkpoint(src, tmp_path / "o", "hf", "onnx")
    with pytest.raises(SystemExit) as e:
        cli(["convert", "--from", "hf", "--to", "paddle", src, str(tmp_path / "o"), "--dtype", "float8"])
    assert e.value.code == 2
    with pytest.raises(ErnieError, match="invalid size"):
        convert_checkpoint(src, tmp_path / "o", "hf", "paddle", max_shard_size="lots")
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, err = run_cli(["convert", "--from", "hf", "--to", "paddle", src, str(dst)], capsys)
    assert rc == 1 and "destination exists" in err and (dst / "keep.txt").read_text() == "mine"
    assert cli(["convert", "--from", "hf", "--to", "paddle", src, str(dst), "--overwrite", "--quiet"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()


def test_full_disk_leaves_nothing_behind(hf_ckpt, tmp_path):
    """A write error (here: the file-size limit, as a full disk would) is one clear error and no output."""
    _, src = hf_ckpt("moe_untied")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        with pytest.raises(ErnieError, match=r"writing .*pd failed: File too large; nothing was written"):
            convert_checkpoint(src, tmp_path / "pd", "hf", "paddle", progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert os.listdir(tmp_path) == []


# ---- memory ---------------------------------------------------------------------------------------------
_PEAK = textwrap.dedent("""
    import json, sys
    from ernie45.convert.paddle import convert_checkpoint
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    base = rss("VmRSS:")
    convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], max_shard_size="50MB", progress=False)
    print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_peak_memory_stays_far_below_checkpoint_size(tmp_path):
    """~250 MB sharded checkpoint: converting either way grows RSS by less than half its size."""
    cfg = ErnieConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    src = tmp_path / "hf"
    src.mkdir()
    cfg.save(src)
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (8192, 512),
        "lm_head.weight": (8192, 512),
        "model.norm.weight": (512,),
    }
    for i in range(16):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (512, 512),
            p + "self_attn.k_proj.weight": (128, 512),
            p + "self_attn.v_proj.weight": (128, 512),
            p + "self_attn.o_proj.weight": (512, 512),
            p + "mlp.gate_proj.weight": (1536, 512),
            p + "mlp.up_proj.weight": (1536, 512),
            p + "mlp.down_proj.weight": (512, 1536),
            p + "input_layernorm.weight": (512,),
            p + "post_attention_layernorm.weight": (512,),
        }
    names = list(shapes)
    weight_map, size = {}, 0
    for s in range(5):
        part = names[s::5]
        file = f"model-{s + 1:05d}-of-00005.safetensors"
        sd = {n: torch.randn(shapes[n], generator=g) for n in part}
        save_file(sd, src / file, metadata={"format": "pt"})
        size += sum(v.nbytes for v in sd.values())
        weight_map |= dict.fromkeys(part, file)
        del sd
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")])
        ),
    )
    growth = {}
    for a, b, fa, fb in (
        (src, tmp_path / "pd", "hf", "paddle"),
        (tmp_path / "pd", tmp_path / "back", "paddle", "hf"),
    ):
        res = subprocess.run(
            [sys.executable, "-c", _PEAK, str(a), str(b), fa, fb],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        m = json.loads(res.stdout.strip().splitlines()[-1])
        growth[f"{fa}->{fb}"] = m["peak"] - m["base"]
    print(
        f"checkpoint {size / 1e6:.0f} MB; peak RSS growth "
        + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in growth.items())
    )
    assert all(v < 0.5 * size for v in growth.values()), growth
    a, b = tensors(src), tensors(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- the guide ------------------------------------------------------------------------------------------
def test_docs_commands_run(hf_ckpt, tmp_path, monkeypatch, capsys):
    """Run every command of the ```bash blocks in docs/convert.md on tiny checkpoints named as in the guide."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    zh = DOCS.with_name("convert_zh.md").read_text(encoding="utf-8")
    assert (
        re.findall(r"```bash\n(.*?)```", zh, flags=re.S) == blocks
    )  # the Chinese guide runs the same commands
    lines = [
        ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    assert lines
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hf_ckpt("dense_tied")[1], "ERNIE-4.5-0.3B-PT")
    shutil.copytree(hf_ckpt("moe_untied")[1], "ERNIE-4.5-21B-A3B-PT")
    convert_checkpoint("ERNIE-4.5-0.3B-PT", "ERNIE-4.5-0.3B-Paddle", "hf", "paddle", progress=False)
    ran = set()
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "ernie45":
            assert cli(argv[1:] + ["--quiet"]) == 0, line
        elif argv[:3] == ["python", "-m", "ernie45.convert.manifest"]:
            assert manifest.main(argv[3:]) == 0, line
        elif argv[0] == "sha256sum":
            assert subprocess.run(argv, capture_output=True).returncode == 0, line
        else:
            pytest.fail(f"unexpected command in docs/convert.md: {line}")
        ran.add(argv[1] if argv[0] == "ernie45" else argv[0])
    assert {"convert", "export-gguf", "split"} <= ran
    capsys.readouterr()
