"""The loading pipeline holds one copy of the weights: read straight into final storage, nothing mapped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ernie45.checkpoint import (
    CheckpointReader,
    build_model,
    decode_stream_names,
    load_checkpoint,
    save_checkpoint,
)
from ernie45.config import ErnieConfig
from ernie45.generation import generate

# ~150 MB in fp32: big enough that a second copy shows in the peak RSS, small enough for CI
MID = dict(model_type="ernie4_5", vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
MOE = dict(model_type="ernie4_5_moe", vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_num_experts=8, moe_k=2,
           moe_intermediate_size=64, moe_num_shared_experts=1, moe_layer_start_index=1, tie_word_embeddings=False)


def _save(tmp_path, cfg: dict, dtype=torch.float32, name="m", **kw) -> str:
    m = build_model(ErnieConfig(**cfg), dtype)
    m.init_weights(seed=0)
    save_checkpoint(m, tmp_path / name, **kw)
    return str(tmp_path / name)


@pytest.fixture(scope="module")
def mid(tmp_path_factory) -> str:
    return _save(tmp_path_factory.mktemp("mid"), MID)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cfg", [MID, MOE], ids=["dense", "moe"])
def test_loaded_tensors_equal_the_files(tmp_path, cfg, dtype):
    """Every tensor equals safetensors' own reading of the file, cast as the loader promises (router fp32)."""
    path = _save(tmp_path, cfg, max_shard_size="1MB")
    model = load_checkpoint(path, dtype=dtype, device="cpu")
    ref: dict[str, torch.Tensor] = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            ref.update(load_file(os.path.join(path, f)))
    sd = model.state_dict()
    assert {k for k in sd if not (k == "lm_head.weight" and cfg["tie_word_embeddings"])} == set(ref)
    for k, v in ref.items():
        keep32 = k.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        want = v.to(torch.float32 if keep32 else getattr(torch, dtype))
        assert sd[k].dtype == want.dtype and torch.equal(sd[k], want), k


def test_streamed_weights_share_one_arena_in_reading_order(mid):
    model = load_checkpoint(mid, dtype="bfloat16", device="cpu")
    names = decode_stream_names(model)
    assert names[0] == "model.embed_tokens.weight" and names[-1].startswith("model.layers.3.")  # head is tied
    (lo, hi), = model.weight_arenas
    sd = model.state_dict()
    ptrs = [sd[n].data_ptr() for n in names]
    assert all(lo <= p < hi for p in ptrs) and ptrs == sorted(ptrs)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_no_checkpoint_file_stays_mapped(mid):
    model = load_checkpoint(mid, dtype="float32", device="cpu")
    with open("/proc/self/maps", encoding="utf-8") as f:
        maps = f.read()
    assert os.path.realpath(mid) not in maps
    assert model.model.norm.weight.is_contiguous()


_CHILD = r"""
import json, sys, torch
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
from ernie45.checkpoint import load_checkpoint
from ernie45.fast import optimize_for_inference
from ernie45.generation import generate
from ernie45.checkpoint import build_model
from ernie45.config import ErnieConfig
torch.set_num_threads(1)
build_model(ErnieConfig.from_pretrained(sys.argv[1]), meta=True)  # the one-off imports of meta-device init
base = hwm()
m = load_checkpoint(sys.argv[1], dtype=sys.argv[2], device="cpu")
loaded = hwm()
optimize_for_inference(m)
ids = torch.tensor([[1, 5, 9, 13]])
generate(m, ids, max_new_tokens=4, do_sample=False)
weights = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in m.state_dict().values()}.values())
print(json.dumps({"base": base, "loaded": loaded, "run": hwm(), "weights": weights}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_is_one_copy_of_the_weights(mid, dtype):
    """VmHWM (which counts mapped file pages) grows by the weights once: loading fp32 files as bf16 used to
    hold the touched fp32 mapping beside the bf16 copy (3x the bf16 size), and running added packed copies."""
    out = subprocess.run([sys.executable, "-c", _CHILD, mid, dtype], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    slack = 24 << 20  # allocator rounding, the read buffer, the C decoder's scratch and the KV cache
    assert r["loaded"] - r["base"] <= r["weights"] * 1.05 + slack, r
    assert r["run"] - r["base"] <= r["weights"] * 1.1 + 2 * slack, r


def test_packing_without_the_c_decoder_keeps_answers(mid):
    """Pre-packed Linears release their arena pages; the tied embedding is kept and answers are unchanged."""
    from ernie45.fast import optimize_for_inference

    model = load_checkpoint(mid, dtype="float32", device="cpu")
    ids = torch.tensor([[1, 100, 200, 300]])
    ref = generate(model, ids, max_new_tokens=8, do_sample=False)
    emb = model.model.embed_tokens.weight.clone()
    assert optimize_for_inference(model, native=False) > 0
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert torch.equal(generate(model, ids, max_new_tokens=8, do_sample=False), ref)


def test_reader_reads_rows_columns_and_converts(tmp_path):
    path = _save(tmp_path, MOE)
    ref = load_file(os.path.join(path, "model.safetensors"))
    with CheckpointReader(path) as r:
        w = ref["model.layers.1.mlp.experts.3.up_proj.weight"]
        assert torch.equal(r.read("model.layers.1.mlp.experts.3.up_proj.weight", rows=(5, 17)), w[5:17])
        assert torch.equal(r.cols("model.layers.1.mlp.experts.3.up_proj.weight", 7, 30), w[:, 7:30])
        got = r.read("model.embed_tokens.weight", dtype=torch.bfloat16)
        assert torch.equal(got, ref["model.embed_tokens.weight"].bfloat16())


def test_truncated_file_is_a_clear_error(tmp_path):
    from ernie45.errors import ErnieError

    path = _save(tmp_path, MOE)
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    with pytest.raises(ErnieError, match="truncated"):
        load_checkpoint(path, dtype="float32", device="cpu")


def test_int4_prefill_keeps_the_one_row_major_copy_the_c_decoder_reads():
    """Where PyTorch's int4 CPU kernel exists, a prefill used to re-lay the weight out for it beside the C
    decoder's row-major copy; with the decoder attached prefill multiplies dequantised tiles of that one copy."""
    from ernie45.fast import optimize_for_inference
    from ernie45.quant import quantize_model
    from ernie45.quant.linear import Int4Linear

    m = build_model(ErnieConfig(**MID), torch.float32)
    m.init_weights(seed=0)
    quantize_model(m, "wint4", progress=False)
    ids = torch.randint(3, 16000, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = generate(m, ids, max_new_tokens=6, do_sample=False)
    optimize_for_inference(m)
    if getattr(m, "fast_decoder", None) is None:
        pytest.skip("no C compiler")
    mods = [x for x in m.modules() if isinstance(x, Int4Linear)]
    before = [x.weight.data_ptr() for x in mods]
    with torch.inference_mode():
        out = generate(m, ids, max_new_tokens=6, do_sample=False)
    assert [x.weight.data_ptr() for x in mods] == before
    assert all(x._layout == "rowmajor" for x in mods)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["wint8", "wint4"])
@pytest.mark.parametrize("cfg", [MID, MOE], ids=["dense", "moe"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(tmp_path, cfg, mode):
    """`load(..., quantize=mode)` streams tensor by tensor and gives what load + quantize_model gives."""
    from ernie45.quant import quantize_model

    path = _save(tmp_path, cfg, dtype=torch.bfloat16)
    ref = load_checkpoint(path, dtype="bfloat16", device="cpu")
    quantize_model(ref, mode, progress=False)
    got = load_checkpoint(path, dtype="bfloat16", device="cpu", quantize=mode)
    assert got.config.quantization_config == ref.config.quantization_config
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_auto_dtype_keeps_a_quantized_bf16_checkpoint_in_bf16(tmp_path, monkeypatch):
    """On CPUs without fast bf16 `auto` means fp32 for float checkpoints, but a quantized model's float rest
    (embedding, head) stays bf16 as stored: decode streams it every token."""
    import ernie45.device

    monkeypatch.setattr(ernie45.device, "cpu_has_fast_bf16", lambda: False)
    path = _save(tmp_path, MOE, dtype=torch.bfloat16)
    assert load_checkpoint(path, device="cpu").dtype == torch.float32
    assert load_checkpoint(path, device="cpu", quantize="wint8").dtype == torch.bfloat16
    assert load_checkpoint(path, dtype="float32", device="cpu", quantize="wint8").dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cfg", [MID, MOE], ids=["dense", "moe"])
def test_int8_embedding_checkpoint_loads_into_the_arena(tmp_path, cfg, dtype):
    """A checkpoint with the token embedding in int8 (`quantize_embedding`): the loader swaps in an
    `Int8Embedding`, reads the int8 table first into the decode arena (scales in the run dtype) and gives the
    logits of the model that was quantized in memory; a checkpoint without the key loads a float embedding."""
    from ernie45.quant import quantize_model
    from ernie45.quant.linear import Int8Embedding

    m = build_model(ErnieConfig(**cfg), torch.bfloat16)
    m.init_weights(seed=0)
    quantize_model(m, "wint8", quantize_lm_head=True, quantize_embedding=True, progress=False)
    save_checkpoint(m, tmp_path / "q", max_shard_size="1MB")
    model = load_checkpoint(str(tmp_path / "q"), dtype=dtype, device="cpu")
    emb = model.model.embed_tokens
    assert type(emb) is Int8Embedding and not model.config.tie_word_embeddings
    assert emb.weight.dtype == torch.int8 and emb.weight_scale.dtype == getattr(torch, dtype)
    assert torch.equal(emb.weight, m.model.embed_tokens.weight)
    assert torch.equal(emb.weight_scale.float(), m.model.embed_tokens.weight_scale.float())
    names = decode_stream_names(model)
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    (lo, hi), = model.weight_arenas
    sd = model.state_dict()
    assert lo <= sd["model.embed_tokens.weight"].data_ptr() < hi
    ids = torch.randint(3, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if dtype == "bfloat16":
            assert torch.equal(model(ids).logits, m(ids).logits)
        tokens = generate(model, ids, max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, 14)
    plain = build_model(ErnieConfig(**cfg), torch.float32)
    plain.init_weights(seed=0)
    quantize_model(plain, "wint8", quantize_lm_head=True, progress=False)
    save_checkpoint(plain, tmp_path / "p")
    assert "embedding" not in json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert type(load_checkpoint(str(tmp_path / "p"), dtype=dtype, device="cpu").model.embed_tokens) is torch.nn.Embedding
