"""Corpus preprocessing: normalisation, filters, dedup, packing, resume, bad input, corpus fetch, docs."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ernie45.cli import main as cli_main
from ernie45.data import filters
from ernie45.data.dedup import NearDedup, shingles
from ernie45.data.preprocess import PreprocessConfig, iter_records, list_input_files, preprocess
from ernie45.data.shards import PackedDataset
from ernie45.errors import ErnieError
from ernie45.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAN = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈剑号巨阙珠称夜光"


def chinese_doc(rng: random.Random, sentences: int = 6) -> str:
    """A random Chinese text of 7-character clauses: passes every filter, no two are near-duplicates."""
    out = []
    for _ in range(sentences):
        out.append(
            "".join(rng.choice(HAN) for _ in range(7))
            + "，"
            + "".join(rng.choice(HAN) for _ in range(7))
            + "。"
        )
    return "".join(out)


def english_doc(rng: random.Random) -> str:
    words = (
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(20)
    )
    return " ".join(words).capitalize() + "."


def write_jsonl(path, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return str(path)


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [chinese_doc(rng) if i % 3 else english_doc(rng) for i in range(n)]


def read_tree(d) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(d):
        for name in names:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


def expected_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d) + [tok.eos_token_id]
    return np.asarray(ids, dtype=np.int32)


# ---- normalisation and filters -------------------------------------------------------------------------
def test_normalize_rule():
    n = filters.normalize
    assert n("ＡＢＣ１２３\u3000ｘ＃") == "ABC123 x#"
    assert n("你好，世界！（测试）……～") == "你好，世界！（测试）……～"
    assert n("Hello，world！（ok）") == "Hello,world!(ok)"
    assert n("全角ＡＢＣ１２，好") == "全角ABC12，好"
    assert n("作者:柳开（９４６－９９９）\nＮｏ，ｓｉｒ") == "作者:柳开（946-999）\nNo,sir"
    assert n("  a\r\nb  \r c\u2028d  \n\n") == "a\nb\n c\nd"
    assert n("\uf900") == "\u8c48"  # a compatibility ideograph becomes the unified one
    assert n("漢字與書，龍！", t2s=True) == "汉字与书，龙！"


def test_filters_behave_as_documented():
    cfg = filters.FilterConfig(min_chars=20, max_symbol_ratio=0.3, max_dup_line_ratio=0.3)
    assert filters.check("a" * 20, cfg) is None
    assert filters.check("a" * 19 + " \n\t ", cfg) == "min_chars"
    assert filters.check("a" * 30 + "\x07", cfg) == "control"
    assert filters.check("a" * 30 + "\t" + "b\n", cfg) is None
    assert filters.check("\x1b[32m" + "a" * 30, cfg) == "control"  # control wins over every other filter
    # 14 letters + 6 symbols = 0.3 exactly passes; one more symbol fails
    assert filters.symbol_ratio("abcdefghijklmn,.!?#$") == pytest.approx(0.3)
    assert filters.check("abcdefghijklmn,.!?#$", cfg) is None
    assert filters.check("abcdefghijklmn,.!?#$%", cfg) == "symbol_ratio"
    assert filters.symbol_ratio("床前明月光，疑是地上霜。") == pytest.approx(2 / 12)
    lines = [f"line number {i} here" for i in range(7)]
    assert filters.dup_line_ratio("\n".join(lines + lines[:3])) == pytest.approx(0.3)
    assert filters.check("\n".join(lines + lines[:3]), cfg) is None
    assert filters.check("\n".join(lines + lines[:4]), cfg) == "dup_lines"


# ---- dedup ---------------------------------------------------------------------------------------------
def test_minhash_estimates_track_true_jaccard():
    rng = random.Random(1)
    a = chinese_doc(rng, 8)
    near = a[:40] + ("地" if a[40] != "地" else "天") + a[41:]  # one character changed
    b = chinese_doc(rng, 8)
    c = b[:32] + chinese_doc(rng, 4)  # shares its first two sentences with b
    nd = NearDedup(threshold=0.8, num_perm=128, ngram=5)

    def jaccard(x, y):
        sx, sy = shingles(x, 5), shingles(y, 5)
        return len(sx & sy) / len(sx | sy)

    assert jaccard(a, near) > 0.85 and jaccard(b, c) < 0.5
    for x, y in [(a, near), (b, c)]:
        assert abs(nd.similarity(x, y) - jaccard(x, y)) < 0.1
    assert shingles("天 地\n玄黄宇", 3) == {s.encode() for s in ["天地玄", "地玄黄", "玄黄宇"]}


def test_exact_and_near_duplicates_removed(tmp_path, tokenizer_dir):
    rng = random.Random(2)
    docs = corpus(20, seed=3)
    a = chinese_doc(rng, 8)
    near = a[:40] + ("地" if a[40] != "地" else "天") + a[41:]
    b = chinese_doc(rng, 8)
    distinct = b[:32] + chinese_doc(rng, 4)
    planted = docs[:5] + [a, b, docs[1], near, distinct, "  " + docs[2] + "\n"] + docs[5:]
    src = write_jsonl(tmp_path / "c.jsonl", planted)
    report = preprocess(
        [src], tokenizer_dir, tmp_path / "out", PreprocessConfig(seq_len=32, val_fraction=0), progress=False
    )
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["exact_dedup"]["removed"] == 2  # docs[1] and the re-spaced docs[2]
    assert stages["near_dedup"]["removed"] == 1  # `near`; `distinct` (shares 2 of its 6 sentences) is kept
    kept = docs[:5] + [a, b, distinct] + docs[5:]
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    np.testing.assert_array_equal(PackedDataset(tmp_path / "out").tokens(), expected_stream(tok, kept))


# ---- packing -------------------------------------------------------------------------------------------
def test_packing_is_lossless(tmp_path, tokenizer_dir):
    docs = corpus(40, seed=4)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = PreprocessConfig(seq_len=16, shard_size=5, val_fraction=0.25, seed=7, chunk_docs=7)
    report = preprocess([src], tokenizer_dir, tmp_path / "out", cfg, progress=False)
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    train, val = PackedDataset(tmp_path / "out"), PackedDataset(tmp_path / "out" / "val")
    assert 0 < len(val) < len(train) and train.num_documents + val.num_documents == 40
    # Every document went to exactly one split, in input order, each followed by EOS.
    draws = [__import__("xxhash").xxh64_intdigest(d.encode(), seed=7) / 2**64 < 0.25 for d in docs]
    for ds, want in [
        (train, [d for d, v in zip(docs, draws) if not v]),
        (val, [d for d, v in zip(docs, draws) if v]),
    ]:
        stream = expected_stream(tok, want)
        np.testing.assert_array_equal(ds.tokens(), stream)
        assert ds.num_tokens == stream.size and len(ds) == -(-stream.size // 16)
        flat = np.concatenate([ds[i] for i in range(len(ds))])
        np.testing.assert_array_equal(flat[: stream.size], stream)
        assert (flat[stream.size :] == tok.pad_token_id).all()
        assert ds.valid_length(len(ds) - 1) == stream.size - 16 * (len(ds) - 1)
        assert ds.valid_length(0) == 16 and ds[-1].tolist() == ds[len(ds) - 1].tolist()
        assert ds[0].dtype == np.int32 and ds[0].shape == (16,)
    assert len(train.meta["shards"]) == -(-len(train) // 5)  # 5 samples per shard
    assert report["splits"]["train"]["num_samples"] == len(train)
    train.verify()
    clone = copy.deepcopy(train)  # same reduce path as pickling to DataLoader workers: memmaps reopen lazily
    np.testing.assert_array_equal(clone[len(clone) - 1], train[len(train) - 1])
    with pytest.raises(IndexError):
        train[len(train)]
    shard = tmp_path / "out" / "train" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ErnieError, match="checksum mismatch"):
        train.verify()


def test_shard_writer_restore_truncates_to_a_checkpoint(tmp_path):
    from ernie45.data.shards import ShardWriter

    w = ShardWriter(str(tmp_path), seq_len=4, shard_samples=8)  # 32 tokens per shard
    w.append(np.arange(70))
    assert sorted(os.listdir(tmp_path)) == ["shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]
    w.restore(64)  # exactly two full shards: the third is removed, not left empty
    assert sorted(os.listdir(tmp_path)) == ["shard-00000.bin", "shard-00001.bin"]
    w.restore(40)
    assert os.path.getsize(tmp_path / "shard-00001.bin") == 8 * 4
    w.append(np.arange(40, 50))
    index = w.finalize(pad_id=-1, meta={"eos_token_id": 2, "pad_token_id": -1, "num_documents": 1})
    assert index["num_tokens"] == 50 and index["num_samples"] == 13
    ds = PackedDataset(tmp_path)
    np.testing.assert_array_equal(ds.tokens(), np.arange(50))
    assert ds[12].tolist() == [48, 49, -1, -1] and ds.valid_length(12) == 2 and ds.valid_length(-1) == 2


# ---- resume --------------------------------------------------------------------------------------------
def _run_args(src, tokenizer_dir, out):
    return [
        "preprocess",
        "--input",
        src,
        "--tokenizer",
        tokenizer_dir,
        "--out",
        str(out),
        "--seq-len",
        "16",
        "--shard-size",
        "4",
        "--chunk-docs",
        "8",
        "--val-fraction",
        "0.2",
    ]


def test_resume_after_exception_is_byte_identical(tmp_path, tokenizer_dir, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(60, seed=5))
    assert cli_main(_run_args(src, tokenizer_dir, tmp_path / "ref")) == 0
    calls = {"n": 0}
    encode = Tokenizer.encode

    def failing(self, text, *a, **k):
        calls["n"] += 1
        if calls["n"] == 35:  # in the middle of the 5th chunk
            raise RuntimeError("injected failure")
        return encode(self, text, *a, **k)

    monkeypatch.setattr(Tokenizer, "encode", failing)
    with pytest.raises(RuntimeError, match="injected"):
        cli_main(_run_args(src, tokenizer_dir, tmp_path / "out"))
    partial = tmp_path / ".out.partial"
    assert not (tmp_path / "out").exists()
    assert json.loads((partial / "state.json").read_text())["docs_done"] == 32
    monkeypatch.setattr(Tokenizer, "encode", encode)
    assert cli_main(_run_args(src, tokenizer_dir, tmp_path / "out")) == 0
    assert read_tree(tmp_path / "out") == read_tree(tmp_path / "ref")
    assert not partial.exists()


KILLER = """
import os, signal, sys
from ernie45.data import shards
append, calls = shards.ShardWriter.append, [0]
def append_then_die(self, tokens):
    append(self, tokens)  # tokens reach the shard file, the chunk is not committed yet
    calls[0] += 1
    if calls[0] == 7:
        os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWriter.append = append_then_die
from ernie45.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_killed_process_is_byte_identical(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(60, seed=6))
    assert cli_main(_run_args(src, tokenizer_dir, tmp_path / "ref")) == 0
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *_run_args(src, tokenizer_dir, tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert json.loads((tmp_path / ".out.partial" / "state.json").read_text())["docs_done"] == 24
    assert cli_main(_run_args(src, tokenizer_dir, tmp_path / "out")) == 0
    assert read_tree(tmp_path / "out") == read_tree(tmp_path / "ref")


def test_changed_settings_restart_instead_of_resuming(tmp_path, tokenizer_dir, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(30, seed=8))
    encode, calls = Tokenizer.encode, [0]

    def failing(self, text):
        calls[0] += 1
        if calls[0] > 12:
            raise RuntimeError("stop")
        return encode(self, text)

    monkeypatch.setattr(Tokenizer, "encode", failing)
    with pytest.raises(RuntimeError):
        preprocess(
            [src],
            tokenizer_dir,
            tmp_path / "out",
            PreprocessConfig(seq_len=16, chunk_docs=10),
            progress=False,
        )
    monkeypatch.undo()
    assert json.loads((tmp_path / ".out.partial" / "state.json").read_text())["docs_done"] == 10
    preprocess(
        [src], tokenizer_dir, tmp_path / "out", PreprocessConfig(seq_len=32, val_fraction=0), progress=False
    )
    assert "discarding" in capsys.readouterr().err
    preprocess(
        [src], tokenizer_dir, tmp_path / "ref", PreprocessConfig(seq_len=32, val_fraction=0), progress=False
    )
    assert read_tree(tmp_path / "out") == read_tree(tmp_path / "ref")


# ---- input formats and bad input -----------------------------------------------------------------------
def test_input_formats_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["第一篇\n第二行", "second doc", "third, with\nthree\nlines"]
    (tmp_path / "a.txt").write_text("\ufeff" + "\n\n\n".join(docs) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", docs)
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    assert list(iter_records([str(tmp_path / "a.txt")])) == [d + "\n" for d in docs]
    assert list(iter_records([str(tmp_path / "a.txt")], txt_mode="line")) == [
        line + "\n" for d in docs for line in d.split("\n")
    ]
    assert list(iter_records([str(tmp_path / "b.jsonl")])) == docs
    assert list(iter_records([str(tmp_path / "c.parquet")], text_key="body")) == docs
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.md").write_text("ignored")
    assert list_input_files([tmp_path]) == [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")]


def test_non_utf8_documents_are_skipped_and_counted(tmp_path, tokenizer_dir):
    docs = corpus(7, seed=9)
    raw = ("\n\n".join(docs[:3]) + "\n\n").encode() + b"bad \xff\xfe bytes in this paragraph\n\n"
    raw += ("\n\n".join(docs[3:6]) + "\n").encode()
    (tmp_path / "a.txt").write_bytes(raw)
    with open(tmp_path / "b.jsonl", "wb") as f:
        f.write(json.dumps({"text": docs[6]}, ensure_ascii=False).encode() + b"\n")
        f.write(b'{"text": "\xc3\x28 invalid"}\n')
        f.write(b'{"text": "lone surrogate \\udc80 here, long enough to pass"}\n')
    report = preprocess(
        [tmp_path / "a.txt", tmp_path / "b.jsonl"],
        tokenizer_dir,
        tmp_path / "out",
        PreprocessConfig(seq_len=16, val_fraction=0),
        progress=False,
    )
    assert report["stages"][0] == {
        "stage": "read",
        "in": 10,
        "removed": 3,
        "out": 7,
        "detail": {"non_utf8": 3},
    }
    assert report["documents_kept"] == 7
    shown = json.loads((tmp_path / "out" / "report.json").read_text())
    assert shown["stages"] == report["stages"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: [str(d / "missing.jsonl")], "input not found"),
        (lambda d: [_touch(d / "empty.txt", b"")], "empty corpus"),
        (lambda d: [_touch(d / "blank.jsonl", b"\n\n")], "empty corpus"),
        (lambda d: [_touch(d / "x.csv", b"a,b\n")], "unsupported input"),
        (lambda d: [_touch(d / "bad.jsonl", b'{"text": "ok"}\n{"text": \n')], r"bad.jsonl:2: invalid JSON"),
        (lambda d: [_touch(d / "key.jsonl", b'{"body": "ok"}\n')], "no 'text' field"),
        (lambda d: [_touch(d / "short.jsonl", b'{"text": "too short"}\n')], "no training documents left"),
        (lambda d: [str(d / "emptydir")], "no .txt/.jsonl/.parquet files"),
    ],
)
def test_bad_input_errors(tmp_path, tokenizer_dir, capsys, setup, message):
    (tmp_path / "emptydir").mkdir()
    inputs = setup(tmp_path)
    assert (
        cli_main(
            ["preprocess", "--input", *inputs, "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "out")]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and re.search(message, err) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _touch(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_bad_parameters_and_existing_output(tmp_path, tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(5))
    base = ["preprocess", "--input", src, "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "out")]
    for flag, value in [
        ("--val-fraction", "1"),
        ("--seq-len", "1"),
        ("--near-dup-threshold", "0"),
        ("--max-symbol-ratio", "1.5"),
        ("--num-perm", "1"),
    ]:
        assert cli_main(base + [flag, value]) == 1
        assert f"error: {flag}" in capsys.readouterr().err
    assert cli_main(base[:-2] + ["--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no tokenizer.model" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert cli_main(base) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(base + ["--overwrite", "--val-fraction", "0"]) == 0
    assert not (tmp_path / "out" / "keep").exists() and PackedDataset(tmp_path / "out").num_documents == 5


# ---- corpus fetch (offline: a fake apt-get serving locally built .deb files) ---------------------------
TANG = (
    "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n%\n"
    "\x1b[32m《登鹳雀楼》\x1b[m\n\x1b[33m作者：王之涣\x1b[m\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n%\n"
)
SONG = "\x1b[32m题目:《塞上》\x1b[m\n\x1b[33m作者:柳开（９４６－９９９）\x1b[m\n鸣骹直上一千尺，天静无风声更干。\n%\n"
WISDOM = (
    "Knowledge is power, and the _\bw_\bi_\bs_\be use it well.\n\t-- Francis Bacon\n%\n"
    "The quick brown fox jumps over the lazy dog, again and again.\n%\n"
)
DEP5 = (
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\n"
    "Copyright: 2001 Someone\nLicense: GPL-3.0+\n This program is free software.\n"
)
OLD_STYLE = "This program falls under the BSD copyright:\n\nRedistribution and use ... are permitted.\n"


def _build_deb(root, name: str, version: str, files: dict[str, str], copyright_text: str) -> str:
    tree = root / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        f"Description: test package\n"
    )
    games = tree / "usr/share/games/fortunes"
    games.mkdir(parents=True)
    for fname, text in files.items():
        (games / fname).write_text(text, encoding="utf-8")
        (games / (fname + ".dat")).write_bytes(b"\0" * 8)
        os.symlink(fname, games / (fname + ".u8"))
    doc = tree / "usr/share/doc" / name
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(copyright_text)
    deb = root / f"{name}_{version.replace(':', '%3a')}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True, capture_output=True
    )
    return str(deb)


@pytest.fixture(scope="module")
def fake_apt(tmp_path_factory):
    """A directory to put first on PATH: an `apt-get` whose `download` copies prebuilt .debs."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not available")
    root = tmp_path_factory.mktemp("apt")
    debs = {
        "fortunes-zh": _build_deb(root, "fortunes-zh", "2.98", {"tang300": TANG, "song100": SONG}, DEP5),
        "fortunes": _build_deb(root, "fortunes", "1:1.99.1-7.3", {"wisdom": WISDOM}, OLD_STYLE),
    }
    bin_dir = root / "bin"
    bin_dir.mkdir()
    cases = "\n".join(f"    {name}) cp '{deb}' . ;;" for name, deb in debs.items())
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\n[ "$1" = download ] || exit 100\nshift\nfor p in "$@"; do\n  case "$p" in\n{cases}\n'
        '    *) echo "E: Unable to locate package $p" >&2; exit 100 ;;\n  esac\ndone\n'
    )
    (bin_dir / "apt-get").chmod(0o755)
    return str(bin_dir)


def _fetch(args, path_env, cwd):
    env = {**os.environ, "PATH": path_env}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "fetch_corpus.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_fetch_corpus_converts_packages(tmp_path, fake_apt):
    proc = _fetch(["--out", str(tmp_path / "corpus")], fake_apt + os.pathsep + os.environ["PATH"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in (tmp_path / "corpus" / "corpus.jsonl").read_text().splitlines()]
    assert docs == [
        {
            "text": "题目:《塞上》\n作者:柳开（９４６－９９９）\n鸣骹直上一千尺，天静无风声更干。",
            "source": "fortunes-zh/song100",
            "title": "塞上",
            "author": "柳开",
        },
        {
            "text": "《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
            "source": "fortunes-zh/tang300",
            "title": "静夜思",
            "author": "李白",
        },
        {
            "text": "《登鹳雀楼》\n作者：王之涣\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
            "source": "fortunes-zh/tang300",
            "title": "登鹳雀楼",
            "author": "王之涣",
        },
        {
            "text": "Knowledge is power, and the wise use it well.\n\t-- Francis Bacon",
            "source": "fortunes/wisdom",
        },
        {
            "text": "The quick brown fox jumps over the lazy dog, again and again.",
            "source": "fortunes/wisdom",
        },
    ]
    sources = json.loads((tmp_path / "corpus" / "SOURCES.json").read_text())
    assert sources["documents"] == 5
    assert [(p["package"], p["version"], p["licence"], p["files"]) for p in sources["packages"]] == [
        ("fortunes-zh", "2.98", ["GPL-3.0+"], {"song100": 1, "tang300": 2}),
        ("fortunes", "1:1.99.1-7.3", ["BSD"], {"wisdom": 2}),
    ]
    assert sources["packages"][0]["copyright"] == DEP5
    proc = _fetch(
        ["--out", str(tmp_path / "c2"), "--packages", "no-such-pkg"],
        fake_apt + os.pathsep + os.environ["PATH"],
        tmp_path,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr
        == "error: `apt-get download no-such-pkg` failed: E: Unable to locate package no-such-pkg\n"
    )


def test_fetch_corpus_without_apt_is_a_clear_error(tmp_path):
    (tmp_path / "empty-bin").mkdir()
    proc = _fetch(["--out", str(tmp_path / "corpus")], str(tmp_path / "empty-bin"), tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: apt-get is unavailable: this script needs a Debian or Ubuntu system "
        "with apt (or copy corpus.jsonl from a machine that has one)"
    )
    assert not (tmp_path / "corpus").exists()


# ---- the guide's commands ------------------------------------------------------------------------------
def _blocks(lang: str, path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


@pytest.mark.parametrize("guide", ["preprocess.md", "preprocess_zh.md"])
def test_guide_commands_run(tmp_path, fake_apt, monkeypatch, capsys, guide):
    path = os.path.join(REPO, "docs", guide)
    commands = [line for block in _blocks("bash", path) for line in block.splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands] == [
        ["python", "scripts/fetch_corpus.py"],
        ["ernie45", "train-tokenizer"],
        ["ernie45", "preprocess"],
    ]
    monkeypatch.chdir(tmp_path)
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[0] == "python":
            proc = _fetch(argv[2:], fake_apt + os.pathsep + os.environ["PATH"], tmp_path)
            assert proc.returncode == 0, proc.stderr
        else:
            assert cli_main(argv[1:]) == 0
    assert "near_dedup" in capsys.readouterr().out
    (python_block,) = _blocks("python", path)
    exec(compile(python_block, guide, "exec"), {})
    train = PackedDataset(tmp_path / "data" / "packed")
    assert (
        train.seq_len == 512
        and train.num_documents + PackedDataset(tmp_path / "data" / "packed", split="val").num_documents == 5
    )
