"""Loading GGUF files: ernie45's own exports (f32 exactly the source; f16/bf16/q8_0/q4_0 the model of the file's
dequantized weights, Q4_0 held as int4 and Q8_0 as int8 groups, bit for bit), a file written by the gguf library's GGUFWriter with K-quants,
the tokenizer rebuilt from the GGUF vocabulary, llama.cpp parity (when llama-cpp-python is installed), bad input and
the CLI. Every file is built here."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sys

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import CORPUS, make_hf_model, save_hf

import ernie45
from ernie45.checkpoint import load_checkpoint
from ernie45.checkpoint_read import build_model
from ernie45.cli import main as cli
from ernie45.config import ErnieConfig
from ernie45.convert.gguf_export import export_gguf
from ernie45.errors import ErnieError
from ernie45.quant.kernels import use_kernel
from ernie45.quant.linear import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from ernie45.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
TT = gguf.TokenType
PROMPTS = ["床前明月光，疑是", "The quick brown fox", "Knowledge is power. 知识"]
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_dir):
    """Tiny HF checkpoints (dense: tied, head_dim 24; MoE: untied, shared expert, biased router)."""
    out = {}
    for kind in ("dense", "moe"):
        model = make_hf_model(kind, bias_scale=0.3)
        out[kind] = save_hf(model, tmp_path_factory.mktemp(kind) / "hf", tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    """(kind, outtype) -> a GGUF file written by `ernie45 export-gguf` (made on first use)."""
    made: dict[tuple[str, str], str] = {}

    def get(kind: str, outtype: str) -> str:
        if (kind, outtype) not in made:
            out = tmp_path_factory.mktemp("gguf") / f"{kind}-{outtype}.gguf"
            made[kind, outtype] = export_gguf(ckpts[kind], out, outtype, progress=False)
        return made[kind, outtype]

    return get


def dequantized_state(path: str, num_experts: int = 0) -> dict[str, torch.Tensor]:
    """The state dict a GGUF file stands for: every tensor dequantized by the gguf library, named by hand
    (ARCHITECTURE.md §7.2), experts unstacked."""
    sd = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(x) for x in t.shape[::-1])
        if t.tensor_type == Q.BF16:
            w = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).float().reshape(shape)
        else:
            w = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(shape))
        top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
        if t.name in top:
            sd[top[t.name]] = w
            continue
        _, i, what, suffix = t.name.split(".")
        p = f"model.layers.{i}."
        if what == "exp_probs_b":
            sd[p + "mlp.moe_statics.e_score_correction_bias"] = w.reshape(1, -1)
        elif what.endswith("_exps"):
            for j in range(num_experts):
                sd[p + f"mlp.experts.{j}.{what.split('_')[1]}_proj.weight"] = w[j]
        else:
            sd[p + f"{LAYER_NAMES[what]}.{suffix}"] = w
    return sd


def reference(src: str, path: str):
    """The source checkpoint (fp32) with every weight replaced by the GGUF file's dequantized one."""
    ref = load_checkpoint(src, dtype="float32", device="cpu")
    sd = dequantized_state(path, ref.config.moe_num_experts)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    return ref


def hyperparameters(cfg: ErnieConfig) -> dict:
    """The config's fields but the ones a GGUF does not carry (dtype, unused keys) or ernie45 derives."""
    d = dataclasses.asdict(cfg)
    for k in ("extra", "torch_dtype", "quantization_config"):
        d.pop(k)
    return d


def logits(model, text: str, tok) -> torch.Tensor:
    # int4 through the dequantising kernel: the CPU int4pack kernel rounds fp32 activations to bf16 (kernels.py)
    with torch.no_grad(), use_kernel("wint4", "dequant"):
        return model(torch.tensor([tok.encode(text)])).logits[0].float()


def greedy(model, ids: list[int], n: int = 8) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad(), use_kernel("wint4", "dequant"):
        for _ in range(n):
            x = torch.cat([x, model(x).logits[0, -1].argmax().view(1, 1)], dim=1)
    return x[0, len(ids):].tolist()


# ---- (a) ernie45's own exports ------------------------------------------------------------------------
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_exported_file_loads_as_its_weights(kind, outtype, ckpts, exported):
    """f32: the source model (logits within 1e-4); other types: the source with the file's dequantized weights
    (logits within 1e-3 of the largest); greedy tokens equal; Q4_0 Linears held as int4 groups of 32 and Q8_0 ones
    as int8 groups of 32 (no requantizing, no dequantizing) whose dequantization is the gguf library's bit for bit,
    other types dequantized to the run dtype."""
    path = exported(kind, outtype)
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    src, _ = ernie45.load(ckpts[kind], dtype="float32", device="cpu")
    ref = src if outtype == "f32" else reference(ckpts[kind], path)
    assert hyperparameters(model.config) == hyperparameters(src.config)
    for text in PROMPTS:
        a, b = logits(ref, text, tok), logits(model, text, tok)
        if outtype == "f32":
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        else:
            assert (a - b).abs().max() <= 1e-3 * a.abs().max(), text
        assert greedy(model, tok.encode(text)) == greedy(ref, tok.encode(text)), text
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    sd = dequantized_state(path, model.config.moe_num_experts)
    if outtype == "q4_0":
        linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
        assert linears == [] and set(int4) >= {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"
                                              if kind == "dense" else "model.layers.1.mlp.experts.5.up_proj"}
        assert "lm_head" in int4
        emb = model.model.embed_tokens  # Q4_0 token_embd: int4 too, bit for bit the gguf library's dequantization
        assert isinstance(emb, Int4Embedding) and emb.group_size == 32
        assert torch.equal(emb.dequantize(torch.float32), sd["model.embed_tokens.weight"])
        if model.config.tie_word_embeddings:  # the tied head is an Int4Linear over the embedding's own tensors
            assert kind == "dense"
            for t in ("weight", "weight_scale", "weight_zero"):
                assert getattr(model.lm_head, t) is getattr(emb, t), t
        for name, mod in int4.items():
            want = sd["model.embed_tokens.weight" if name == "lm_head" and kind == "dense" else f"{name}.weight"]
            assert mod.group_size == 32 and torch.equal(mod.dequantize(torch.float32), want), name
        assert model.config.quantization_config["group_size"] == 32
    elif outtype == "q8_0":
        int8 = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
        linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
        assert int4 == {} and linears == [] and set(int8) >= {"model.layers.1.self_attn.q_proj",
                                                              "model.layers.1.mlp.down_proj" if kind == "dense"
                                                              else "model.layers.1.mlp.experts.5.up_proj"}
        assert "lm_head" in int8
        for name, mod in int8.items():
            want = sd["model.embed_tokens.weight" if name == "lm_head" and kind == "dense" else f"{name}.weight"]
            assert mod.group_size == 32 and mod.weight.dtype == torch.int8, name
            assert mod.weight_scale.shape == (mod.out_features, mod.in_features // 32), name
            assert torch.equal(mod.dequantize(torch.float32), want), name
        qc = model.config.quantization_config
        assert qc["mode"] == "wint8" and qc["group_size"] == 32 and "module_overrides" not in qc
        emb = model.model.embed_tokens  # Q8_0 token_embd: int8 groups too, bit for bit
        assert isinstance(emb, Int8Embedding) and emb.group_size == 32 and qc["embedding_group_size"] == 32
        assert torch.equal(emb.dequantize(torch.float32), sd["model.embed_tokens.weight"])
        if model.config.tie_word_embeddings:  # the tied head is an Int8Linear over the embedding's own tensors
            assert model.lm_head.weight is emb.weight and model.lm_head.weight_scale is emb.weight_scale
    else:
        assert int4 == {} and model.config.quantization_config is None
        got = model.state_dict()
        for key, w in sd.items():
            assert torch.equal(got[key], w), key
    held = dict((name, h) for name, _, h in model.gguf_layout)
    assert held["blk.1.attn_q.weight"] == {"f32": "float32", "f16": "float32", "bf16": "float32",
                                            "q8_0": "int8, group 32, exact", "q4_0": "int4, group 32, exact"}[outtype]
    assert held["output_norm.weight"] == "float32"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_is_honoured(dtype, exported):
    path = exported("moe", "q4_0")
    model, tok = ernie45.load(path, dtype=dtype, device="cpu")
    dt = getattr(torch, dtype)
    mlp = model.model.layers[1].mlp
    assert model.model.embed_tokens.weight_scale.dtype == dt and model.model.norm.weight.dtype == dt
    assert mlp.experts[0].gate_proj.weight_scale.dtype == dt and mlp.gate.weight.dtype == torch.float32
    assert mlp.moe_statics.e_score_correction_bias.dtype == torch.float32
    held = {h for _, q, h in model.gguf_layout if q == "Q4_0"}
    want = "exact" if dtype == "float16" else "scales rounded to bfloat16"
    assert held == {f"int4, group 32, {want}"}  # the Linears and the token embedding
    out = logits(model, PROMPTS[0], tok)
    assert torch.isfinite(out).all()


# ---- the tokenizer ------------------------------------------------------------------------------------
TEXTS = [
    *CORPUS[:6],
    "  two  spaces\tand a tab\n\nnew lines ",
    "émoji 😀 ünïcode ǅ and bytes the corpus never saw: ẞ ∮ ⅷ",
    "<|begin_of_sentence|>User: 你好\nAssistant: hi<|end_of_sentence|>",
    "<s>x</s><unk><mask:1> <|IMAGE_PLACEHOLDER|>",
    "1234567 digits 3.14159",
]


def test_tokenizer_rebuilt_from_the_vocabulary_encodes_as_the_original(ckpts, exported, thinking_ckpt, tmp_path):
    """The same ids for Chinese, English, bytes, special tokens and the chat template, the same special ids,
    decoding and template; also for a Thinking vocabulary (special tokens past the SentencePiece pieces)."""
    think = export_gguf(thinking_ckpt[1], tmp_path / "think.gguf", "f16", progress=False)
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "床前明月光"},
            {"role": "assistant", "content": "疑是地上霜"}, {"role": "user", "content": "Who wrote it?"}]
    for src, path in ((ckpts["dense"], exported("dense", "q4_0")), (thinking_ckpt[1], think)):
        a, b = Tokenizer.from_pretrained(src), ernie45.load(path, device="cpu")[1]
        for text in [*TEXTS, *(f"<think>{t}</think>" for t in TEXTS[:2])]:
            assert b.encode(text) == a.encode(text), text
            assert b.decode(a.encode(text)) == a.decode(a.encode(text)), text
        assert b.apply_chat_template(msgs, tokenize=True) == a.apply_chat_template(msgs, tokenize=True)
        assert b.chat_template == a.chat_template
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id",
                     "stop_token_ids", "vocab_size", "add_bos_token", "add_eos_token"):
            assert getattr(b, attr) == getattr(a, attr), attr
        assert b.added_tokens == a.added_tokens and b.special_ids == a.special_ids
        ids = list(range(a.vocab_size))
        assert b.decode(ids) == a.decode(ids)
        assert b.sp.GetPieceSize() == a.vocab_size


# ---- (b) a file written by the gguf library itself -----------------------------------------------------
WRITER_CONFIG = dict(model_type="ernie4_5", vocab_size=512, hidden_size=256, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
WRITER_TYPES = {  # one of each kind of tensor type, on 256-wide rows (the K-quants' block)
    "token_embd.weight": Q.Q4_0, "output.weight": Q.Q6_K,
    "blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_k.weight": Q.Q5_K, "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q4_0, "blk.0.ffn_up.weight": Q.F16,
    "blk.0.ffn_down.weight": Q.BF16, "blk.1.attn_q.weight": Q.Q4_0, "blk.1.attn_k.weight": Q.Q4_1,
    "blk.1.attn_v.weight": Q.Q6_K, "blk.1.attn_output.weight": Q.Q5_0, "blk.1.ffn_gate.weight": Q.Q4_K,
    "blk.1.ffn_up.weight": Q.Q4_0, "blk.1.ffn_down.weight": Q.Q4_K,
}
K_QUANT_SCALES = {Q.Q4_K: (1e-4, 1e-3), Q.Q5_K: (5e-5, 1e-3), Q.Q6_K: (2e-5, None)}  # (d, dmin) of random blocks


def random_k_quant(shape: tuple[int, int], qtype, rng) -> np.ndarray:
    """K-quant blocks with random codes and sub-block scales and a sane fp16 super-block scale (d, dmin): the gguf
    library dequantizes K-quants but cannot quantize to them."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // 256, size), dtype=np.uint8)
    d, dmin = K_QUANT_SCALES[qtype]
    n = len(blocks)
    if qtype == Q.Q6_K:  # ql, qh, int8 scales, then d
        blocks[:, -2:] = (rng.uniform(0.5, 1.5, (n, 1)) * d).astype(np.float16).view(np.uint8)
    else:  # d, dmin, then scales and codes
        blocks[:, :2] = (rng.uniform(0.5, 1.5, (n, 1)) * d).astype(np.float16).view(np.uint8)
        blocks[:, 2:4] = (rng.uniform(0.5, 1.5, (n, 1)) * dmin).astype(np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def write_gguf(path, tokenizer_dir: str, *, arch: str = "ernie4_5", drop: tuple[str, ...] = (),
               tokenizer_model: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """A dense ERNIE 4.5 file written with `gguf.GGUFWriter` (not ernie45's exporter), tensors of `WRITER_TYPES`;
    metadata keys and tensors named in `drop` are left out. Returns {GGUF name: dequantized float32 weights}."""
    c = WRITER_CONFIG
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    kv = {
        "block_count": (w.add_uint32, c["num_hidden_layers"]), "context_length": (w.add_uint32, 256),
        "embedding_length": (w.add_uint32, c["hidden_size"]), "feed_forward_length": (w.add_uint32, 256),
        "attention.head_count": (w.add_uint32, 4), "attention.head_count_kv": (w.add_uint32, 2),
        "attention.key_length": (w.add_uint32, 64), "attention.value_length": (w.add_uint32, 64),
        "rope.freq_base": (w.add_float32, 10000.0), "attention.layer_norm_rms_epsilon": (w.add_float32, 1e-5),
    }
    for key, (add, value) in kv.items():
        if f"{arch}.{key}" not in drop:
            add(f"{arch}.{key}", value)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    special = {int(i) for i in tok.config["added_tokens_decoder"]}
    tokens, scores, types = [], [], []
    for i in range(c["vocab_size"]):
        if i >= sp.GetPieceSize():
            tokens.append(f"[PAD{i}]"), scores.append(-10000.0), types.append(TT.UNUSED)
            continue
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(TT.UNKNOWN if sp.IsUnknown(i) else TT.CONTROL if i in special else
                     TT.BYTE if sp.IsByte(i) else TT.NORMAL)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_sep_token_id(tok.sep_token_id)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(tok.chat_template)
    shapes = {"token_embd.weight": (512, 256), "output.weight": (512, 256), "output_norm.weight": (256,)}
    for i in range(2):
        shapes |= {f"blk.{i}.attn_norm.weight": (256,), f"blk.{i}.ffn_norm.weight": (256,),
                   f"blk.{i}.attn_q.weight": (256, 256), f"blk.{i}.attn_k.weight": (128, 256),
                   f"blk.{i}.attn_v.weight": (128, 256), f"blk.{i}.attn_output.weight": (256, 256),
                   f"blk.{i}.ffn_gate.weight": (256, 256), f"blk.{i}.ffn_up.weight": (256, 256),
                   f"blk.{i}.ffn_down.weight": (256, 256)}
    ref = {}
    for name, shape in shapes.items():
        qtype = WRITER_TYPES.get(name, Q.F32)
        x = rng.uniform(0.8, 1.2, shape) if len(shape) == 1 else rng.normal(0, 0.08, shape)
        x = x.astype(np.float32)
        if qtype in K_QUANT_SCALES:
            data = random_k_quant(shape, qtype, rng)
        elif qtype == Q.BF16:
            data = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
        else:
            data = gguf.quants.quantize(x, qtype)
        ref[name] = (torch.from_numpy(x).bfloat16().float().numpy() if qtype == Q.BF16 else
                     gguf.quants.dequantize(data, qtype).reshape(shape))
        if name not in drop:
            w.add_tensor(name, data, raw_dtype=qtype if data.dtype in (np.uint8, np.uint16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def test_file_written_by_the_gguf_library_with_k_quants(tmp_path, tokenizer_dir):
    """Mixed types (K-quants Q4_K/Q5_K/Q6_K, Q4_0/Q4_1/Q5_0/Q8_0, F16, BF16): the model of the library's
    dequantization (logits within 1e-3 of the largest, greedy tokens equal); Q4_0 and Q4_K Linears (and the Q4_0
    embedding) held as int4 groups of 32 whose dequantization is the library's (Q4_0 bit for bit, Q4_K within one
    fp32 rounding of the zero point), the Q8_0 one beside them as int8 groups of 32 (bit for bit, recorded as a
    module override of the wint4 mode), the rest float; no vocab_size key (taken from token_embd). Saved as a
    checkpoint, the mix reloads as the same model."""
    from ernie45.checkpoint import save_checkpoint

    path = tmp_path / "writer.gguf"
    ref_w = write_gguf(path, tokenizer_dir)
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    cfg = ErnieConfig(**WRITER_CONFIG)
    ref = build_model(cfg, torch.float32)
    sd = {k: torch.from_numpy(v) for k, v in ref_w.items()}
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight"}
    ref.load_state_dict({names.get(k) or f"model.layers.{k.split('.')[1]}.{LAYER_NAMES[k.split('.')[2]]}.weight": v
                         for k, v in sd.items()}, strict=True)
    ref.eval()
    assert hyperparameters(model.config) == hyperparameters(cfg)
    for text in PROMPTS:
        a, b = logits(ref, text, tok), logits(model, text, tok)
        assert (a - b).abs().max() <= 1e-3 * a.abs().max(), text
        assert greedy(model, tok.encode(text)) == greedy(ref, tok.encode(text)), text
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert sorted(int4) == ["model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.o_proj",
                            "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                            "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                            "model.layers.1.self_attn.q_proj"]
    gguf_names = {f"model.layers.{i}.{v}": f"blk.{i}.{k}.weight" for i in range(2) for k, v in LAYER_NAMES.items()}
    for name, mod in int4.items():
        got, want = mod.dequantize(torch.float32), torch.from_numpy(ref_w[gguf_names[name]])
        if WRITER_TYPES[gguf_names[name]] == Q.Q4_0:
            assert torch.equal(got, want), name
        else:  # zero = 8 scale - dmin m is rounded once in fp32
            torch.testing.assert_close(got, want, atol=2e-7 * want.abs().max().item(), rtol=0, msg=name)
    held = {name: (q, h) for name, q, h in model.gguf_layout}
    assert held["blk.0.attn_q.weight"] == ("Q4_K", "int4, group 32, exact")
    assert held["blk.0.attn_k.weight"] == ("Q5_K", "float32, dequantized")
    assert held["output.weight"] == ("Q6_K", "float32, dequantized")
    assert held["token_embd.weight"] == ("Q4_0", "int4, group 32, exact")  # an Int4Embedding (the head is untied)
    assert isinstance(model.model.embed_tokens, Int4Embedding)
    assert held["blk.1.attn_q.weight"] == ("Q4_0", "int4, group 32, exact")
    assert held["blk.0.ffn_down.weight"] == ("BF16", "float32")
    assert held["blk.0.attn_v.weight"] == ("Q8_0", "int8, group 32, exact")
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert list(int8) == ["model.layers.0.self_attn.v_proj"]
    v = int8["model.layers.0.self_attn.v_proj"]
    assert v.group_size == 32 and torch.equal(v.dequantize(torch.float32), torch.from_numpy(ref_w["blk.0.attn_v.weight"]))
    qc = model.config.quantization_config
    assert qc["mode"] == "wint4" and qc["group_size"] == 32
    assert qc["module_overrides"] == {"model.layers.0.self_attn.v_proj": {"mode": "wint8", "group_size": 32}}
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok)
    again, _ = ernie45.load(tmp_path / "ck", dtype="float32", device="cpu")
    assert again.config.quantization_config == qc
    assert type(again.model.layers[0].self_attn.v_proj) is Int8Linear
    torch.testing.assert_close(logits(again, PROMPTS[0], tok), logits(model, PROMPTS[0], tok), atol=0, rtol=0)


# ---- (c) llama.cpp -------------------------------------------------------------------------------------
LLAMA_TOL = 0.05  # of the largest logit; measured 1.3–1.9 % on the dense and MoE test files


def llama_greedy(llm, prompt: list[int], n: int = 8) -> list[int]:
    """llama.cpp's own greedy continuation of `prompt`: the sequence the comparisons teacher-force."""
    got = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(t)
        if len(got) == n:
            break
    return got


def llama_logits(llm, seq: list[int]) -> torch.Tensor:
    """llama.cpp's logits (len(seq), vocab) at every position of `seq`, from a fresh context."""
    llm.reset()
    llm.eval(seq)
    return torch.tensor(np.array(llm.scores[: len(seq)]), dtype=torch.float32)
@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_llama_cpp_agrees_on_the_same_file(kind, outtype, exported):
    """llama.cpp on the same F32 / Q8_0 / Q4_0 file: the same tokenization; teacher-forced on llama.cpp's own
    greedy continuation, logits within 1e-3 of the largest for F32, and for Q8_0 / Q4_0 (where llama.cpp multiplies
    by activations it rounds to 8 bits, ernie45 by fp32 ones) within LLAMA_TOL at every position but, in an MoE, one
    (measured: 1-2.5 %, and 20 % at one position where two experts are near-tied); each of llama.cpp's greedy tokens
    is ernie45's argmax wherever ernie45's top-2 margin is wider than twice that position's difference (random
    weights leave near-ties elsewhere)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (llama_cpp) is not installed")
    path = exported(kind, outtype)
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    for text in PROMPTS:
        prompt = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == prompt, text
        got = llama_greedy(llm, prompt)
        seq = prompt + got
        theirs = llama_logits(llm, seq)
        with torch.no_grad():
            ours = model(torch.tensor([seq])).logits[0].float()
        scale = float(ours.abs().max())
        per_position = (ours - theirs[:, : ours.shape[1]]).abs().amax(-1)  # (positions,)
        if outtype == "f32":
            assert float(per_position.max()) <= 1e-3 * scale, text
        else:  # an MoE position may route to another expert where two are near-tied: one per sequence allowed
            outliers = int((per_position > LLAMA_TOL * scale).sum())
            assert outliers <= (1 if kind == "moe" else 0), (text, (per_position / scale).tolist())
        for i, t in enumerate(got):
            row = ours[len(prompt) - 1 + i]
            top = row.topk(2).values
            if float(top[0] - top[1]) > 2 * float(per_position[len(prompt) - 1 + i]):
                assert int(row.argmax()) == t, (text, i)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_llama_cpp_agrees_on_a_q4_k_m_file_it_quantized(kind, tmp_path, tokenizer_dir):
    """A Q4_K_M file made by llama.cpp's own quantizer (`llama_model_quantize`, from ernie45's f32 export of a
    256-wide model, so the K-quants' 256-weight blocks fit): its Q4_K weights held as int4 groups, Q6_K ones
    dequantized. Teacher-forced on llama.cpp's greedy continuation, ernie45's logits differ from llama.cpp's on the
    same file by no more than the quantization moves llama.cpp's own (Q4_K_M against the f32 file), at most
    LLAMA_TOL of the largest logit where that is smaller."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (llama_cpp) is not installed")
    wide = dict(hidden_size=256, intermediate_size=256, head_dim=64, vocab_size=512)
    if kind == "moe":
        wide["moe_intermediate_size"] = 256
    src = save_hf(make_hf_model(kind, bias_scale=0.3, **wide), tmp_path / "hf", tokenizer_dir)
    f32 = export_gguf(src, tmp_path / "f32.gguf", "f32", progress=False)
    path = str(tmp_path / "q4_k_m.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), path.encode(), params) == 0
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    held = {(q, h) for _, q, h in model.gguf_layout}
    assert ("Q4_K", "int4, group 32, exact") in held and ("Q6_K", "float32, dequantized") in held, held
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    exact = llama_cpp.Llama(model_path=str(f32), n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    for text in PROMPTS:
        prompt = tok.encode(text)
        seq = prompt + llama_greedy(llm, prompt)
        theirs, unquantized = llama_logits(llm, seq), llama_logits(exact, seq)
        with torch.no_grad():
            ours = model(torch.tensor([seq])).logits[0].float()
        v = ours.shape[1]
        scale = float(ours.abs().max())
        ours_vs_theirs = float((ours - theirs[:, :v]).abs().max()) / scale
        quantization = float((theirs[:, :v] - unquantized[:, :v]).abs().max()) / scale
        assert ours_vs_theirs <= max(LLAMA_TOL, quantization), (text, ours_vs_theirs, quantization)


# ---- (d) bad input -------------------------------------------------------------------------------------
def _error(fn, *args, **kw) -> str:
    with pytest.raises(ErnieError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_one_line(tmp_path, tokenizer_dir, exported, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    assert "is not a GGUF file" in _error(ernie45.load, junk)
    assert "is not a GGUF file" in _error(Tokenizer.from_pretrained, junk)
    plain = tmp_path / "notes.txt"
    plain.write_text("hello")
    assert "neither a checkpoint directory nor a GGUF file" in _error(ernie45.load, plain)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "is not a GGUF file" in _error(ernie45.load, empty)

    llama = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(llama), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "GGUF architecture 'llama' is not ERNIE 4.5" in _error(ernie45.load, llama)

    q4 = exported("dense", "q4_0")
    data = open(q4, "rb").read()
    for cut in (len(data) * 3 // 4, 40):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        assert "truncated" in _error(ernie45.load, short)

    rms = "ernie4_5.attention.layer_norm_rms_epsilon"
    write_gguf(tmp_path / "nokey.gguf", tokenizer_dir, drop=(rms,))
    assert f"the GGUF metadata key {rms} is missing" in _error(ernie45.load, tmp_path / "nokey.gguf")
    write_gguf(tmp_path / "notensor.gguf", tokenizer_dir, drop=("blk.1.attn_k.weight",))
    assert "missing tensors: blk.1.attn_k.weight" in _error(ernie45.load, tmp_path / "notensor.gguf")

    gpt2 = tmp_path / "gpt2.gguf"
    write_gguf(gpt2, tokenizer_dir, tokenizer_model="gpt2")
    assert "tokenizer model 'gpt2' is not SentencePiece" in _error(ernie45.load, gpt2)
    model, tok = ernie45.load(gpt2, device="cpu", tokenizer=tokenizer_dir)  # the weights load; a tokenizer given
    assert tok.encode(TEXTS[0]) == Tokenizer.from_pretrained(tokenizer_dir).encode(TEXTS[0])

    assert cli(["generate", "--model", str(junk), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "is not a GGUF file" in err and err.count("\n") == 1
    assert cli(["info", str(tmp_path / "short40.gguf")]) == 1
    assert "truncated" in capsys.readouterr().err


# ---- (e) the CLI ---------------------------------------------------------------------------------------
def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    old = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        rc = cli(argv)
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_cli_generate_and_info(kind, exported, capsys):
    """`ernie45 generate --model FILE.gguf` prints the API's greedy text; `ernie45 info FILE.gguf` tells the
    architecture, per tensor group the GGUF type and how it is held, and memory whose weights are the loaded ones."""
    from ernie45.fast import optimize_for_inference

    path = exported(kind, "q4_0")
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    prompt = "床前明月光，"
    rc, out, err = _run(["generate", "--model", path, "--prompt", prompt, "--max-new-tokens", "8",
                         "--temperature", "0", "--ignore-eos", "--dtype", "float32"], capsys)
    ids = tok.encode(prompt)
    optimize_for_inference(model)  # as the command does (its C step quantises activations: the same tokens)
    want = model.generate([ids], do_sample=False, max_new_tokens=8, eos_token_id=[])[0, len(ids):]
    assert rc == 0 and err == ""
    assert out == tok.decode(want, skip_special_tokens=True) + "\n"

    rc, out, _ = _run(["info", path, "--dtype", "float32"], capsys)
    arch = "ernie4_5-moe" if kind == "moe" else "ernie4_5"
    assert rc == 0 and f"architecture             {arch}" in out and "file_type                MOSTLY_Q4_0" in out
    assert "blk.N.attn_q.weight x" in out and "Q4_0   -> int4, group 32, exact" in out
    tied = "; also the tied output head" if kind == "dense" else ""
    assert "token_embd.weight x1" in out and f"Q4_0   -> int4, group 32, exact{tied}" in out
    assert "memory (predicted, before loading)" in out
    rc, out, _ = _run(["info", path, "--dtype", "float32", "--json"], capsys)
    info = json.loads(out)
    held = {}
    for t in [*model.parameters(), *model.buffers()]:
        held[t.data_ptr()] = t.numel() * t.element_size()
    assert info["memory"]["weights_bytes"] == sum(held.values())
    assert info["parameters"] == sum(t.n_elements for t in gguf.GGUFReader(path).tensors)
    groups = {(t["group"], t["gguf_type"], t["held_as"]) for t in info["tensors"]}
    assert ("output_norm.weight", "F32", "float32") in groups
    assert info["files"] == {os.path.basename(path): os.path.getsize(path)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_info_on_a_q8_0_file(dtype, exported, capsys):
    """`ernie45 info` on a Q8_0 file: its Linears held as int8 groups of 32 (exact in fp32, scales rounded in
    bf16), and predicted weight memory equal to the loaded model's (int8 plus a scale per 32 weights)."""
    path = exported("moe", "q8_0")
    model, _ = ernie45.load(path, dtype=dtype, device="cpu")
    rc, out, _ = _run(["info", path, "--dtype", dtype, "--json"], capsys)
    info = json.loads(out)
    held = {}
    for t in [*model.parameters(), *model.buffers()]:
        held[t.data_ptr()] = t.numel() * t.element_size()
    assert rc == 0 and info["memory"]["weights_bytes"] == sum(held.values())
    groups = {(t["group"], t["gguf_type"], t["held_as"]) for t in info["tensors"]}
    want = "exact" if dtype == "float32" else "scales rounded to bfloat16"
    assert ("blk.N.attn_q.weight", "Q8_0", f"int8, group 32, {want}") in groups


def test_gguf_path_without_extension(exported, tmp_path):
    """A GGUF file is recognised by its magic too, whatever its name."""
    bare = tmp_path / "model"
    shutil.copy(exported("dense", "f32"), bare)
    model, tok = ernie45.load(bare, dtype="float32", device="cpu")
    assert model.name_or_path == str(bare) and tok.encode(PROMPTS[0])


def test_saved_as_a_checkpoint_and_quantize(exported, tmp_path):
    """A loaded GGUF saves as an ernie45 checkpoint (wint4, group 32) that reloads to the same logits and tokens;
    `quantize=` applies to a file's float or dequantized weights and is refused for Q4_0 and Q8_0 ones, before
    loading."""
    from ernie45.checkpoint import save_checkpoint

    model, tok = ernie45.load(exported("moe", "q4_0"), dtype="float32", device="cpu")
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok)
    again, tok2 = ernie45.load(tmp_path / "ck", dtype="float32", device="cpu")
    assert again.config.quantization_config == model.config.quantization_config
    torch.testing.assert_close(logits(again, PROMPTS[0], tok), logits(model, PROMPTS[0], tok), atol=0, rtol=0)
    assert [tok2.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert "holds Q4_0/Q4_K/Q8_0 weights" in _error(ernie45.load, exported("moe", "q4_0"), quantize="wint8")
    assert "holds Q4_0/Q4_K/Q8_0 weights" in _error(ernie45.load, exported("moe", "q8_0"), quantize="wint4")
    q8, _ = ernie45.load(exported("moe", "f16"), dtype="float32", device="cpu", quantize="wint8")
    assert type(q8.model.layers[1].mlp.experts[0].gate_proj).__name__ == "Int8Linear"


def _same_or_near_tie(model, tokens: torch.Tensor, ref_tokens: torch.Tensor, rel: float, msg: str) -> None:
    """Greedy `tokens` equal `ref_tokens` (the PyTorch forward's), or first differ where the forward's two best
    logits are within `rel` of its largest |logit|: int4 rows multiply activations quantised to int8 per group
    (~0.5 % of a product's largest output), which may pick the other side of such a tie, never of a clear margin."""
    if torch.equal(tokens, ref_tokens):
        return
    t = int((tokens[0] != ref_tokens[0]).nonzero()[0])
    with torch.inference_mode():
        lg = model(ref_tokens[:, :t]).logits[0, -1].float()
    top = lg.topk(2).values
    gap = float(top[0] - top[1]) / float(lg.abs().max())
    print(f"{msg}: greedy tokens part at step {t}, where the forward's best two logits are {gap:.1e} apart")
    assert gap <= rel, (msg, t, top.tolist())


@pytest.mark.parametrize("outtype", ["q4_0", "q8_0"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_c_step_reads_a_quantized_file_as_loaded(kind, outtype, exported, tmp_path):
    """The C decode step runs a Q4_0 file as it is held: int4 groups of 32 (several per chunk of the tiled int4
    kernel, each lane in its own) and the int4 token embedding (dense: the head tied to it, the same three tensors), and a Q8_0 file:
    int8 with a scale per 32 columns (exact int32 sums per group; the embedding and its tied head likewise), at every
    ISA level this machine runs: logits within the int4 parity tests' bound of the PyTorch forward and the same
    greedy tokens, but for a near-tie (`_same_or_near_tie`). Saved as a checkpoint (the tied head written once) and
    reloaded, it is the same model."""
    from ernie45 import native
    from ernie45.checkpoint import save_checkpoint
    from ernie45.fast import FastDecoder
    from ernie45.generation import generate

    path = exported(kind, outtype)
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.inference_mode():
        ref_tokens = generate(model, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        cache = model.new_cache(1, 64)
        model(ids[:, :-1], cache=cache)
        ref = model(ids[:, -1:], cache=cache).logits[:, -1].float()
    ran = 0
    for isa in native.levels():
        if native.load("decode", isa) is None:
            continue
        dec = FastDecoder.attach(model, isa=isa)
        assert dec is not None, isa
        with torch.inference_mode():
            cache = model.new_cache(1, 64)
            model(ids[:, :-1], cache=cache)
            out = dec(ids[:, -1:], cache)
            tokens = generate(model, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.testing.assert_close(out, ref, atol=2e-2 * max(1.0, ref.abs().max().item()), rtol=2e-2, msg=isa)
        _same_or_near_tie(model, tokens, ref_tokens, 2e-2, isa)
        ran += 1
    if outtype == "q8_0" and ran:  # the int8 groups run as such, not dequantized
        import ctypes

        from ernie45.native_abi import W_I8, _Layer

        layer = ctypes.cast(dec._m.layers, ctypes.POINTER(_Layer))[0]
        assert (layer.q.kind, layer.q.group) == (W_I8, 32) == (dec._m.embed_kind, dec._m.embed_group)
    if kind == "dense":
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still one copy after the decoder attached
        save_checkpoint(model, tmp_path / "ck", tokenizer=tok)
        with open(tmp_path / "ck" / "model.safetensors", "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert not [k for k in header if k.startswith("lm_head.")]
        again, _ = ernie45.load(tmp_path / "ck", dtype="float32", device="cpu")
        assert again.lm_head.weight_scale is again.model.embed_tokens.weight_scale
        torch.testing.assert_close(logits(again, PROMPTS[0], tok), logits(model, PROMPTS[0], tok), atol=0, rtol=0)
    if not ran:
        pytest.skip("no C compiler: the C decode step is not built here")


def test_serve_a_gguf_file_and_refuse_directory_only_commands(exported, capsys, tmp_path):
    """`ernie45 serve --model FILE.gguf` serves the file (the config comes from its metadata, not config.json);
    commands that need a checkpoint directory say so in one line instead of reading the file as JSON."""
    import httpx
    from test_serve import cli_server

    from ernie45.cli import main as cli

    path = exported("dense", "q4_0")
    with cli_server("ernie45 serve --model X --port 8000 --max-model-len 256", model_dir=path) as server:
        models = httpx.get(f"{server.base}/v1/models").json()["data"]
        r = httpx.post(f"{server.base}/v1/completions",
                       json={"prompt": "床前明月光", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert models[0]["max_model_len"] == 256
    assert cli(["quantize", "--model", path, "--mode", "wint8", "--out", str(tmp_path / "q")]) == 1
    assert "is a GGUF file" in capsys.readouterr().err


def test_gguf_guide_commands_run(exported, capsys):
    """docs/gguf.md's commands, with a test file in place of the released one (the Chinese guide has the same)."""
    import re
    import shlex

    import httpx
    from test_serve import cli_server

    from ernie45.cli import main as cli

    root = os.path.join(os.path.dirname(__file__), "..", "docs")
    texts = [open(os.path.join(root, f), encoding="utf-8").read() for f in ("gguf.md", "gguf_zh.md")]
    blocks = [re.findall(r"```(bash|python)\n(.*?)```", t, re.S) for t in texts]
    assert blocks[0] == blocks[1]
    path = exported("dense", "q4_0")
    for kind, body in blocks[0]:
        body = body.replace("ERNIE-4.5-0.3B-PT-Q4_0.gguf", path)
        if kind == "python":
            scope: dict = {}
            exec(compile(body, "docs/gguf.md", "exec", dont_inherit=True), scope)
            assert scope["model"].config.vocab_size > 0
            continue
        for line in body.strip().splitlines():
            argv = shlex.split(line)
            if argv[1] == "serve":
                with cli_server(line.replace(path, "X"), model_dir=path) as server:
                    assert httpx.get(f"{server.base}/v1/models").status_code == 200
                continue
            assert cli(argv[1:]) == 0, line
            out = capsys.readouterr().out
            assert ("Q4_0" in out) if argv[1] == "info" else out.strip(), line
