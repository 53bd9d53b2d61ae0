"""Shared fixtures: tiny random checkpoints written by transformers, and a tiny ERNIE-format tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models run fastest on one thread (and CI machines are small and may be shared).
torch.set_num_threads(1)

CORPUS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "ERNIE 4.5 is a family of large language models. Hello world!",
    "Knowledge is power. 知识就是力量。 Time flies like an arrow.",
] * 20

DENSE_KW = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=True, use_bias=False)
MOE_KW = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, use_bias=False, moe_num_experts=6, moe_k=2,
              moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1,
              moe_layer_end_index=-1, moe_layer_interval=1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from ernie45.data.train_tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, d, vocab_size=400)
    return str(d)


def make_hf_model(kind: str = "dense", seed: int = 0, bias_scale: float = 0.0, **overrides):
    """A random transformers ERNIE model (fp32, eager attention/experts) from a tiny config."""
    import transformers

    torch.manual_seed(seed)
    if kind == "dense":
        cfg = transformers.Ernie4_5Config(**{**DENSE_KW, **overrides})
        model = transformers.Ernie4_5ForCausalLM(cfg)
    else:
        cfg = transformers.Ernie4_5_MoeConfig(**{**MOE_KW, **overrides})
        model = transformers.Ernie4_5_MoeForCausalLM(cfg)
    cfg._attn_implementation = "eager"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.8, 1.2)
            elif "e_score_correction_bias" in n:
                p.copy_(torch.randn_like(p) * bias_scale)
            elif n.endswith("bias"):
                p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.08)
    model.eval()
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("eager")
        except Exception:
            pass
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
            m.config._experts_implementation = "eager"
    return model


def save_hf(model, path, tokenizer_dir: str | None = None) -> str:
    import shutil

    model.save_pretrained(path)
    if tokenizer_dir:
        for f in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(path, f))
    return str(path)


@pytest.fixture
def hf_dense(tmp_path, tokenizer_dir):
    m = make_hf_model("dense")
    return m, save_hf(m, tmp_path / "dense", tokenizer_dir)


@pytest.fixture
def hf_moe(tmp_path, tokenizer_dir):
    m = make_hf_model("moe", bias_scale=0.3)
    return m, save_hf(m, tmp_path / "moe", tokenizer_dir)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run the test with 1 and with 2 torch (and C kernel) threads."""
    prev = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(prev)


THINKING_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<response>", "</response>",
                   "<tool_call>", "</tool_call>"]


def make_thinking_tokenizer(tokenizer_dir: str, path) -> dict[str, int]:
    """A Thinking-style tokenizer in `path`: `tokenizer_dir`'s SentencePiece model plus the ChatML and the six
    Thinking markers as special added tokens (ids right after the SentencePiece vocabulary) and the Thinking
    chat template. Returns token -> id."""
    import json
    import shutil

    import sentencepiece as spm

    from ernie45.chat_template import THINKING_CHAT_TEMPLATE

    os.makedirs(path, exist_ok=True)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(path, f))
    n = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model")).GetPieceSize()
    ids = {t: n + i for i, t in enumerate(THINKING_TOKENS)}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    for t, i in ids.items():
        cfg["added_tokens_decoder"][str(i)] = {"content": t, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}
    cfg["additional_special_tokens"] = list(cfg.get("additional_special_tokens") or []) + THINKING_TOKENS
    cfg["chat_template"] = THINKING_CHAT_TEMPLATE
    with open(cfg_file, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    return ids


@pytest.fixture(scope="session")
def thinking_ckpt(tmp_path_factory, tokenizer_dir):
    """A random dense model with a Thinking tokenizer (built here, not downloaded): (hf model, path, ids)."""
    path = tmp_path_factory.mktemp("thinking") / "thinking"
    hf = make_hf_model("dense", max_position_embeddings=4096)
    save_hf(hf, path)
    ids = make_thinking_tokenizer(tokenizer_dir, path)
    return hf, str(path), ids
