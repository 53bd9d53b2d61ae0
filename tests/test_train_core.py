"""The shared training core: run directories written by older code resume and continue their loss curve; what
makes a checkpoint complete; the stored dtype; the training commands' shared option spellings."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ernie45.cli import main as cli
from ernie45.models import bundled_path
from ernie45.train import core

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "train")
FAST = ["--bf16", "off", "--device", "cpu", "--no-progress"]


def _log(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _old_run(name: str, tmp_path, monkeypatch) -> list[dict]:
    """A copy of an old run directory as the cwd (its runs recorded relative paths); its full loss curve."""
    shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)
    monkeypatch.chdir(tmp_path / name)
    return _log("run/log.jsonl")


def _assert_continues(ref: list[dict], got: list[dict], keys: tuple[str, ...]) -> None:
    # The reference curve was recorded on another machine: allow for its float kernels.
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for r, g in zip(ref, got):
        assert r.keys() == g.keys(), (r, g)
        for k in keys:
            if k in r:
                assert g[k] == pytest.approx(r[k], rel=1e-4, abs=1e-6), (k, r, g)


def test_old_pretrain_run_resumes(tmp_path, monkeypatch):
    ref = _old_run("pretrain", tmp_path, monkeypatch)
    argv = ["pretrain", "--data", "data", "--out", "run", "--resume", "--steps", "8", "--batch-size", "2"]
    argv += ["--lr", "3e-3", "--warmup", "2", "--eval-every", "4", "--eval-batches", "1", "--save-every", "4"]
    assert cli([*argv, "--keep-checkpoints", "10", *FAST]) == 0
    _assert_continues(ref, _log("run/log.jsonl"), ("loss", "lr", "grad_norm", "eval_loss"))
    assert sorted(os.listdir("run/checkpoints")) == ["step-0000004", "step-0000008"]
    with open("run/checkpoints/step-0000008/trainer_state.json", encoding="utf-8") as f:
        state = json.load(f)
    assert state["step"] == 8 and [h["step"] for h in state["history"]] == list(range(1, 9))
    assert os.path.isfile("run/final/model.safetensors")


def test_old_lora_finetune_run_resumes(tmp_path, monkeypatch):
    ref = _old_run("finetune-lora", tmp_path, monkeypatch)
    argv = ["finetune", "--model", "base", "--data", "train.jsonl", "--out", "run", "--resume"]
    argv += ["--lora-rank", "2", "--lora-dropout", "0.1", "--max-steps", "6", "--batch-size", "2"]
    assert cli([*argv, "--lr", "5e-3", "--save-every", "3", *FAST]) == 0
    _assert_continues(ref, _log("run/log.jsonl"), ("loss", "tokens", "lr", "grad_norm"))
    assert os.listdir("run/checkpoints") == ["step-0000003"]
    with open("run/final/training_summary.json", encoding="utf-8") as f:
        assert json.load(f)["steps"] == 6
    assert os.path.isfile("run/final/adapter_model.safetensors")


def test_a_checkpoint_counts_once_optimizer_and_state_are_written(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name, files in {
        "step-0000001": ("optimizer.pt", "trainer_state.json"),
        "step-0000002": ("trainer_state.json",),  # an older pretrain run killed before its optimizer file
        "step-0000003": ("optimizer.pt",),  # killed before its state file
    }.items():
        (ckpts / name).mkdir(parents=True)
        for f in files:
            (ckpts / name / f).write_text("")
    assert core.list_checkpoints(str(tmp_path)) == ["step-0000001"]
    assert core.prepare_run_dir(str(tmp_path), True, False, True) == str(ckpts / "step-0000001")


def test_stored_dtype_reads_the_tensors_not_the_config():
    base = os.path.join(FIXTURES, "finetune-lora", "base")
    assert core.stored_dtype(base) == torch.float32
    assert core.stored_dtype(bundled_path("ernie-tiny-moe")) == torch.bfloat16  # its fp32 router aside


def test_training_commands_spell_the_shared_options_alike(capsys):
    from ernie45.train import finetune, merge, pretrain

    p = pretrain.build_parser()
    base = ["--data", "d", "--out", "o"]
    assert p.parse_args([*base, "--model", "ck"]).init_from == "ck"
    assert p.parse_args([*base, "--init-from", "ck"]).init_from == "ck"  # the old spelling, hidden
    p.print_help()
    assert "--init-from" not in capsys.readouterr().out
    for parser in (p, finetune.build_parser()):
        assert parser.get_default("device") == "auto"
    m = merge.build_parser()
    for spelling, name in (("fp16", "float16"), ("bfloat16", "bfloat16"), ("auto", "auto")):
        assert (
            m.parse_args(["--model", "b", "--adapter", "a", "--out", "o", "--dtype", spelling]).dtype == name
        )
