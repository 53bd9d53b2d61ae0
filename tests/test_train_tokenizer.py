"""Tokenizer training: the CLI, and parity of the trained tokenizer with transformers' AutoTokenizer."""

from __future__ import annotations

import json
import os

import pytest

from ernie45.cli import main as cli_main
from ernie45.data.train_tokenizer import MAX_SENTENCE_BYTES, train_tokenizer, training_pieces
from ernie45.tokenizer import SPECIAL_PIECES, Tokenizer

POEMS = [
    "《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "《登鹳雀楼》\n作者：王之涣\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
    "《春晓》\n作者：孟浩然\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
    "《相思》\n作者：王维\n红豆生南国，春来发几枝。\n愿君多采撷，此物最相思。",
    "Knowledge is power. The quick brown fox jumps over the lazy dog.\n\t-- Francis Bacon",
    "There are two ways of constructing a software design: make it simple, or make it complicated.",
    "ERNIE 4.5 models answer questions in Chinese and English. Version 2025-06-30, 12345 tokens.",
]

PARITY_TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "The quick brown fox jumps over the lazy dog.",
    "中文 mixed with English, 数字 2024 and punctuation!?",
    "  two  leading spaces\nnew line\ttab and trailing space ",
    "\n\n",
    " ",
    "",
    "<|begin_of_sentence|>User: 写一首诗\nAssistant: 好的<|end_of_sentence|>",
    "a</s>b<s>c<unk>d<mask:1>e<|IMAGE_PLACEHOLDER|>f",
    " </s> spaced special ",
    "rare characters fall back to bytes: 龘 😀 ☃ é",
    "全角ＡＢＣ１２３　and ideographic space",
]

CONVERSATIONS = [
    [{"role": "user", "content": "写一首题为《春晓》的诗"}],
    [
        {"role": "system", "content": "你是一位诗人。"},
        {"role": "user", "content": "写一首诗"},
        {"role": "assistant", "content": "床前明月光，疑是地上霜。"},
        {"role": "user", "content": "Another, in English"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! </s> ok"}],
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tt")
    src = d / "corpus.jsonl"
    src.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in POEMS * 5), encoding="utf-8"
    )
    assert (
        cli_main(["train-tokenizer", "--input", str(src), "--out", str(d / "tok"), "--vocab-size", "600"])
        == 0
    )
    return str(d / "tok")


def test_cli_writes_an_ernie_format_tokenizer(trained):
    assert sorted(os.listdir(trained)) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    tok = Tokenizer.from_pretrained(trained)
    sp = tok.sp
    assert [sp.IdToPiece(i) for i in range(3 + len(SPECIAL_PIECES))] == [
        "<unk>",
        "<s>",
        "</s>",
        *SPECIAL_PIECES,
    ]
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert tok.stop_token_ids == [2, tok.convert_tokens_to_ids("<|end_of_sentence|>")] == [2, 4]
    for text in PARITY_TEXTS:
        assert tok.decode(tok.encode(text)) == text  # byte fallback: everything round-trips
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    assert not proto.normalizer_spec.add_dummy_prefix and proto.trainer_spec.byte_fallback
    assert (
        proto.normalizer_spec.name == "identity" and proto.trainer_spec.model_type == proto.trainer_spec.BPE
    )
    assert not sp.IdToPiece(tok.encode("Hello")[0]).startswith("\u2581")  # no prefix space is added


def test_autotokenizer_parity(trained):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(trained)
    tok = Tokenizer.from_pretrained(trained)
    assert len(hf) == tok.vocab_size
    for name in ("bos", "eos", "pad", "cls", "sep"):
        assert getattr(hf, f"{name}_token_id") == getattr(tok, f"{name}_token_id"), name
    assert hf.unk_token_id == tok.sp.unk_id() == 0
    for text in PARITY_TEXTS:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf(text)["input_ids"] == ids, text  # ERNIE adds no BOS/EOS by default
        assert hf.decode(ids) == tok.decode(ids), text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True), text
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours == theirs
            ids = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == ids
    assert (
        tok.apply_chat_template(CONVERSATIONS[0])
        == "<|begin_of_sentence|>User: 写一首题为《春晓》的诗\nAssistant: "
    )


def test_training_is_deterministic_and_normalises(tmp_path):
    train_tokenizer(POEMS * 3, tmp_path / "a", vocab_size=500)
    train_tokenizer(POEMS * 3, tmp_path / "b", vocab_size=500)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (
        tmp_path / "b" / "tokenizer.model"
    ).read_bytes()
    src = tmp_path / "fw.txt"
    src.write_text("ＡＢＣＤ ＡＢＣＤ ＡＢＣＤ\n\n" * 20, encoding="utf-8")
    assert (
        cli_main(
            ["train-tokenizer", "--input", str(src), "--out", str(tmp_path / "n"), "--vocab-size", "300"]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "train-tokenizer",
                "--input",
                str(src),
                "--out",
                str(tmp_path / "r"),
                "--vocab-size",
                "300",
                "--no-normalize",
            ]
        )
        == 0
    )
    normed, raw = Tokenizer.from_pretrained(tmp_path / "n"), Tokenizer.from_pretrained(tmp_path / "r")
    assert normed.sp.PieceToId("ABCD") != normed.sp.unk_id() and raw.sp.PieceToId("ABCD") == raw.sp.unk_id()
    assert raw.sp.PieceToId("ＡＢＣＤ") != raw.sp.unk_id()


def test_training_pieces_split_long_documents():
    line = "床前明月光，疑是地上霜。" * 40  # 1440 bytes
    doc = "\n".join([line] * 8)
    pieces = list(training_pieces(doc))
    assert len(pieces) == 4 and all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces)
    assert "\n".join(pieces) == doc
    huge = "字" * 3000  # one 9000-byte line is cut at character boundaries
    assert "".join(training_pieces(huge)) == huge
    assert all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in training_pieces(huge))
    assert list(training_pieces("short")) == ["short"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vocab-size", "100"], r"--vocab-size 100 is too small: the corpus needs at least \d+ pieces"),
        (["--vocab-size", "5"], "--vocab-size must be at least 14"),
        (["--vocab-size", "600", "--character-coverage", "0"], "--character-coverage must be in"),
    ],
)
def test_cli_errors(tmp_path, capsys, args, message):
    import re

    src = tmp_path / "c.jsonl"
    src.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in POEMS), encoding="utf-8"
    )
    assert cli_main(["train-tokenizer", "--input", str(src), "--out", str(tmp_path / "tok"), *args]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "tok").exists()


def test_cli_bad_input(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"\n\n")
    base = ["train-tokenizer", "--out", str(tmp_path / "tok"), "--vocab-size", "600", "--input"]
    assert cli_main(base + [str(tmp_path / "missing.txt")]) == 1
    assert "input not found" in capsys.readouterr().err
    assert cli_main(base + [str(tmp_path / "empty.txt")]) == 1
    assert "empty corpus" in capsys.readouterr().err
    (tmp_path / "mixed.txt").write_bytes(("\n\n".join(POEMS) + "\n\n").encode() + b"\xff\xfe junk\n")
    assert cli_main(base + [str(tmp_path / "mixed.txt")]) == 0
    out = capsys.readouterr()
    assert "on 7 documents (skipped: 1 not UTF-8, 0 empty)" in out.out and "not valid UTF-8" in out.err
    assert cli_main(base + [str(tmp_path / "mixed.txt")]) == 1
    assert "--overwrite" in capsys.readouterr().err
