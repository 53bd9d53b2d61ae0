"""`ernie45 export-gguf`: read back with `gguf.GGUFReader` — architecture, tensor names/shapes/types, metadata,
exact (f32) or bounded (f16/bf16/q8_0/q4_0) values, the embedded SentencePiece vocabulary — plus bad input, and
(optionally, when llama-cpp-python is installed) greedy generation in llama.cpp."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_hf_model, save_hf

from ernie45.cli import main as cli
from ernie45.config import preset
from ernie45.convert.gguf_export import add_metadata, export_gguf, tensor_qtype
from ernie45.convert.manifest import sha256_file
from ernie45.convert.paddle import convert_checkpoint
from ernie45.errors import ErnieError
from ernie45.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_dir):
    """Tiny HF checkpoints: dense (tied, head_dim 24 != hidden/heads) and MoE (untied, shared expert)."""
    out = {}
    for kind in ("dense", "moe"):
        model = make_hf_model(kind, bias_scale=0.3)
        out[kind] = (model, save_hf(model, tmp_path_factory.mktemp(kind) / "hf", tokenizer_dir))
    return out


def field(reader, key):
    return reader.fields[key].contents()


def expected_tensors(model, kind: str) -> dict[str, np.ndarray]:
    """GGUF name -> the source data in numpy (row-major) order, written out by hand from ARCHITECTURE.md §7.2."""
    cfg = model.config
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    exp = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        exp["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        exp[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        exp[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for g, h in (
            ("attn_q", "q_proj"),
            ("attn_k", "k_proj"),
            ("attn_v", "v_proj"),
            ("attn_output", "o_proj"),
        ):
            exp[b + g + ".weight"] = sd[p + f"self_attn.{h}.weight"]
        if kind == "moe" and i >= cfg.moe_layer_start_index:
            inter = cfg.moe_intermediate_size
            gate_up = sd[p + "mlp.experts.gate_up_proj"]  # transformers' fused [E, 2I, H]: rows [gate | up]
            exp[b + "ffn_gate_exps.weight"] = gate_up[:, :inter]
            exp[b + "ffn_up_exps.weight"] = gate_up[:, inter:]
            exp[b + "ffn_down_exps.weight"] = sd[p + "mlp.experts.down_proj"]
            exp[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
            exp[b + "exp_probs_b.bias"] = sd[p + "mlp.gate.moe_statics.e_score_correction_bias"].reshape(-1)
            for g in ("gate", "up", "down"):
                exp[b + f"ffn_{g}_shexp.weight"] = sd[p + f"mlp.shared_experts.{g}_proj.weight"]
        else:
            for g in ("gate", "up", "down"):
                exp[b + f"ffn_{g}.weight"] = sd[p + f"mlp.{g}_proj.weight"]
    return exp


def dequantized(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in t.shape[::-1]))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_f32_export_names_shapes_metadata_and_exact_values(kind, ckpts, tmp_path):
    model, src = ckpts[kind]
    cfg = model.config
    out = tmp_path / "m.gguf"
    assert cli(["export-gguf", src, str(out), "--outtype", "f32", "--verify", "--quiet"]) == 0
    r = gguf.GGUFReader(out)
    arch = "ernie4_5-moe" if kind == "moe" else "ernie4_5"
    assert field(r, "general.architecture") == arch
    exp = expected_tensors(model, kind)
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(exp)
    for name, ref in exp.items():
        t = got[name]
        assert tuple(int(x) for x in t.shape) == ref.shape[::-1], name  # ggml ne = numpy shape reversed
        assert t.tensor_type == Q.F32 and np.array_equal(dequantized(t), ref), name
    meta = {
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 96,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.vocab_size": 512,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
    }
    if kind == "moe":
        meta |= {
            f"{arch}.expert_count": 6,
            f"{arch}.expert_used_count": 2,
            f"{arch}.interleave_moe_layer_step": 1,
            f"{arch}.leading_dense_block_count": 1,
            f"{arch}.expert_feed_forward_length": 32,
            f"{arch}.expert_shared_count": 1,
            f"{arch}.expert_shared_feed_forward_length": 32,
        }
    else:
        assert f"{arch}.expert_count" not in r.fields
    for key, value in meta.items():
        assert field(r, key) == value, key
    assert field(r, f"{arch}.rope.freq_base") == pytest.approx(10000.0)
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert Path(str(out) + ".sha256").read_text() == f"{sha256_file(str(out))}  m.gguf\n"


def test_shared_expert_width_and_the_upstream_formula():
    """llama.cpp's converter writes intermediate_size // num_key_value_heads; for 21B-A3B that equals the real
    shared-expert width (1536 * 2 = 3072) that ernie45 writes."""

    class Recorder:
        def __init__(self):
            self.kv = {}

        def __getattr__(self, name):
            return lambda *a: self.kv.__setitem__(name, a[0] if a else None)

    for cfg, want in ((preset("21b-a3b"), 3072), (preset("tiny-moe"), 32)):
        w = Recorder()
        add_metadata(w, cfg, "x", "f16")
        assert w.kv["add_expert_shared_feed_forward_length"] == want
        assert w.kv["add_leading_dense_block_count"] == cfg.moe_layer_start_index
    assert preset("21b-a3b").intermediate_size // preset("21b-a3b").num_key_value_heads == 3072
    w = Recorder()
    add_metadata(w, preset("300b-a47b"), "x", "f16")
    assert "add_expert_shared_feed_forward_length" not in w.kv and w.kv["add_expert_shared_count"] == 0


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_lower_precision_types_and_dequantised_values(outtype, ckpts, tmp_path):
    model, src = ckpts["moe"]
    out = tmp_path / "m.gguf"
    export_gguf(src, out, outtype, progress=False)
    r = gguf.GGUFReader(out)
    want_type = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]
    exp = expected_tensors(model, "moe")
    ftype = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[outtype]
    assert field(r, "general.file_type") == int(ftype)
    for t in r.tensors:
        ref = exp[t.name].astype(np.float32)
        keep_f32 = ref.ndim == 1 or "_norm" in t.name or "ffn_gate_inp" in t.name or t.name.endswith(".bias")
        assert t.tensor_type == (Q.F32 if keep_f32 else want_type), t.name
        got = dequantized(t)
        if keep_f32:
            assert np.array_equal(got, ref), t.name
        elif outtype == "f16":
            assert np.array_equal(got, ref.astype(np.float16).astype(np.float32)), t.name
        elif outtype == "bf16":
            assert np.array_equal(got, torch.from_numpy(ref).to(torch.bfloat16).float().numpy()), t.name
        elif outtype == "q4_0":
            # bit for bit the gguf library's reference quantizer (ggml's quantize_row_q4_0_ref)
            reference = gguf.quants.dequantize(gguf.quants.quantize(ref, Q.Q4_0), Q.Q4_0)
            assert np.array_equal(got, reference), t.name
            # per block of 32: d = (signed value of largest magnitude) / -8, q = clip(trunc(x / d + 8.5), 0, 15);
            # the error is |d| / 2, or (x / d - 7) |d| where x / d > 7.5 is clipped to level 15 (at most |d|),
            # plus the f16 rounding of d (2^-11 relative, times |q - 8| <= 8)
            blocks, err = ref.reshape(-1, 32), np.abs(got - ref).reshape(-1, 32)
            i = np.abs(blocks).argmax(axis=1)[:, None]
            d = np.take_along_axis(blocks, i, axis=1) / -8
            ratio = blocks / np.where(d == 0, 1, d)
            bound = np.abs(d) * (0.5 + np.clip(ratio - 7.5, 0, None) + 2.0**-8 + 1e-5) + 1e-7
            assert (err <= bound).all(), t.name
            assert (err <= np.abs(d) * (1 + 2.0**-8) + 1e-7).all(), t.name
            assert err.max() > 0  # it really is quantized
        else:  # Q8_0: per block of 32, error <= half a step of amax/127 plus the f16 rounding of the scale
            blocks, err = ref.reshape(-1, 32), np.abs(got - ref).reshape(-1, 32)
            amax = np.abs(blocks).max(axis=1, keepdims=True)
            assert (err <= amax / 127 * 0.5 + amax * 2.0**-10 + 1e-7).all(), t.name
            assert err.max() > 0  # it really is quantized


def test_q8_0_and_q4_0_fall_back_to_f16_for_rows_not_multiple_of_32():
    assert tensor_qtype("blk.0.attn_q.weight", (64, 48), "q8_0") == Q.F16
    assert tensor_qtype("blk.0.attn_q.weight", (48, 64), "q8_0") == Q.Q8_0
    assert tensor_qtype("blk.0.ffn_gate_inp.weight", (6, 64), "q8_0") == Q.F32
    assert tensor_qtype("blk.0.attn_q.weight", (64, 48), "q4_0") == Q.F16
    assert tensor_qtype("blk.0.attn_q.weight", (48, 64), "q4_0") == Q.Q4_0
    assert tensor_qtype("blk.0.ffn_gate_exps.weight", (6, 32, 64), "q4_0") == Q.Q4_0
    assert tensor_qtype("blk.0.ffn_gate_inp.weight", (6, 64), "q4_0") == Q.F32
    assert tensor_qtype("blk.0.attn_norm.weight", (64,), "q4_0") == Q.F32
    assert tensor_qtype("blk.0.exp_probs_b.bias", (6,), "bf16") == Q.F32


def test_embedded_vocabulary_matches_sentencepiece(ckpts, tmp_path):
    _, src = ckpts["dense"]
    out = tmp_path / "m.gguf"
    export_gguf(src, out, "f16", progress=False)
    r = gguf.GGUFReader(out)
    tok = Tokenizer.from_pretrained(src)
    sp = tok.sp
    tokens, scores, types = (field(r, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    assert field(r, "tokenizer.ggml.model") == "llama" and field(r, "tokenizer.ggml.pre") == "default"
    assert len(tokens) == len(scores) == len(types) == 512  # the model's vocab_size, not the tokenizer's 400
    special = {int(i) for i in tok.config["added_tokens_decoder"]}
    assert {0, 1, 2, tok.cls_token_id, tok.sep_token_id} <= special
    TT = gguf.TokenType
    for i in range(sp.GetPieceSize()):
        assert tokens[i] == sp.IdToPiece(i), i
        if i in special:
            assert (types[i], scores[i]) == (TT.CONTROL, -1000.0), i
        else:
            assert scores[i] == pytest.approx(sp.GetScore(i)), i
            assert types[i] == (TT.BYTE if sp.IsByte(i) else TT.NORMAL), i
    for i in range(sp.GetPieceSize(), 512):
        assert (tokens[i], types[i]) == (f"[PAD{i}]", TT.UNUSED)
    ids = {
        k: field(r, f"tokenizer.ggml.{k}")
        for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id")
    }
    assert ids == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unknown_token_id": 0,
        "padding_token_id": 0,
        "eot_token_id": tok.convert_tokens_to_ids("<|end_of_sentence|>"),
    }
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.ggml.add_eos_token") is False
    assert field(r, "tokenizer.ggml.add_space_prefix") is False
    assert field(r, "tokenizer.chat_template") == tok.chat_template


def test_paddle_source_gives_the_same_file_contents(ckpts, tmp_path):
    _, src = ckpts["moe"]
    convert_checkpoint(src, tmp_path / "pd", "hf", "paddle", progress=False)
    export_gguf(src, tmp_path / "hf.gguf", "f32", progress=False)
    export_gguf(tmp_path / "pd", tmp_path / "pd.gguf", "f32", progress=False)
    a, b = gguf.GGUFReader(tmp_path / "hf.gguf"), gguf.GGUFReader(tmp_path / "pd.gguf")
    assert [t.name for t in a.tensors] != [] and sorted(t.name for t in a.tensors) == sorted(
        t.name for t in b.tensors
    )
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data)), t.name
    skip = {"general.name", "GGUF.kv_count"}
    assert {k for k in a.fields if k not in skip} == {k for k in b.fields if k not in skip}
    for k in a.fields:
        if k not in skip and not k.startswith("GGUF."):
            assert field(a, k) == field(b, k), k


def test_bad_input(ckpts, tmp_path, capsys, tokenizer_dir):
    _, src = ckpts["dense"]
    with pytest.raises(ErnieError, match="unknown --outtype 'q4_k'"):
        export_gguf(src, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(SystemExit) as e:
        cli(["export-gguf", src, str(tmp_path / "x.gguf"), "--outtype", "q4_k"])
    assert e.value.code == 2
    no_tok = tmp_path / "no_tok"
    shutil.copytree(src, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    assert cli(["export-gguf", str(no_tok), str(tmp_path / "x.gguf")]) == 1
    assert "no tokenizer.model" in capsys.readouterr().err
    assert cli(["export-gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(ErnieError, match="is a directory"):
        export_gguf(src, tmp_path, "f16")
    biased = tmp_path / "biased"
    save_hf(make_hf_model("dense", use_bias=True, tie_word_embeddings=False), biased, tokenizer_dir)
    with pytest.raises(ErnieError, match="has no biases"):
        export_gguf(biased, tmp_path / "x.gguf", "f16")
    end_early = tmp_path / "end_early"
    save_hf(make_hf_model("moe", num_hidden_layers=5, moe_layer_end_index=3), end_early, tokenizer_dir)
    with pytest.raises(ErnieError, match="layer 4: llama.cpp cannot express this MoE layer layout"):
        export_gguf(end_early, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"mine")
    assert cli(["export-gguf", src, str(out)]) == 1
    assert "exists (pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert cli(["export-gguf", src, str(out), "--overwrite", "--quiet"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_failed_write_leaves_nothing(ckpts, tmp_path, monkeypatch):
    import resource

    _, src = ckpts["moe"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, hard))
    try:
        with pytest.raises(ErnieError, match=r"writing .*m.gguf failed: .*; nothing was written"):
            export_gguf(src, tmp_path / "m.gguf", "f32", progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_llama_cpp_greedy_matches_ernie45(kind, ckpts, tmp_path):
    """The exported f32 file runs in llama.cpp: same tokenization, and the greedy continuation of a prompt equals
    ernie45's for 16 tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ernie45

    _, src = ckpts[kind]
    out = tmp_path / "m.gguf"
    export_gguf(src, out, "f32", progress=False)
    ours, tok = ernie45.load(src, dtype="float32", device="cpu")
    prompt = tok.encode("The quick brown fox")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(16):
            nxt = ours(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    want = ids[0, len(prompt) :].tolist()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False, logits_all=False)
    for text in ("The quick brown fox", "床前明月光，疑是地上霜。", "Hello world! 1234"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    got = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(t)
        if len(got) == 16:
            break
    assert got == want


@pytest.mark.parametrize("mode, embedding", [("wint8", False), ("wint8", True), ("wint4", True)])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_quantized_checkpoint_exports_its_dequantized_weights(kind, mode, embedding, ckpts, tmp_path):
    """A wint8/wint4 checkpoint exports the float weights it stands for (here f32: exactly its dequantization),
    the int8 token embedding (`--quantize-embedding`) included: token_embd is its dequantized table."""
    from ernie45.checkpoint import load_checkpoint
    from ernie45.quant.cli import quantize_checkpoint
    from ernie45.quant.linear import Int8Embedding

    _, src = ckpts[kind]
    q = tmp_path / "q"
    kw = {"group_size": 64, "skip": ("o_proj", "down_proj")} if mode == "wint4" else {}  # 96 input columns
    quantize_checkpoint(src, q, mode, quantize_lm_head=True, quantize_embedding=embedding, progress=False, **kw)
    out = tmp_path / "q.gguf"
    assert cli(["export-gguf", str(q), str(out), "--outtype", "f32", "--quiet"]) == 0
    got = {t.name: dequantized(t) for t in gguf.GGUFReader(out).tensors}
    m = load_checkpoint(str(q), dtype="float32", device="cpu")
    layers = m.model.layers
    assert np.array_equal(got["blk.0.attn_q.weight"], layers[0].self_attn.q_proj.dequantize(torch.float32).numpy())
    assert np.array_equal(got["output.weight"], m.lm_head.dequantize(torch.float32).numpy())
    emb = m.model.embed_tokens
    assert (type(emb) is Int8Embedding) == embedding
    table = emb.dequantize(torch.float32) if embedding else emb.weight
    assert got["token_embd.weight"].shape == tuple(table.shape)
    assert np.array_equal(got["token_embd.weight"], table.numpy())
    if kind == "moe":
        e1 = layers[1].mlp.experts[1].gate_proj.dequantize(torch.float32).numpy()
        assert np.array_equal(got["blk.1.ffn_gate_exps.weight"][1], e1)
