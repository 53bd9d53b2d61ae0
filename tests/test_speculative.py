"""Speculative decoding (ernie45.generation.speculative) and the MTP layer (ernie45.mtp): loading and conversion of
`mtp_*` weights, the head's step for both hidden-state variants, greedy tokens identical to plain decoding (PyTorch
forward and C step, dense and MoE, mtp and ngram), the rejection rule's output distribution, the CLI, the server
and the commands of docs/speculative.md."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil

import pytest
import torch

import ernie45
from ernie45 import native
from ernie45.checkpoint import load_checkpoint, save_checkpoint
from ernie45.cli import main as cli
from ernie45.config import preset
from ernie45.errors import ErnieError
from ernie45.generation import PromptCache, generate, stream_generate
from ernie45.generation import speculative as spec_mod
from ernie45.generation.speculative import Speculative, accept_drafts, ngram_drafts
from ernie45.model import ErnieForCausalLM
from ernie45.models import bundled_path
from ernie45.mtp import MTPHead, attach_mtp, has_mtp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- helpers ----------------------------------------------------------------------------------------------
def mtp_model(kind: str = "tiny-moe", variant: str = "post_norm", seed: int = 0, **overrides) -> ErnieForCausalLM:
    """A random fp32 model with one MTP layer (weights large enough that greedy decoding does not just repeat)."""
    cfg = preset(kind, **overrides)
    cfg.extra.update(num_nextn_predict_layers=1, mtp_hidden_state=variant)
    model = ErnieForCausalLM(cfg)
    attach_mtp(model)
    model.init_weights(std=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "e_score" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval().requires_grad_(False)


def prompt_ids(n: int = 10, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    """A prompt that repeats itself, so prompt lookup finds drafts."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(3, vocab, (1, n), generator=g)
    return torch.cat([p, p, p[:, : n // 2]], 1)


def native_or_skip():
    lib = native.load("decode", "native")
    if lib is None or lib.ernie_simd_width() < 256:
        pytest.skip("no C compiler, or no native build: the C decode step is not built here")


def with_random_head(src: str, out: str, seed: int = 0) -> str:
    """`src` (a bundled model) saved with a random MTP layer added, tokenizer files copied."""
    m = load_checkpoint(src, dtype="float32", device="cpu")
    m.config.extra["num_nextn_predict_layers"] = 1
    attach_mtp(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("model.mtp"):
                p.copy_(torch.ones_like(p) if name.endswith("norm.weight") or "norm.0" in name
                        else torch.randn(p.shape, generator=g) * 0.02)
    save_checkpoint(m, out)
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(src, f), out)
    return out


@pytest.fixture(scope="module")
def head_ckpt(tmp_path_factory):
    """The bundled MoE model with an MTP head (the trained one where the bundle ships it)."""
    src = bundled_path("ernie-tiny-moe")
    if has_mtp(load_checkpoint(src, dtype="float32", device="cpu")):
        return src
    return with_random_head(src, str(tmp_path_factory.mktemp("mtp") / "ernie-tiny-moe-mtp"))


def run_cli(argv, capsys):
    rc = cli(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the MTP layer: loading, shapes, conversion ----------------------------------------------------------------
@pytest.mark.parametrize("kind,bias,tied", [("tiny", False, True), ("tiny", True, False), ("tiny-moe", True, True),
                                            ("tiny-moe", False, False)])
def test_mtp_weights_round_trip(tmp_path, kind, bias, tied):
    m = mtp_model(kind, use_bias=bias, tie_word_embeddings=tied)
    save_checkpoint(m, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck", dtype="float32", device="cpu")
    assert has_mtp(back)
    assert back.model.mtp_linear_proj[0].bias is not None if bias else back.model.mtp_linear_proj[0].bias is None
    want = m.state_dict()
    got = back.state_dict()
    assert sorted(want) == sorted(got)
    for k, v in want.items():
        assert torch.equal(v, got[k]), k
    assert not back.model.mtp_block[0].is_moe  # the MTP block's MLP is dense in MoE models too


def _rewrite(path, change):
    """Rewrite model.safetensors of checkpoint `path` with `change(tensors)` applied."""
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_transposed_linear_proj_is_turned_and_bad_shapes_are_one_line(tmp_path):
    m = mtp_model("tiny")
    save_checkpoint(m, tmp_path / "ck")
    key = "model.mtp_linear_proj.0.weight"
    _rewrite(tmp_path / "ck", lambda t: t.__setitem__(key, t[key].t().contiguous()))  # (2H, H), as 300B-PT
    back = load_checkpoint(tmp_path / "ck", dtype="float32", device="cpu")
    assert torch.equal(back.model.mtp_linear_proj[0].weight, m.model.mtp_linear_proj[0].weight)
    save_checkpoint(m, tmp_path / "upright")  # quantizing the file reads the projection the right way too
    got, want = _stream_quantized(tmp_path / "ck", "wint8"), _stream_quantized(tmp_path / "upright", "wint8")
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    _rewrite(tmp_path / "ck", lambda t: t.__setitem__(key, t[key][:, :10].contiguous()))
    with pytest.raises(ErnieError, match=r"mtp_linear_proj.0.weight has shape \(128, 10\)") as e:
        load_checkpoint(tmp_path / "ck", dtype="float32", device="cpu")
    assert "\n" not in str(e.value)
    save_checkpoint(m, tmp_path / "ck2")
    _rewrite(tmp_path / "ck2", lambda t: t.pop("model.mtp_emb_norm.0.weight"))
    with pytest.raises(ErnieError, match="MTP layer does not match.*missing tensors: model.mtp_emb_norm.0.weight"):
        load_checkpoint(tmp_path / "ck2", dtype="float32", device="cpu")


def _stream_quantized(path, mode: str, **kw) -> dict[str, torch.Tensor]:
    from ernie45.checkpoint_read import CheckpointReader
    from ernie45.config import ErnieConfig
    from ernie45.quant.stream import StreamQuantizer

    with CheckpointReader(path) as r, StreamQuantizer(r, ErnieConfig.from_pretrained(path), mode, **kw) as sq:
        return dict(sq)


@pytest.mark.parametrize("mode", ["wint8", "wint4", "llm.int8"])
def test_quantized_checkpoints_quantize_the_mtp_layer_too(tmp_path, mode):
    """wint8 / wint4 quantize the MTP layer's Linears with the rest (a draft then streams int8 / int4, and a 21B-A3B
    holds ~65 MB of int4 for it instead of ~246 MB of bf16); llm.int8 leaves it in float. The in-memory quantizer,
    the streaming one and quantizing while loading write the same tensors; the checkpoint loads back bit for bit;
    the memory estimate counts the layer as loading holds it; greedy tokens with `mtp` equal plain decoding."""
    from ernie45.checkpoint import checkpoint_state_dict
    from ernie45.commands.info import memory_estimate
    from ernie45.quant import quantize_model
    from ernie45.quant.linear import Int4Linear, Int8Linear

    kw = {"group_size": 32} if mode == "wint4" else {}  # tiny-moe's expert width is 32
    m = mtp_model("tiny-moe", use_bias=True, tie_word_embeddings=False)
    save_checkpoint(m, tmp_path / "f")
    a = load_checkpoint(tmp_path / "f", dtype="float32", device="cpu")
    quantize_model(a, mode, progress=False, **kw)
    want = {"wint8": Int8Linear, "wint4": Int4Linear, "llm.int8": torch.nn.Linear}[mode]
    mtp_linears = [a.model.mtp_linear_proj[0], a.model.mtp_block[0].self_attn.q_proj, a.model.mtp_block[0].mlp.down_proj]
    assert all(type(lin) is want for lin in mtp_linears)
    ref = checkpoint_state_dict(a)
    got = _stream_quantized(tmp_path / "f", mode, dtype="float32", **kw)
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    save_checkpoint(a, tmp_path / "q")
    b = load_checkpoint(tmp_path / "q", dtype="float32", device="cpu")
    loaded = [b.model.mtp_linear_proj[0], b.model.mtp_block[0].self_attn.q_proj, b.model.mtp_block[0].mlp.down_proj]
    assert all(type(lin) is want for lin in loaded)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    if mode != "wint4":
        c = load_checkpoint(tmp_path / "f", dtype="float32", device="cpu", quantize=mode)
        sc = c.state_dict()
        assert sorted(sc) == sorted(sa) and all(torch.equal(sa[k], sc[k]) for k in sa)
    held = {t.data_ptr(): t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()]}
    assert memory_estimate(str(tmp_path / "q"), dtype="float32")["weights_bytes"] == sum(held.values())
    ids = prompt_ids()
    sp = Speculative("mtp", 2)
    assert torch.equal(generate(b, ids, max_new_tokens=16, do_sample=False, speculative=sp),
                       generate(b, ids, max_new_tokens=16, do_sample=False))
    assert sp.drafted > 0


def test_a_quantized_checkpoint_with_a_float_mtp_layer_still_loads(tmp_path):
    """Quantized checkpoints written before ernie45 quantized the MTP layer hold it in float: it loads in float
    beside the quantized model, and the memory estimate says so."""
    from ernie45.commands.info import memory_estimate
    from ernie45.quant import quantize_model
    from ernie45.quant.linear import Int8Linear

    m = mtp_model("tiny-moe")
    mtp = {k: v for k, v in m.state_dict().items() if k.startswith("model.mtp")}
    for name in ("mtp_emb_norm", "mtp_hidden_norm", "mtp_linear_proj", "mtp_block"):
        delattr(m.model, name)
    quantize_model(m, "wint8", progress=False)  # the model alone, then the float layer: what older versions wrote
    attach_mtp(m)
    m.load_state_dict(mtp, strict=False)
    save_checkpoint(m, tmp_path / "q")
    b = load_checkpoint(tmp_path / "q", dtype="float32", device="cpu")
    assert type(b.model.layers[0].mlp.down_proj) is Int8Linear and type(b.model.mtp_linear_proj[0]) is torch.nn.Linear
    assert all(torch.equal(b.state_dict()[k], v) for k, v in mtp.items())
    held = {t.data_ptr(): t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()]}
    assert memory_estimate(str(tmp_path / "q"), dtype="float32")["weights_bytes"] == sum(held.values())


def test_quantized_mtp_layer_in_c_matches_pytorch():
    """Beside a C decoder, an int4 / int8 MTP layer's Linears run the C GEMV on their own bytes (`GemvLinear` shares
    the wrapped module's tensors: the state dict is unchanged, no second copy); its logits agree with the PyTorch
    layer's within the int8 activation rounding of the int4 rows, and greedy tokens equal plain decoding."""
    from ernie45.fast import optimize_for_inference
    from ernie45.mtp import GemvLinear
    from ernie45.quant import quantize_model

    native_or_skip()
    for mode, tol in (("wint8", 1e-4), ("wint4", 2e-2)):
        m = mtp_model("tiny-moe", use_bias=True, tie_word_embeddings=False)
        quantize_model(m, mode, progress=False, **({"group_size": 32} if mode == "wint4" else {}))
        toks = torch.randint(0, 1000, (1, 3), generator=torch.Generator().manual_seed(7))
        hid = torch.randn(1, 3, m.config.hidden_size, generator=torch.Generator().manual_seed(8))
        head = MTPHead(m)
        want, _ = head(toks, hid, head.new_cache(8))
        keys = {k: v.clone() for k, v in m.state_dict().items()}
        ids = prompt_ids()
        plain = generate(m, ids, max_new_tokens=16, do_sample=False)
        optimize_for_inference(m)
        head = MTPHead(m)
        down = m.model.mtp_block[0].mlp.down_proj
        assert isinstance(down, GemvLinear) and type(down._many[0]).__name__ == {"wint8": "Int8Linear",
                                                                                 "wint4": "Int4Linear"}[mode]
        cache = head.new_cache(8)
        got = torch.cat([head(toks[:, i:i + 1], hid[:, i:i + 1], cache)[0] for i in range(3)], 1)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
        sd = m.state_dict()
        assert sorted(sd) == sorted(keys) and all(torch.equal(sd[k], v) for k, v in keys.items())
        sp = Speculative("mtp", 2)
        assert torch.equal(generate(m, ids, max_new_tokens=16, do_sample=False, speculative=sp), plain), mode


def test_mtp_weights_are_ignored_without_num_nextn_predict_layers(tmp_path):
    m = mtp_model("tiny")
    save_checkpoint(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg.pop("num_nextn_predict_layers")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    back = load_checkpoint(tmp_path / "ck", dtype="float32", device="cpu")
    assert not has_mtp(back)
    ids = prompt_ids()
    assert torch.equal(generate(back, ids, max_new_tokens=8), generate(m, ids, max_new_tokens=8))
    with pytest.raises(ErnieError, match="has no MTP layer"):
        generate(back, ids, max_new_tokens=8, speculative="mtp")


def test_info_shows_the_mtp_layer(tmp_path, capsys):
    m = mtp_model("tiny-moe")
    save_checkpoint(m, tmp_path / "ck")
    n = sum(p.numel() for k, p in m.state_dict().items() if k.startswith("model.mtp"))
    rc, out, _ = run_cli(["info", "--model", str(tmp_path / "ck"), "--json"], capsys)
    info = json.loads(out)
    assert rc == 0 and info["mtp_layers"] == 1 and info["mtp_parameters"] == n
    assert info["mtp_hidden_state"] == "post_norm"
    rc, out, _ = run_cli(["info", "--model", str(tmp_path / "ck")], capsys)
    assert re.search(rf"mtp_parameters\s+{n:,}", out)


def test_paddle_conversion_keeps_the_mtp_layer_and_gguf_export_notes_the_drop(tmp_path, capsys, head_ckpt):
    from ernie45.convert.paddle import convert_checkpoint

    m = mtp_model("tiny-moe", use_bias=True)
    save_checkpoint(m, tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "pd", "hf", "paddle", progress=False)
    convert_checkpoint(tmp_path / "pd", tmp_path / "hf2", "paddle", "hf", progress=False)
    back = load_checkpoint(tmp_path / "hf2", dtype="float32", device="cpu")
    for k, v in m.state_dict().items():
        if k.startswith("model.mtp"):
            assert torch.equal(v, back.state_dict()[k]), k
    pytest.importorskip("gguf")
    from ernie45.convert.gguf_export import export_gguf

    export_gguf(head_ckpt, str(tmp_path / "m.gguf"))  # no biases (llama.cpp has none), a tokenizer to embed
    err = capsys.readouterr().err
    assert re.search(r"note: the MTP head \(\d+ model.mtp_\* tensors\) is not exported", err)


# ---- the head's step ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["post_norm", "pre_norm"])
def test_mtp_head_computes_the_documented_step(variant):
    """MTPHead against the formula of docs (embedding norm, hidden norm, proj, one decoder layer, lm_head; the
    pre_norm variant adds the final norm), and feeding positions one at a time equals feeding them at once."""
    from ernie45.model import rope_cos_sin

    m = mtp_model("tiny", variant=variant, use_bias=True, tie_word_embeddings=False)
    inner = m.model
    head = MTPHead(m)
    n, H = 5, m.config.hidden_size
    toks = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(3))
    hid = torch.randn(1, n, H, generator=torch.Generator().manual_seed(4))
    logits, out = head(toks, hid, head.new_cache(16))
    e = inner.embed_tokens(toks)
    if variant == "post_norm":
        e[:, 0] = 0  # vLLM zeroes position 0's embedding
    x = inner.mtp_linear_proj[0](torch.cat([inner.mtp_emb_norm[0](e), inner.mtp_hidden_norm[0](hid)], -1))
    cos, sin = rope_cos_sin(torch.arange(n)[None], m.config.head_dim, m.config.rope_theta)
    x, _ = inner.mtp_block[0](x, cos, sin, None, None)  # causal attention over the window, no cache
    want = m.lm_head(inner.norm(x) if variant == "pre_norm" else x)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    cache = head.new_cache(16)
    steps = [head(toks[:, i:i + 1], hid[:, i:i + 1], cache)[0] for i in range(n)]
    torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["post_norm", "pre_norm"])
def test_mtp_training_loss_is_the_heads_cross_entropy(variant):
    """The pre-training MTP loss (position j guesses token j + 2) equals the cross entropy of what MTPHead, the
    drafter, computes from the same hidden states (against the data, or with `distill` against the model's own
    distribution at j + 1): training and drafting run the same layer the same way."""
    import torch.nn.functional as F

    from ernie45.generation.speculative import capture_pre_norm
    from ernie45.mtp import mtp_loss

    m = mtp_model("tiny-moe", variant=variant, use_bias=True)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[1, 9:] = -100
    with capture_pre_norm(m) as box:
        out = m(ids)
    hidden = box[0] if variant == "pre_norm" else out.hidden_states
    head = MTPHead(m)
    logits = torch.cat([head(ids[b:b + 1, 1:], hidden[b:b + 1, :-1], head.new_cache(16))[0] for b in range(2)])
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 2:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(mtp_loss(m, ids, labels, "head"), want, rtol=1e-5, atol=1e-5)
    teacher = out.logits[:, 1:].float().softmax(-1)  # the model's guess for token j + 2, at position j + 1
    soft = -(teacher * logits.log_softmax(-1)).sum(-1)  # (B, S-1)
    keep = labels[:, 1:] != -100
    torch.testing.assert_close(mtp_loss(m, ids, labels, "distill"), soft[keep].mean(), rtol=1e-5, atol=1e-5)
    joint = mtp_loss(m, ids, labels, "joint", 0.5)
    torch.testing.assert_close(joint, m(ids, labels=labels).loss + 0.5 * want, rtol=1e-5, atol=1e-5)


def test_pretrain_mtp_head_trains_only_the_layer(tmp_path):
    from ernie45.data.preprocess import PreprocessConfig, preprocess
    from ernie45.train.pretrain import PretrainArgs, pretrain

    with open(tmp_path / "poems.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in _poems(60))
    preprocess([str(tmp_path / "poems.jsonl")], bundled_path("ernie-tiny-moe"), tmp_path / "data",
               PreprocessConfig(seq_len=32), progress=False)
    src = bundled_path("ernie-tiny-moe")
    before = load_checkpoint(src, dtype="float32", device="cpu").state_dict()
    s = pretrain(PretrainArgs(data=[str(tmp_path / "data")], out=str(tmp_path / "run"), init_from=src, steps=6,
                              batch_size=4, lr=3e-3, warmup=1, eval_every=0, save_every=0, mtp="head",
                              progress=False))
    losses = [r["loss"] for r in s["history"]]
    assert losses[-1] < losses[0]
    after = load_checkpoint(tmp_path / "run" / "final", dtype="float32", device="cpu")
    assert has_mtp(after) and after.config.extra["num_nextn_predict_layers"] == 1
    for k, v in after.state_dict().items():
        if not k.startswith("model.mtp"):
            assert torch.equal(v, before[k].float()), k  # the model itself is frozen
    with pytest.raises(ErnieError, match="--mtp must be head, distill or joint"):
        pretrain(PretrainArgs(data=[str(tmp_path / "data")], out=str(tmp_path / "r2"), init_from=src, mtp="both"))


def test_bundled_head_selfgen_data_is_the_models_own_continuations(tmp_path):
    """`scripts/bundled_mtp.py selfgen` (the bundled head's training text): per prompt a greedy and a sampled
    continuation, written as generated (no re-tokenising) into packed shards that `pretrain --mtp distill` reads."""
    import importlib.util

    from ernie45.data.shards import PackedDataset
    from ernie45.train.pretrain import PretrainArgs, pretrain

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bundled_mtp", os.path.join(repo, "scripts", "bundled_mtp.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    poems, other = _poems(3), ["天下大事，必作于细。", "知足者富，强行者有志。"]
    for name, rows in (("poems_train", [{"text": t} for t in poems]), ("other", [{"text": t} for t in other]),
                       ("sft", [{"messages": [{"role": "user", "content": "写一首诗"},
                                              {"role": "assistant", "content": poems[0]}]}])):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    src = bundled_path("ernie-tiny-moe")
    script.selfgen(src, str(tmp_path), new_tokens=6, n_other=5)
    data = PackedDataset(tmp_path / "data-selfgen")
    assert data.num_documents == 2 * 6  # 3 poems, 2 other texts, 1 chat prompt; greedy and sampled each
    model, tok = ernie45.load(src, dtype="float32", device="cpu")
    prompt = tok.encode(script.opening(poems[0]))
    greedy = generate(model, [prompt], max_new_tokens=6, eos_token_id=[], do_sample=False, repetition_penalty=1.0)
    stream = data.tokens().tolist()
    assert stream[: len(prompt) + 7] == list(greedy[0]) + [tok.eos_token_id]
    prompts = [tok.encode(script.opening(t)) for t in poems] + [tok.encode(script.opening(t, 8)) for t in other] + [
        tok.apply_chat_template([{"role": "user", "content": "写一首诗"}], tokenize=True)]
    assert data.num_tokens == 2 * sum(len(p) + 6 + 1 for p in prompts)  # prompt, 6 new tokens, EOS: twice each
    s = pretrain(PretrainArgs(data=[str(tmp_path / "data-selfgen")], out=str(tmp_path / "run"), init_from=src,
                              steps=2, batch_size=2, lr=1e-3, warmup=1, eval_every=0, save_every=0, mtp="distill",
                              progress=False))
    assert len(s["history"]) == 2


# ---- greedy: the tokens of plain decoding -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("variant,bias,tied", [("post_norm", False, True), ("pre_norm", True, False)])
@pytest.mark.parametrize("method,k", [("mtp", 1), ("mtp", 3), ("ngram", 1), ("ngram", 4)])
def test_greedy_tokens_equal_plain_decoding(kind, variant, bias, tied, method, k):
    m = mtp_model(kind, variant=variant, use_bias=bias, tie_word_embeddings=tied)
    ids = prompt_ids()
    want = generate(m, ids, max_new_tokens=40, eos_token_id=[])
    sp = Speculative(method, k)
    got = generate(m, ids, max_new_tokens=40, eos_token_id=[], speculative=sp)
    assert torch.equal(got, want)
    assert sp.steps > 0 and sp.drafted >= sp.steps and 0 <= sp.accepted <= sp.drafted
    if method == "ngram":
        assert sp.accepted > 0  # the prompt repeats: lookup drafts are right at first


def test_greedy_with_right_drafts_accepts_them_and_with_wrong_ones_rolls_back(monkeypatch):
    """MTP drafts replaced by an oracle that knows the plain continuation but errs at every 3rd position: the
    tokens stay those of plain decoding, right drafts are accepted, wrong ones rejected (cache and MTP state
    rolled back) — the accept and reject paths that a random head seldom takes."""
    m = mtp_model("tiny-moe", variant="pre_norm")
    ids = prompt_ids()
    want = generate(m, ids, max_new_tokens=30, eos_token_id=[])[0].tolist()
    real = spec_mod._MTPDrafter.draft

    def oracle(self, k, pick):
        real(self, k, pick)  # the head still runs (its cache must come back as it was)
        at = self.cache.length + 1  # the position the first draft guesses
        return [want[p] if p % 3 else (want[p] + 1) % 1000 for p in range(at, at + k)], [None] * k

    monkeypatch.setattr(spec_mod._MTPDrafter, "draft", oracle)
    for k in (1, 2, 4):
        sp = Speculative("mtp", k)
        got = generate(m, ids, max_new_tokens=30, eos_token_id=[], speculative=sp)
        assert got[0].tolist() == want, k
        assert 0 < sp.accepted < sp.drafted
        assert sp.steps < 29  # accepted drafts saved passes


def test_c_step_verification_gives_plain_tokens():
    """With the C step attached, verification is one batched step over the cache (rows of one sequence), bit for
    bit plain decoding; for mtp the step also returns the rows' last hidden states (`hidden_out`), which feed the
    head."""
    from ernie45.fast import FastDecoder, optimize_for_inference

    native_or_skip()
    calls = []
    orig = FastDecoder.step_batch

    def counting(self, tokens, *a, **kw):
        calls.append(len(tokens))
        return orig(self, tokens, *a, **kw)

    for kind in ("tiny", "tiny-moe"):
        m = mtp_model(kind)
        optimize_for_inference(m)
        assert m.fast_decoder is not None
        ids = prompt_ids()
        want = generate(m, ids, max_new_tokens=40, eos_token_id=[])
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(FastDecoder, "step_batch", counting)
            for method, k in (("ngram", 1), ("ngram", 3), ("mtp", 2)):
                sp = Speculative(method, k)
                assert torch.equal(generate(m, ids, max_new_tokens=40, eos_token_id=[], speculative=sp), want)
        assert calls and max(calls) > 1  # the drafts were scored as rows of one step


@pytest.mark.parametrize("mode", [None, "wint8", "wint4"])
def test_c_step_speculation_gives_plain_logits_bit_for_bit(mode):
    """With the C step attached, every logits row a speculative run emits is bit for bit plain decoding's: the
    prompt is prefilled as plain decoding prefills it (rows of one C step; PyTorch's int4 forward does not round
    activations to int8 as the C rows do, and a cache filled so made a random wint4 MoE part at a near-tie),
    and verification rows equal single steps."""
    from ernie45.fast import optimize_for_inference
    from ernie45.generation import generate_step
    from ernie45.quant import quantize_model

    native_or_skip()
    m = mtp_model("tiny-moe")
    if mode:
        quantize_model(m, mode, progress=False, **({"group_size": 32} if mode == "wint4" else {}))
    optimize_for_inference(m)
    ids = prompt_ids()

    def logits(**kw):
        return [s.logits for s in generate_step(m, ids, None, max_new_tokens=24, eos_token_id=[], do_sample=False,
                                                output_logits=True, **kw)]

    want = logits()
    for method, k in (("ngram", 2), ("mtp", 1), ("mtp", 2)):
        got = logits(speculative=Speculative(method, k))
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), (method, k)


def test_c_step_hidden_states_are_the_forwards():
    """`step_batch(hidden_out=)`: each row's final-norm output (or, `pre_norm`, its input) as the PyTorch forward
    computes it, within the C step's fp32 summation-order differences; the logits are those of the plain call."""
    from ernie45.fast import optimize_for_inference

    native_or_skip()
    m = mtp_model("tiny-moe")
    ids = prompt_ids()
    n = ids.shape[1]
    with torch.inference_mode(), spec_mod.capture_pre_norm(m) as box:
        out = m(ids)
        pre = box[0][0]
        post = m.model.norm(pre)
    optimize_for_inference(m)
    fast = m.fast_decoder
    for pre_norm in (False, True):
        cache = m.new_cache(1, n)
        hidden = torch.empty(n, m.config.hidden_size)
        tables = torch.zeros((n, 1), dtype=torch.int32)
        logits = fast.step_batch(ids[0].tolist(), list(range(n)), tables, cache.k, cache.v, hidden_out=hidden,
                                 pre_norm=pre_norm)
        plain = fast.step_batch(ids[0].tolist(), list(range(n)), tables, m.new_cache(1, n).k, m.new_cache(1, n).v)
        assert torch.equal(logits, plain)
        torch.testing.assert_close(logits, out.logits[0].float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden, (pre if pre_norm else post).float(), rtol=1e-4, atol=1e-4)
    # an int8 KV cache (`serve --kv-cache-dtype int8 --speculative mtp`): the same logits as without hidden_out, and
    # hidden states that are those logits' (the head of the post-norm one, the norm of the pre-norm one)
    d, kv = m.config.head_dim, m.kv_heads
    got = {}
    for pre_norm in (None, False, True):
        pools = [[torch.zeros(1, kv, n, d, dtype=torch.int8) for _ in range(m.config.num_hidden_layers)]
                 for _ in range(2)]
        scales = [[torch.zeros(1, kv, n) for _ in range(m.config.num_hidden_layers)] for _ in range(2)]
        kw = {} if pre_norm is None else {"hidden_out": torch.empty(n, m.config.hidden_size), "pre_norm": pre_norm}
        got[pre_norm] = (fast.step_batch(ids[0].tolist(), list(range(n)), torch.zeros((n, 1), dtype=torch.int32),
                                         *pools, *scales, **kw), kw.get("hidden_out"))
    assert torch.equal(got[False][0], got[None][0]) and torch.equal(got[True][0], got[None][0])
    with torch.inference_mode():
        torch.testing.assert_close(m.lm_head(got[False][1]).float(), got[None][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.model.norm(got[True][1]), got[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bundled_moe_in_c_speculates_plain_tokens(head_ckpt, dtype):
    """The bundled ernie-tiny-moe with its trained head, as `ernie45 generate` runs it (the C step attached), in
    fp32 and in the shipped bf16: greedy tokens with `mtp` (k = 1, 2) and `ngram` equal plain decoding's."""
    from ernie45.fast import optimize_for_inference

    native_or_skip()
    m, tok = ernie45.load(head_ckpt, dtype=dtype, device="cpu")
    optimize_for_inference(m)
    assert m.fast_decoder is not None
    ids = torch.tensor([tok.encode("床前明月光，疑是地上霜。")])
    want = generate(m, ids, max_new_tokens=48, do_sample=False, eos_token_id=[])
    for method, k in (("mtp", 1), ("mtp", 2), ("ngram", 3)):
        sp = Speculative(method, k)
        got = generate(m, ids, max_new_tokens=48, do_sample=False, eos_token_id=[], speculative=sp)
        assert torch.equal(got, want), (method, k)
        assert sp.drafted > 0


@pytest.mark.parametrize("isa", native.levels())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["post_norm", "pre_norm"])
def test_mtp_layer_as_one_c_call_matches_pytorch(variant, dtype, isa):
    """Beside a C decoder a window of a few rows runs as one C call (`MTPStep`: the input norms, proj, the decoder
    layer and the head in C, over the layer's own cache): its logits and outputs agree with the PyTorch layer's up to
    summation order (fp32) or bf16 rounding, from position 0 (the post-norm variant's zeroed embedding) and after an
    `offset`, fed all at once or one row at a time; `last_only` is the last row; a draft vocabulary scores its ids
    (through an int8 copy of those head rows) and leaves -inf elsewhere; a longer window takes the PyTorch path; the
    state dict is untouched. With the kernels of every ISA level the machine runs."""
    from ernie45.fast import FastDecoder, MTPStep
    from ernie45.mtp import GemvLinear

    lib = native.load("decode", isa)
    if lib is None or (isa == "native" and lib.ernie_simd_width() < 256):
        pytest.skip(f"no C compiler, or no {isa} build: the C decode step is not built here")
    m = mtp_model("tiny-moe", variant, use_bias=True, tie_word_embeddings=False)
    if dtype == "bfloat16":
        m = m.to(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    toks = torch.randint(0, 1000, (1, 5), generator=g)
    hid = torch.randn(1, 5, m.config.hidden_size, generator=g).to(m.dtype)
    ids = torch.arange(0, m.config.vocab_size, 3)
    want = {}
    for offset in (0, 9):
        for v, head in ((None, MTPHead(m)), ("ids", MTPHead(m, ids))):
            want[offset, v] = head(toks, hid, head.new_cache(8), offset=offset)
    keys = {k: v.clone() for k, v in m.state_dict().items()}
    assert FastDecoder.attach(m, isa=isa) is not None
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0.05, atol=0.05)
    for offset in (0, 9):
        for v, head in ((None, MTPHead(m)), ("ids", MTPHead(m, ids))):
            assert isinstance(head._c, MTPStep)
            wl, wx = want[offset, v]
            cache = head.new_cache(8)
            gl, gx = head(toks, hid, cache, offset=offset)
            assert cache.length == 5 and gx.dtype == m.dtype
            fin = wl.isfinite()  # the draft vocabulary's head is an int8 copy of the float rows (`draft_rows`)
            torch.testing.assert_close(gl[fin], wl[fin], **(tol if v is None else dict(
                rtol=tol["rtol"], atol=tol["atol"] + 0.01 * float(wl[fin].abs().max()))))
            torch.testing.assert_close(gx.float(), wx.float(), **tol)
            assert torch.equal(gl.isinf(), wl.isinf()) and int(gl.isinf().sum()) == (0 if v is None else 5 * (
                m.config.vocab_size - len(ids)))
            cache = head.new_cache(8)
            rows = [head(toks[:, i:i + 1], hid[:, i:i + 1], cache, offset=offset) for i in range(5)]
            torch.testing.assert_close(torch.cat([r[0] for r in rows], 1), gl, rtol=1e-5, atol=1e-5)
            last, x = head(toks, hid, head.new_cache(8), offset=offset, last_only=True)
            assert last.shape == (1, 1, m.config.vocab_size) and torch.equal(last[0, 0], gl[0, -1])
            assert torch.equal(x, gx)
    long = MTPStep.ROWS + 1  # the PyTorch path (GemvLinear for a few rows, the wrapped modules beyond)
    assert isinstance(m.model.mtp_block[0].mlp.down_proj, GemvLinear)
    toks = torch.randint(0, 1000, (1, long), generator=g)
    hid = torch.randn(1, long, m.config.hidden_size, generator=g).to(m.dtype)
    head = MTPHead(m)
    a, _ = head(toks, hid, head.new_cache(long))
    cache = head.new_cache(long)
    head(toks[:, :-1], hid[:, :-1], cache)
    b, _ = head(toks[:, -1:], hid[:, -1:], cache)
    torch.testing.assert_close(b[0, 0], a[0, -1], **tol)
    sd = m.state_dict()
    assert sorted(sd) == sorted(keys) and all(torch.equal(sd[k], v) for k, v in keys.items())


def test_draft_ids_keep_every_special_token_and_the_best_scored_pieces():
    """`draft_ids(tok, N)`: N sorted ids, every control / unknown / byte / added token among them (a draft must be
    able to end a turn or open a tool call), the rest the highest-scored pieces (BPE merge order); one-line errors
    for sizes that leave no room."""
    from ernie45.mtp import draft_ids

    _, tok = ernie45.load("ernie-tiny-moe", dtype="float32", device="cpu")
    sp, V = tok.sp, tok.vocab_size
    special = {i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i)}
    special |= set(tok.special_ids) | set(tok.added_tokens.values())
    ids = draft_ids(tok, 1000, V)
    assert len(ids) == 1000 and torch.equal(ids, ids.sort().values) and special <= set(ids.tolist())
    kept = [i for i in ids.tolist() if i not in special]
    dropped = [i for i in range(sp.GetPieceSize()) if i not in set(ids.tolist())]
    assert min(sp.GetScore(i) for i in kept) >= max(sp.GetScore(i) for i in dropped)
    assert draft_ids(tok, 10**6, V).tolist() == list(range(sp.GetPieceSize()))  # larger than the vocabulary: all
    for size, match in ((len(special), "leaves no room"), (0, "positive integer"), (True, "positive integer")):
        with pytest.raises(ErnieError, match=match):
            draft_ids(tok, size, V)


@pytest.mark.parametrize("native_step", [False, True])
@pytest.mark.parametrize("mode", [None, "wint8", "wint4"])
def test_a_draft_vocabulary_scores_only_its_tokens_and_keeps_the_output(head_ckpt, native_step, mode, monkeypatch):
    """With `draft_vocab_size` the MTP layer's logits at the draft ids equal the full head's -- bit for bit where the
    head is quantized (the C GEMV over a gathered copy of those rows in the head's own format computes each row as
    the whole head does), within per-row int8 rounding where it is float (the copy is int8: half a bf16 head's
    bytes) -- every other token gets -inf, and greedy tokens equal plain decoding."""
    from ernie45.fast import optimize_for_inference
    from ernie45.mtp import draft_ids
    from ernie45.quant import quantize_model

    m, tok = ernie45.load(head_ckpt, dtype="float32", device="cpu")
    if mode:
        quantize_model(m, mode, progress=False, quantize_lm_head=True)
    if native_step:
        native_or_skip()
        optimize_for_inference(m)
    ids = draft_ids(tok, 600, m.config.vocab_size)
    toks = torch.tensor([tok.encode("床前明月光，疑")])
    hid = torch.randn(1, toks.shape[1], m.config.hidden_size, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr("ernie45.quant.linear.QUANT_CHUNK", 4096)  # the int8 copy quantized on worker threads
    full = MTPHead(m)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():  # as `generate` builds it
            small = MTPHead(m, ids)
    finally:
        torch.set_num_threads(threads)
    want, _ = full(toks, hid, full.new_cache(16))
    got, _ = small(toks, hid, small.new_cache(16))
    if native_step and mode is None:
        from ernie45.native_abi import W_I8

        assert small._c._m.head.kind == W_I8 and small._c._m.head.out == len(ids)
        err = (got[..., ids] - want[..., ids]).abs().max() / want[..., ids].abs().max()
        assert 0 < err < 0.01, err
        assert torch.equal(got[..., ids].argmax(-1), want[..., ids].argmax(-1))
    else:
        assert torch.equal(got[..., ids], want[..., ids])
    rest = torch.ones(m.config.vocab_size, dtype=torch.bool)
    rest[ids] = False
    assert bool((got[..., rest] == float("-inf")).all())
    prompt = [tok.encode("海上生明月，")]
    plain = generate(m, prompt, max_new_tokens=24, do_sample=False)
    spec = Speculative("mtp", 2, draft_vocab_size=600)
    assert generate(m, prompt, max_new_tokens=24, do_sample=False, speculative=spec, tokenizer=tok).tolist() \
        == plain.tolist()
    assert spec.drafted > 0
    with pytest.raises(ErnieError, match="needs the model's tokenizer"):
        generate(m, prompt, max_new_tokens=4, speculative=Speculative("mtp", 1, draft_vocab_size=599))


@pytest.mark.parametrize("native_step", [False, True])
def test_bundled_models_greedy_tokens_equal_plain_decoding(head_ckpt, native_step):
    from ernie45.fast import optimize_for_inference

    if native_step:
        native_or_skip()
    text = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。白日依山尽，"
    for path, methods in ((bundled_path("ernie-tiny"), ("ngram",)), (head_ckpt, ("mtp", "ngram"))):
        m, tok = ernie45.load(path, dtype="float32", device="cpu")
        if native_step:
            optimize_for_inference(m)
        ids = torch.tensor([tok.encode(text)])
        want = generate(m, ids, max_new_tokens=48, do_sample=False, eos_token_id=[])
        for method in methods:
            for k in (1, 3):
                sp = Speculative(method, k)
                got = generate(m, ids, max_new_tokens=48, do_sample=False, eos_token_id=[], speculative=sp)
                assert torch.equal(got, want), (path, method, k)


def test_streaming_and_prompt_cache_turns_equal_plain(head_ckpt):
    """stream_generate with a PromptCache (a chat's turns): the same text as without speculation, turn after turn;
    the second turn reuses the cached prefix (MTP entries included)."""
    m, tok = ernie45.load(head_ckpt, dtype="float32", device="cpu")
    turns = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。床前明月光，"]
    for method in ("mtp", "ngram"):
        caches = {None: PromptCache(), method: PromptCache()}
        history: list[int] = []
        for turn in turns:
            history += tok.encode(turn)
            texts = {}
            for key, cache in caches.items():
                chunks = list(stream_generate(m, tok, history, max_new_tokens=24, do_sample=False, eos_token_id=[],
                                              prompt_cache=cache, speculative=key))
                texts[key] = ("".join(c.text for c in chunks), [c.token for c in chunks])
            assert texts[None] == texts[method], (method, turn)
            assert caches[method].reused > 0 or turn is turns[0]
            history += texts[None][1]


# ---- sampling: the rejection rule keeps the target distribution ---------------------------------------------------
def test_ngram_lookup_follows_vllms_rule():
    t = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 2, 3]
    assert ngram_drafts(t, 3, 2, 5) == [5, 7, 2]  # longest suffix [2, 3] (n=2); rightmost earlier occurrence
    assert ngram_drafts(t, 1, 2, 5) == [5]
    assert ngram_drafts([*t, 5], 3, 2, 5) == [7, 2, 3]  # [2, 3, 5] (n=3) wins over shorter matches
    assert ngram_drafts(t, 3, 3, 5) == []  # no 3-gram repeats
    assert ngram_drafts([1, 2, 1, 2], 4, 1, 3) == [1, 2]  # drafts stop at the end of the sequence
    assert ngram_drafts([5], 3, 1, 3) == []


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def test_rejection_rule_output_follows_the_target():
    """accept_drafts with a draft distribution q far from p, and with one-hot drafts: the first token is
    distributed as p_0 (total variation within sampling noise of 40,000 draws, fixed seed), and a kept draft is
    followed by a draw from p_1."""
    g = torch.Generator().manual_seed(0)
    V, N = 6, 40_000
    p0 = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    p1 = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    for one_hot in (False, True):
        first, second = torch.zeros(V), torch.zeros(V)
        rng = torch.Generator().manual_seed(1)
        for _ in range(N):
            d = int(torch.multinomial(q, 1, generator=rng))
            a, last = accept_drafts([d], [p0, p1], None if one_hot else [q], rng)
            if a == 1:
                first[d] += 1
                second[last] += 1
            else:
                first[last] += 1
        assert _tv(first, p0) < 0.01, one_hot
        assert _tv(second, p1) < 0.02, one_hot


def _exact_joint(m, ids, temperature):
    """Exact distribution (V, V, V) of the first three sampled tokens under the target at this temperature."""
    V = m.config.vocab_size
    with torch.no_grad():
        p0 = torch.softmax(m(ids).logits[0, -1].float() / temperature, -1)
        one = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], 1)  # (V, S + 1)
        p1 = torch.softmax(m(one).logits[:, -1].float() / temperature, -1)  # (V, V)
        two = torch.cat([one.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)  # (V * V, S + 2)
        p2 = torch.softmax(m(two).logits[:, -1].float() / temperature, -1).view(V, V, V)
    return p0[:, None, None] * p1[:, :, None] * p2


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    assert counts[expected == 0].sum() == 0
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_sampled_tokens_keep_the_target_distribution(method):
    """End to end on an 8-token vocabulary, two drafts per pass (so the first pass decides tokens 2 and 3): the
    first three tokens of 3,000 sampled generate calls (seeds 0..2999) against the exact target distribution, as
    the pairs (t1, t2) and (t2, t3) (64 outcomes each): chi-square below the 0.999 quantile of 63 degrees of
    freedom (103.4). A wrong rule (e.g. keeping every draft) fails by far."""
    m = mtp_model("tiny-moe", vocab_size=8, num_hidden_layers=2)
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    joint = _exact_joint(m, ids, 0.9)
    counts = torch.zeros(8, 8, 8)
    sp = Speculative(method, 2, prompt_lookup_min=1, prompt_lookup_max=2)
    for seed in range(3000):
        out = generate(m, ids, max_new_tokens=4, do_sample=True, temperature=0.9, top_k=0, eos_token_id=[],
                       seed=seed, speculative=sp)
        a, b, c = out[0, ids.shape[1]:ids.shape[1] + 3].tolist()
        counts[a, b, c] += 1
    assert sp.accepted > 0.2 * sp.steps  # drafts were kept often enough for the rule to matter
    assert _chi2(counts.sum(2).flatten(), joint.sum(2).flatten()) < 103.4
    assert _chi2(counts.sum(0).flatten(), joint.sum(0).flatten()) < 103.4


# ---- argument checks -----------------------------------------------------------------------------------------------
def test_bad_arguments_are_one_line_errors():
    m = mtp_model("tiny")
    ids = prompt_ids()
    cases = [
        (dict(speculative="eagle"), "speculative method must be one of mtp, ngram"),
        (dict(speculative="ngram", num_speculative_tokens=0), r"num_speculative_tokens must be an integer in \[1, 16\]"),
        (dict(speculative="mtp", num_speculative_tokens=17), "num_speculative_tokens must be"),
        (dict(num_speculative_tokens=2), "needs speculative="),
        (dict(speculative="ngram", num_beams=2), "not beam search"),
        (dict(speculative="ngram", num_return_sequences=2, do_sample=True), "one sequence"),
    ]
    for kw, match in cases:
        with pytest.raises(ErnieError, match=match):
            generate(m, ids, max_new_tokens=4, **kw)
    with pytest.raises(ErnieError, match="one sequence"):
        generate(m, ids.expand(2, -1), max_new_tokens=4, speculative="ngram")
    from ernie45.generation import generate_step
    from ernie45.generation.structured import Grammar

    with pytest.raises(ErnieError, match="does not combine with grammar"):
        generate_step(m, ids, max_new_tokens=4, speculative="ngram", grammar=Grammar.__new__(Grammar))
    with pytest.raises(ErnieError, match="prompt_lookup_min"):
        Speculative("ngram", 2, prompt_lookup_min=3, prompt_lookup_max=2)
    for kw in (dict(method="ngram", draft_vocab_size=100), dict(method="mtp", draft_vocab_size=0)):
        with pytest.raises(ErnieError, match="draft_vocab_size applies to mtp drafts"):
            Speculative(**kw)


# ---- CLI -------------------------------------------------------------------------------------------------------------
def test_cli_generate_json_reports_counts_and_keeps_tokens(head_ckpt, capsys):
    base = ["generate", "--model", head_ckpt, "--dtype", "float32", "--prompt", "床前明月光，疑是地上霜。床前明月光，",
            "--temperature", "0", "--max-new-tokens", "24", "--json"]
    rc, out, _ = run_cli(base, capsys)
    plain = json.loads(out)
    assert rc == 0 and "speculative" not in plain
    for method in ("mtp", "ngram"):
        rc, out, _ = run_cli([*base, "--speculative", method, "--num-speculative-tokens", "2"], capsys)
        got = json.loads(out)
        assert rc == 0 and got["token_ids"] == plain["token_ids"] and got["text"] == plain["text"]
        s = got["speculative"]
        assert s["method"] == method and 0 <= s["accepted"] <= s["drafted"]
        assert s["drafted"] > 0 or method == "ngram"  # lookup drafts only where the output repeats


def test_cli_errors_are_one_line(head_ckpt, capsys):
    cases = [
        (["--speculative", "mtp"], "has no MTP layer", bundled_path("ernie-tiny")),
        (["--speculative", "ngram", "--num-speculative-tokens", "99"], r"must be an integer in \[1, 16\]", None),
        (["--speculative", "medusa"], "--speculative must be one of mtp, ngram", None),
        (["--num-speculative-tokens", "2"], "needs --speculative", None),
        (["--speculative", "ngram", "--num-beams", "2"], "not beam search", None),
        (["--speculative", "ngram", "--draft-vocab-size", "100"], "--draft-vocab-size applies to --speculative mtp",
         None),
        (["--draft-vocab-size", "100"], "--draft-vocab-size needs --speculative mtp", None),
        (["--speculative", "mtp", "--draft-vocab-size", "3"], "leaves no room", None),
    ]
    for extra, match, model in cases:
        rc, out, err = run_cli(["generate", "--model", model or head_ckpt, "--prompt", "你好", *extra], capsys)
        assert rc != 0 and re.search(match, err), (extra, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    rc, _, err = run_cli(["serve", "--model", bundled_path("ernie-tiny"), "--speculative", "mtp"], capsys)
    assert rc != 0 and "has no MTP layer" in err and len(err.strip().splitlines()) == 1


def test_help_mentions_the_flags(capsys):
    for command in ("generate", "chat", "serve"):
        with pytest.raises(SystemExit):
            cli([command, "--help"])
        out = capsys.readouterr().out
        assert "--speculative METHOD" in out and "--num-speculative-tokens K" in out, command
        assert "--draft-vocab-size N" in out, command


def test_chat_with_speculation_answers_as_without(head_ckpt):
    import io

    from ernie45.commands.chat import chat

    m, tok = ernie45.load(head_ckpt, dtype="float32", device="cpu")
    outs = []
    for spec in (None, Speculative("mtp", 2), Speculative("ngram", 3)):
        out = io.StringIO()
        chat(m, tok, stdin=io.StringIO("床前明月光\n疑是地上霜\n"), out=out, err=io.StringIO(), do_sample=False, max_new_tokens=20, **({} if spec is None else {"speculative": spec}))
        outs.append(out.getvalue())
    assert outs[0] == outs[1] == outs[2] and outs[0].strip()


# ---- server ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native_step", [False, True])
def test_server_greedy_answers_equal_and_metrics_count(native_step):
    from test_serve import client, metric, running

    from ernie45.fast import optimize_for_inference
    from ernie45.serve.request import EngineArgs
    from ernie45.serve.server import ModelSource, ServerConfig, create_app

    if native_step:
        native_or_skip()
    prompts = ["白日依山尽，黄河入海流。白日依山尽，", "床前明月光，疑是地上霜。床前明月光，疑是"]
    answers = {}
    for method in (None, "ngram"):
        model, tok = ernie45.load(bundled_path("ernie-tiny"), dtype="float32", device="cpu")
        if native_step:
            optimize_for_inference(model)
        engine = EngineArgs(max_num_seqs=4, max_model_len=512, speculative=method, num_speculative_tokens=3)
        app = create_app(ModelSource(model=model, tokenizer=tok), ServerConfig("m", None, engine))
        with running(app) as base:
            c = client(base)
            got = []
            for p in prompts:
                r = c.completions.create(model="m", prompt=p, max_tokens=32, temperature=0)
                got.append(r.choices[0].text)
                r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], max_tokens=32,
                                              temperature=0, extra_body={"ignore_eos": True})
                got.append(r.choices[0].message.content)
            answers[method] = got
            drafts = metric(base, "ernie45_spec_decode_num_drafts_total")
            tokens = metric(base, "ernie45_spec_decode_num_draft_tokens_total")
            accepted = metric(base, "ernie45_spec_decode_num_accepted_tokens_total")
            first = metric(base, "ernie45_spec_decode_num_accepted_tokens_per_pos_total", '{position="0"}')
        if method is None:
            assert drafts == tokens == accepted == 0
        else:
            assert drafts > 0 and tokens >= drafts and 0 < accepted <= tokens and 0 < first <= drafts
    assert answers[None] == answers["ngram"]


@pytest.mark.parametrize("native_step", [False, True])
def test_server_mtp_answers_equal_plain_ones(head_ckpt, native_step):
    """`serve --speculative mtp` on the bundled MoE model with its MTP head: the same greedy answers as without, for
    requests one at a time (the layer fed the prompt's hidden states), a repeated prompt (its prefix cached: the
    layer restarts after the cached positions), and requests side by side (batched steps keep every row's hidden
    state; a sequence speculates again once it decodes alone). Drafts are counted in /metrics."""
    import asyncio

    from test_serve import client, metric, running

    from ernie45.fast import optimize_for_inference
    from ernie45.serve.request import EngineArgs
    from ernie45.serve.server import ModelSource, ServerConfig, create_app

    if native_step:
        native_or_skip()
    prompts = ["白日依山尽，黄河入海流。", "床前明月光，疑是地上霜。", "白日依山尽，黄河入海流。"]
    answers = {}
    for method in (None, "mtp"):
        model, tok = ernie45.load(head_ckpt, dtype="float32", device="cpu")
        if native_step:
            optimize_for_inference(model)
        engine = EngineArgs(max_num_seqs=4, max_model_len=256, block_size=4, speculative=method,
                            num_speculative_tokens=2 if method else None)
        app = create_app(ModelSource(model=model, tokenizer=tok), ServerConfig("m", None, engine))
        with running(app) as base:
            c = client(base)
            got = [c.completions.create(model="m", prompt=p, max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for p in prompts]

            async def side_by_side():
                from openai import AsyncOpenAI

                ac = AsyncOpenAI(base_url=f"{base}/v1", api_key="none")
                rs = await asyncio.gather(*(ac.completions.create(model="m", prompt=p, temperature=0,
                                                                  max_tokens=m, extra_body={"ignore_eos": True})
                                            for p, m in zip(prompts[:2], (12, 40))))
                await ac.close()
                return [r.choices[0].text for r in rs]

            got += asyncio.run(side_by_side())
            answers[method] = got
            drafts = metric(base, "ernie45_spec_decode_num_drafts_total")
            accepted = metric(base, "ernie45_spec_decode_num_accepted_tokens_total")
        if method:
            assert drafts > 0 and accepted > 0
    assert answers[None] == answers["mtp"]


def test_server_drafter_feeds_the_layer_as_one_cache_would():
    """`SeqDrafter` (the server's per-sequence MTP state) computes what the layer computes over one preallocated
    cache fed the same chunks, bit for bit, while its own cache grows by doubling and is copied over; after a gap it
    restarts at the absolute position (`offset`); drafting leaves its cache as it was."""
    from ernie45.serve.drafter import SeqDrafter

    m = mtp_model("tiny-moe")
    head = MTPHead(m)
    H, n1, n2 = m.config.hidden_size, 300, 220
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 1000, (n1 + n2 + 1,), generator=g).tolist()
    hidden = torch.randn(n1 + n2, H, generator=g)
    ref = head.new_cache(1024)
    head(torch.tensor([tokens[1:n1 + 1]]), hidden[None, :n1], ref)
    want, _ = head(torch.tensor([tokens[n1 + 1:n1 + n2 + 1]]), hidden[None, n1:], ref, last_only=True)
    d = SeqDrafter(head, capacity=2000)
    d.add(0, hidden[:n1])
    assert d.settle(tokens[:n1 + 1]) and d.cache.max_len == n1  # the first chunk fits: no more allocated
    d.add(n1, hidden[n1:])
    assert d.settle(tokens) and d.cache.max_len == 2 * n1 and d.cache.length == n1 + n2
    assert torch.equal(d.logits, want[0, -1])
    assert len(d.draft(3)) == 3 and d.cache.length == n1 + n2
    d.add(700, hidden[:5])  # positions 520..699 have no hidden states: the layer starts again at 700
    fresh = head.new_cache(16)
    want, _ = head(torch.tensor([tokens[1:5]]), hidden[None, :4], fresh, offset=700, last_only=True)
    assert d.settle([0] * 700 + tokens[:5])  # 700..703 fed; 704 waits for its next token
    assert d.start == 700 and d.cache.length == 4 and d.n_pending == 1 and torch.equal(d.logits, want[0, -1])


def test_serve_flags_under_tensor_parallelism():
    """`serve --tp N --speculative mtp` is accepted (the MTP layer runs on every rank); `--draft-vocab-size` is a
    one-line error there (the sharded head reads all its rows anyway), checked before the model loads."""
    from ernie45.checkpoint import load_config
    from ernie45.serve.server import _check_speculative

    path = bundled_path("ernie-tiny-moe")
    cfg = load_config(path)
    _check_speculative("mtp", 2, None, True, path, cfg)
    _check_speculative("mtp", 2, 1024, False, path, cfg)
    with pytest.raises(ErnieError, match="--draft-vocab-size does not apply under --tp"):
        _check_speculative("mtp", 2, 1024, True, path, cfg)


def test_replicated_mtp_runs_the_layer_through_runner_ops():
    """`ReplicatedMTP` (a tensor-parallel server's head): the drafter's calls become `ModelRunner` ops on the
    runner's own caches -- here one process, which runs every op itself -- and give the plain head's logits, drafts
    and cache lengths; closing the drafter frees the runner's copy."""
    from ernie45.serve.drafter import ReplicatedMTP, SeqDrafter
    from ernie45.serve.runner import ModelRunner

    m = mtp_model("tiny-moe")
    head = MTPHead(m)
    runner = ModelRunner(m, num_blocks=4, block_size=16)
    runner.mtp_head = head
    H, n1, n2 = m.config.hidden_size, 300, 40
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 1000, (n1 + n2 + 1,), generator=g).tolist()
    hidden = torch.randn(n1 + n2, H, generator=g)
    plain, shared = SeqDrafter(head, capacity=2000), SeqDrafter(ReplicatedMTP(head, runner), capacity=2000)
    for d in (plain, shared):
        d.add(0, hidden[:n1])
        assert d.settle(tokens[:n1 + 1])
        d.add(n1, hidden[n1:])
        assert d.settle(tokens)  # the second feed outgrows the first cache: resized, rows kept
    assert torch.equal(shared.logits, plain.logits) and torch.equal(shared.out, plain.out)
    assert shared.draft(3) == plain.draft(3) and shared.cache.length == plain.cache.length == n1 + n2
    assert shared.cache.max_len == plain.cache.max_len == 2 * n1
    (key,) = runner._mtp_caches
    assert runner._mtp_caches[key].max_len == 2 * n1
    shared.close()
    assert runner._mtp_caches == {} and shared.cache is None


@pytest.mark.parametrize("native_step", [False, True])
def test_engine_mtp_through_preemption_keeps_every_answer(head_ckpt, native_step):
    """A KV pool too small for four sequences at once: they are preempted and recomputed (their MTP state dropped
    and rebuilt from the recomputed positions), the last one speculates alone, and every answer is the one the
    same engine gives without speculation."""
    from ernie45.serve.kv import kv_bytes_per_token

    texts = ("床前明月光，疑是地上霜。", "白日依山尽，", "春眠不觉晓，处处闻啼鸟。", "海上生明月，")
    counts = _engine_answers_equal(head_ckpt, native_step, texts, [40, 50, 60, 90], max_model_len=160,
                                   kv_cache_memory=lambda model: kv_bytes_per_token(model) * 4 * 40)
    assert counts["num_preemptions"] > 0 and counts["spec_decode_num_drafts"] > 0
    assert counts["spec_decode_num_accepted_tokens"] > 0


def _engine_answers_equal(ckpt, native_step: bool, texts, lengths, **engine_kw) -> dict[str, float]:
    """Run `texts` (greedy, `lengths` tokens each, all submitted at once) through an engine on `ckpt` (its C step
    with `native_step`) without and with `--speculative mtp` (k = 2); assert the answers are equal; -> the mtp
    engine's counters (ernie45_*_total). An `engine_kw` value may be a function of the model."""
    from test_serve_paged import run, started

    from ernie45.fast import optimize_for_inference
    from ernie45.serve.engine import EngineArgs

    if native_step:
        native_or_skip()
    model, tok = ernie45.load(ckpt, dtype="float32", device="cpu")
    if native_step:
        optimize_for_inference(model)
    prompts = [tok.encode(t) for t in texts]
    engine_kw = {k: v(model) if callable(v) else v for k, v in engine_kw.items()}
    answers = {}
    for method in (None, "mtp"):
        args = EngineArgs(max_num_seqs=4, block_size=4, speculative=method,
                          num_speculative_tokens=2 if method else None, **engine_kw)
        engine = started(args, model, tok)
        try:
            answers[method] = [ids for ids, _ in run(engine, prompts, lengths)]
        finally:
            engine.shutdown(0.0)
    assert answers["mtp"] == answers[None] and [len(a) for a in answers[None]] == lengths
    sample = engine.metrics.registry.get_sample_value
    return {name: sample(f"ernie45_{name}_total")
            for name in ("num_preemptions", "spec_decode_num_drafts", "spec_decode_num_accepted_tokens")}


@pytest.mark.parametrize("native_step", [False, True])
def test_engine_mtp_with_an_int8_kv_cache_keeps_every_answer(head_ckpt, native_step):
    """`--kv-cache-dtype int8`: the C step returns the rows' hidden states from int8 pages too, so the drafter is
    fed and drafts are accepted; every greedy answer is the one the same engine gives without speculation."""
    counts = _engine_answers_equal(head_ckpt, native_step, ("床前明月光，疑是地上霜。", "白日依山尽，", "海上生明月，"),
                                   [30, 40, 50], max_model_len=128, kv_cache_dtype="int8")
    assert counts["spec_decode_num_drafts"] > 0 and counts["spec_decode_num_accepted_tokens"] > 0


def test_server_mtp_flags_are_checked_before_loading(tmp_path, capsys):
    """`serve --speculative mtp` needs an MTP layer and no tensor parallelism: one-line errors before any model loads;
    `--draft-vocab-size` needs mtp."""
    from ernie45.serve.server import main as serve_main

    for argv, message in (
        (["--model", bundled_path("ernie-tiny"), "--speculative", "mtp"], "has no MTP layer"),
        (["--model", bundled_path("ernie-tiny-moe"), "--speculative", "ngram", "--draft-vocab-size", "64"],
         "--draft-vocab-size applies to --speculative mtp"),
    ):
        with pytest.raises(ErnieError, match=message) as e:
            serve_main(argv)
        assert "\n" not in str(e.value)


# ---- docs/speculative.md, run as written ----------------------------------------------------------------------------
def _doc_commands(text):
    blocks = re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S)
    for kind, body in blocks:
        if kind == "python":
            yield kind, body
        else:
            yield from ((kind, line) for line in body.splitlines() if line.strip() and not line.startswith("#"))


def _poems(n: int) -> list[str]:
    """Distinct poem-shaped documents of four five-character lines (no preprocess filter drops them)."""
    import random

    chars = "床前明月光疑是地上霜举头望低思故乡白日依山尽黄河入海流欲穷千里目更一层楼春眠不觉晓处闻啼鸟夜来风雨声花落知多少"
    rng = random.Random(0)
    out = []
    for _ in range(n):
        lines = ["".join(rng.choice(chars) for _ in range(5)) for _ in range(8)]
        out.append("，".join(lines[:4]) + "。\n" + "，".join(lines[4:]) + "。")
    return out


@pytest.mark.parametrize("guide", ["speculative.md", "speculative_zh.md"])
def test_docs_commands_run(head_ckpt, capsys, monkeypatch, tmp_path, guide):
    """Every command of the guide, as written, on the bundled MoE model with its MTP head (serve runs in
    test_server_greedy_answers_equal_and_metrics_count; pretrain and bench on small step counts)."""
    import io

    from ernie45.data.preprocess import PreprocessConfig, preprocess

    with open(os.path.join(ROOT, "docs", guide), encoding="utf-8") as f:
        text = f.read().replace("ernie-tiny-moe", head_ckpt)
    monkeypatch.chdir(tmp_path)
    with open("poems.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in _poems(60))
    for name in ("data-selfgen", "data-poems_train", "data-other"):
        preprocess(["poems.jsonl"], bundled_path("ernie-tiny-moe"), name, PreprocessConfig(seq_len=32), progress=False)
    small = {"--steps": "2", "--batch-size": "2", "--max-new-tokens": "8"}
    ran = 0
    for kind, body in _doc_commands(text):
        if kind == "python":
            exec(compile(body, guide, "exec"), {})
            capsys.readouterr()
            ran += 1
            continue
        stdin = ""
        if "|" in body:
            left, body = body.split("|", 1)
            stdin = shlex.split(left)[1] + "\n"
        argv = shlex.split(body)
        assert argv[0] == "ernie45", body
        if argv[1] == "serve":  # its flags parse (the server itself runs in the server tests above)
            from ernie45.serve.server import build_parser as serve_parser

            serve_parser().parse_args(argv[2:])
            continue
        argv = [small.get(prev, a) if prev in small else a for prev, a in zip(["", *argv], argv)]
        if argv[1] == "bench":
            argv += ["--steps", "2"]
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        rc, out, err = run_cli(argv[1:], capsys)
        assert rc == 0, (body, err)
        if "--json" in argv:
            assert json.loads(out)["speculative"]["drafted"] > 0
        if argv[1] == "pretrain":
            assert has_mtp(load_checkpoint(os.path.join(argv[argv.index("--out") + 1], "final"), device="cpu"))
        ran += 1
    assert ran == 8
