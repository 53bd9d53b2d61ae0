"""`ernie45 pretrain` and the SFT step on a tiny config, plus the shipped bundled models.

Covers: the loss falls; a resumed run replays the uninterrupted loss curve exactly; two `torchrun`
processes give the loss of one process with the same global batch; LR schedules; bad input; the SFT
loss mask; the guide's commands (docs/pretrain.md); the bundled models load, are small, generate poem-like
text and record a held-out perplexity far below the uniform baseline.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ernie45.cli import main as cli
from ernie45.errors import ErnieError
from ernie45.train.pretrain import PretrainArgs, pretrain
from ernie45.train.schedule import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "床前明月光疑是地上霜举头望低思故乡白日依山尽黄河入海流欲穷千里目更一层楼春眠不觉晓处闻啼鸟夜来风雨声花落知多少"


def _docs(n: int, seed: int = 0) -> list[str]:
    """Distinct poem-shaped documents (random lines of five characters), so no dedup stage drops them."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = ["".join(rng.choice(CHARS) for _ in range(5)) for _ in range(4)]
        docs.append(f"{lines[0]}，{lines[1]}。\n{lines[2]}，{lines[3]}。")
    return docs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_dir):
    from ernie45.data.preprocess import PreprocessConfig, preprocess

    d = tmp_path_factory.mktemp("pretrain-data")
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in _docs(160))
    out = d / "data"
    preprocess(
        [str(d / "corpus.jsonl")],
        tokenizer_dir,
        out,
        PreprocessConfig(seq_len=32, val_fraction=0.1),
        progress=False,
    )
    return str(out)


def _args(data_dir, out, tokenizer_dir, **kw) -> PretrainArgs:
    base = dict(
        data=[data_dir],
        out=str(out),
        config="tiny",
        tokenizer=tokenizer_dir,
        steps=12,
        batch_size=4,
        lr=3e-3,
        warmup=2,
        eval_every=6,
        eval_batches=2,
        save_every=4,
        keep_checkpoints=10,
        progress=False,
        seed=0,
    )
    base.update(kw)
    return PretrainArgs(**base)


def _log(out) -> list[dict]:
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_final_model_loads(data_dir, tokenizer_dir, tmp_path):
    import ernie45

    s = pretrain(_args(data_dir, tmp_path / "run", tokenizer_dir, steps=30, eval_every=15, save_every=10))
    losses = [r["loss"] for r in _log(tmp_path / "run")]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    assert s["eval_loss"] is not None and s["eval_loss"] < math.log(s["num_parameters"])
    evals = [r["eval_loss"] for r in _log(tmp_path / "run") if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    model, tok = ernie45.load(str(tmp_path / "run" / "final"), dtype="float32", device="cpu")
    assert model.config.vocab_size == len(tok)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [
        "step-0000010",
        "step-0000020",
        "step-0000030",
    ]


@pytest.mark.slow
def test_resume_replays_the_uninterrupted_curve(data_dir, tokenizer_dir, tmp_path):
    full = tmp_path / "full"
    pretrain(_args(data_dir, full, tokenizer_dir, grad_accum=2))
    # Simulate a crash right after the step-4 checkpoint: later checkpoints and the final model never existed.
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    for name in ("step-0000008", "step-0000012"):
        shutil.rmtree(crashed / "checkpoints" / name)
    shutil.rmtree(crashed / "final")
    s = pretrain(_args(data_dir, crashed, tokenizer_dir, grad_accum=2, resume=True))
    a, b = _log(full), _log(crashed)
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["lr"] == ra["lr"]
        if "eval_loss" in ra:
            assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], abs=1e-6)
    assert [h["step"] for h in s["history"]] == list(range(1, 13))
    from ernie45.checkpoint_read import read_state_dict

    wa, wb = read_state_dict(str(full / "final")), read_state_dict(str(crashed / "final"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_settings(data_dir, tokenizer_dir, tmp_path):
    pretrain(_args(data_dir, tmp_path / "r", tokenizer_dir, steps=4, eval_every=0))
    with pytest.raises(ErnieError, match="batch_size"):
        pretrain(_args(data_dir, tmp_path / "r", tokenizer_dir, steps=4, batch_size=2, resume=True))
    with pytest.raises(ErnieError, match="steps"):
        pretrain(_args(data_dir, tmp_path / "r", tokenizer_dir, steps=8, resume=True))


@pytest.mark.slow
def test_two_processes_match_one(data_dir, tokenizer_dir, tmp_path):
    """torchrun with 2 gloo processes, micro-batch 4 split 2+2, equals one process with micro-batch 4."""
    common = [
        "--data",
        data_dir,
        "--config",
        "tiny",
        "--tokenizer",
        tokenizer_dir,
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
        "--warmup",
        "1",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--save-every",
        "0",
        "--no-progress",
        "--bf16",
        "off",
    ]
    assert cli(["pretrain", "--out", str(tmp_path / "one"), *common]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ernie45",
            "pretrain",
            "--out",
            str(tmp_path / "two"),
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-4)


def test_schedules():
    assert lr_at(0, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 0.1, warmup=10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 0.1, warmup=10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    assert lr_at(10 + 89 // 2, 100, 1.0, 0.0, warmup=10) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 44 / 89))
    )
    # WSD: 90 post-warmup steps, the last 18 decay linearly.
    assert [lr_at(s, 100, 1.0, 0.0, 10, "wsd") for s in (50, 81)] == [1.0, 1.0]
    assert lr_at(82, 100, 1.0, 0.0, 10, "wsd") == pytest.approx(1 - 1 / 18)
    assert lr_at(99, 100, 1.0, 0.0, 10, "wsd") == pytest.approx(0.0)


def test_bad_input(data_dir, tokenizer_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(empty), "--config", "tiny"], "data directory is empty"),
        (["--data", str(tmp_path / "missing"), "--config", "tiny"], "data directory not found"),
        (["--data", str(tmp_path / "notdata"), "--config", "tiny"], "not an `ernie45 preprocess` output"),
        (["--data", data_dir], "exactly one of --config"),
        (["--data", data_dir, "--config", "nope"], "neither a preset"),
        (["--data", data_dir, "--config", "tiny", "--steps", "0"], "--steps must be >= 1"),
        (["--data", data_dir, "--config", "tiny", "--resume"], "no checkpoint"),
        (["--data", data_dir, "--init-from", str(tmp_path / "missing")], "checkpoint directory not found"),
        (["--data", data_dir, "--config", "tiny", "--tokenizer", str(empty)], "no tokenizer.model"),
        (["--data", data_dir, "--config", str(tmp_path / "small.json")], "but the model's vocab_size is 100"),
    ]
    (tmp_path / "small.json").write_text(json.dumps({"preset": "tiny", "vocab_size": 100}))
    (tmp_path / "notdata").mkdir()
    (tmp_path / "notdata" / "x.txt").write_text("hi")
    for i, (argv, msg) in enumerate(cases):
        assert cli(["pretrain", "--out", str(tmp_path / f"o{i}"), "--no-progress", *argv]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, (argv, err)
    with pytest.raises(SystemExit) as e:
        cli(["pretrain", "--data", data_dir, "--out", str(tmp_path / "x"), "--schedule", "linear"])
    assert e.value.code == 2


def test_sft_masks_prompts_and_learns(tokenizer_dir):
    from ernie45.checkpoint import build_model
    from ernie45.config import preset
    from ernie45.tokenizer import Tokenizer
    from ernie45.train.sft import encode_examples, sft_train

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    examples = [
        {
            "messages": [
                {"role": "user", "content": f"写一首题为《{t[:2]}》的诗"},
                {"role": "assistant", "content": t},
            ]
        }
        for t in _docs(6, seed=1)
    ]
    samples = encode_examples(tok, examples, max_length=128)
    sep = tok.convert_tokens_to_ids("<|end_of_sentence|>")
    for s, ex in zip(samples, examples):
        trained = [i for i, lab in zip(s.input_ids, s.labels) if lab != -100]
        assert trained[-1] == sep
        assert tok.decode(trained[:-1]) == ex["messages"][1]["content"]
        prompt = tok.apply_chat_template(ex["messages"][:1], tokenize=True)
        assert s.input_ids[: len(prompt)] == prompt and set(s.labels[: len(prompt)]) == {-100}
    model = build_model(preset("tiny", vocab_size=len(tok)))
    model.init_weights(seed=0)
    losses = sft_train(model, tok, examples, steps=25, lr=3e-3, batch_size=3, warmup=2, progress=False)
    assert len(losses) == 25 and np.mean(losses[-3:]) < losses[0] - 1.0
    with pytest.raises(ErnieError, match="SFT example 0"):
        sft_train(model, tok, [{"messages": [{"role": "robot", "content": "x"}]}], steps=1, progress=False)


# ---- the guide ---------------------------------------------------------------------------------------
def _guide_commands() -> list[str]:
    with open(os.path.join(ROOT, "docs", "pretrain.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    cmds = []
    for block in blocks:
        cmds += [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("ernie45 pre")]
    return cmds


def test_guide_commands_run(tokenizer_dir, tmp_path, monkeypatch, capsys):
    """Run the guide's `ernie45 preprocess` / `ernie45 pretrain` commands on a tiny corpus and step count."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("corpus")
    with open("corpus/poems.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in _docs(120, seed=2))
    shutil.copytree(tokenizer_dir, "tokenizer")
    cmds = _guide_commands()
    assert [c.split()[1] for c in cmds] == ["preprocess", "pretrain", "pretrain", "pretrain"]
    small = {
        "--seq-len": "32",
        "--steps": "4",
        "--batch-size": "2",
        "--eval-every": "2",
        "--save-every": "2",
        "--warmup": "1",
        "--config": "tiny",
    }
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        steps = "6" if "--resume" in argv else "4"  # the guide's resume extends the run
        argv = [{**small, "--steps": steps}.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
        assert cli(argv) == 0, cmd
    assert os.path.isfile("runs/poems/final/model.safetensors")
    assert os.path.isfile("runs/poems-cpt/final/model.safetensors")
    capsys.readouterr()


# ---- the shipped models -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ernie-tiny", "ernie-tiny-moe"])
def test_bundled_model(name):
    import ernie45
    from ernie45.models import bundled_path

    path = bundled_path(name)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    assert size < 12e6  # ernie-tiny-moe: 9.8 MB, plus 1.4 MB of MTP head (docs/speculative.md)
    model, tok = ernie45.load(name, dtype="float32", device="cpu")
    assert model.config.is_moe == name.endswith("moe")
    with open(os.path.join(path, "generation_config.json"), encoding="utf-8") as f:
        assert tok.convert_tokens_to_ids("<|end_of_sentence|>") in json.load(f)["eos_token_id"]
    with open(os.path.join(path, "README.md"), encoding="utf-8") as f:
        card = f.read()
    rows = re.findall(r"^\| (data-poems_heldout) \| ([0-9.]+) \| (\d+) \|", card, re.M)
    assert rows, "the model card must report held-out perplexity"
    ppl, vocab = float(rows[0][1]), int(rows[0][2])
    assert vocab == model.config.vocab_size and ppl < vocab / 5
    # Greedy decoding through the model's forward: the reply to a poem request is Chinese verse.
    ids = tok.apply_chat_template([{"role": "user", "content": "写一首题为《春晓》的诗"}], tokenize=True)
    seq = torch.tensor([ids])
    stops = set(tok.stop_token_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(48):
            nxt = int(model(seq).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    text = tok.decode(out)
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in text)
    assert cjk >= 10 and ("，" in text or "。" in text), text
