"""`ernie45 finetune`: data formats and loss masks, validation, LoRA / QLoRA / full / DPO training, resume,
gradient accumulation and 2-process torchrun equivalence, bad input, and the commands of docs/finetune.md."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45.cli import main as cli
from ernie45.errors import ErnieError
from ernie45.tokenizer import Tokenizer
from ernie45.train import core
from ernie45.train import data as D
from ernie45.train import finetune as FT

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--bf16", "off", "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny models' matmuls are far faster on one thread than on two contended ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer_dir):
    return save_hf(make_hf_model("dense", seed=3), tmp_path_factory.mktemp("m") / "dense", tokenizer_dir)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer_dir):
    return save_hf(
        make_hf_model("moe", seed=4, bias_scale=0.3), tmp_path_factory.mktemp("m") / "moe", tokenizer_dir
    )


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def chat(q: str, a: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def sft_rows(n: int, offset: int = 0) -> list[dict]:
    """A learnable toy task: the answer is a fixed word chosen by the prompt's number mod 3."""
    words = ["red", "blue", "green"]
    return [chat(f"color of {i}?", words[i % 3]) for i in range(offset, offset + n)]


def log_of(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, core.LOG_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---- data ------------------------------------------------------------------------------------------
def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    conv = D.parse_conversation(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"},
            ]
        }
    )
    s = D.tokenize_conversation(tok, conv)
    # The ERNIE template written out by hand (ARCHITECTURE.md §6.4), one piece per mask run.
    pieces = [
        ("<|begin_of_sentence|>Be brief.\nUser: Hello\nAssistant: ", False),
        ("Hi there<|end_of_sentence|>", True),
        ("User: Bye\nAssistant: ", False),
        ("Goodbye<|end_of_sentence|>", True),
    ]
    ids = [i for text, _ in pieces for i in tok.encode(text)]
    labels = [i if train else D.IGNORE for text, train in pieces for i in tok.encode(text)]
    assert s.input_ids == ids and s.labels == labels
    assert tok.decode(s.input_ids) == tok.apply_chat_template(conv.messages, add_generation_prompt=False)
    sep = tok.convert_tokens_to_ids("<|end_of_sentence|>")
    assert [i for i in s.labels if i != D.IGNORE].count(sep) == 2
    # The prompt part is exactly what generation feeds the model for the first turn.
    prompt = tok.apply_chat_template(conv.messages[:2], tokenize=True)
    assert s.input_ids[: len(prompt)] == prompt and set(s.labels[: len(prompt)]) == {D.IGNORE}


def test_formats_give_identical_samples(tok):
    as_chat = D.parse_conversation(
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2\nextra"},
                {"role": "assistant", "content": "a2"},
            ]
        }
    )
    erniekit = D.parse_conversation({"system": "sys", "src": ["q1", "q2\nextra"], "tgt": ["a1", "a2"]})
    alpaca = D.parse_conversation(
        {"system": "sys", "history": [["q1", "a1"]], "instruction": "q2", "input": "extra", "output": "a2"}
    )
    ref = D.tokenize_conversation(tok, as_chat)
    for other in (erniekit, alpaca):
        s = D.tokenize_conversation(tok, other)
        assert (s.input_ids, s.labels) == (ref.input_ids, ref.labels)
    # ERNIEKit label 0: the first answer is context only
    ctx = D.tokenize_conversation(
        tok,
        D.parse_conversation(
            {"system": "sys", "src": ["q1", "q2\nextra"], "tgt": ["a1", "a2"], "label": [0, 1]}
        ),
    )
    assert ctx.input_ids == ref.input_ids
    assert [t for t in ctx.labels if t != D.IGNORE] == tok.encode("a2<|end_of_sentence|>")


def test_preference_formats(tok):
    trl = D.parse_preference(
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "chosen": "good",
            "rejected": "bad",
        }
    )
    ek = D.parse_preference(
        {"system": "s", "src": ["q"], "tgt": [], "response": [["bad"], ["good"]], "sort": [0, 1]}
    )
    assert (trl.prompt, trl.chosen, trl.rejected) == (ek.prompt, ek.chosen, ek.rejected)
    ps = D.tokenize_pair(tok, trl)
    prompt = tok.encode("<|begin_of_sentence|>s\nUser: q\nAssistant: ")
    assert ps.chosen.input_ids == prompt + tok.encode("good<|end_of_sentence|>")
    assert [t for t in ps.chosen.labels if t != D.IGNORE] == tok.encode("good<|end_of_sentence|>")
    assert [t for t in ps.rejected.labels if t != D.IGNORE] == tok.encode("bad<|end_of_sentence|>")


def test_validator_reports_bad_lines_with_numbers(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            chat("fine", "ok"),  # 1
            '{"messages": [',  # 2 malformed JSON
            {"src": ["q"]},  # 3 missing tgt
            chat("q", "   "),  # 4 empty assistant turn
            "",  # 5 blank: ignored
            {"messages": [{"role": "bot", "content": "x"}]},  # 6 unknown role
            chat("long " * 40, "x"),  # 7 too long
            {"instruction": "i"},  # 8 missing output
            {"messages": [{"role": "user", "content": "only a question"}]},  # 9 no assistant turn
        ],
    )
    with open(path, "ab") as f:
        f.write(b'{"messages": "\xff"}\n')  # 10 not UTF-8
    problems = D.validate_file(path, tok, max_length=40)
    assert [p.where for p in problems] == [f"line {i}" for i in (2, 3, 4, 6, 7, 8, 9, 10)]
    text = [p.message for p in problems]
    assert text[0].startswith("not valid JSON")
    assert text[1] == "missing field 'tgt'"
    assert text[2] == "message 2: empty assistant turn"
    assert "unknown role 'bot'" in text[3]
    assert re.fullmatch(r"\d+ tokens > --max-length 40", text[4])
    assert text[5] == "missing field 'output'"
    assert text[6] == "the conversation must end with an assistant turn"
    assert text[7] == "not UTF-8 text (byte 15 of the line)"
    assert [p.where for p in D.validate_file(path)] == [f"line {i}" for i in (2, 3, 4, 6, 8, 9, 10)]


def test_validate_cli_and_bad_data_in_training(tmp_path, dense_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows(4) + ['{"broken', chat("q", "")])
    assert cli(["finetune", "--validate", "--data", path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1] for line in out] == ["line 5", "line 6"]
    assert cli(["finetune", "--validate", "--data", write_jsonl(tmp_path / "ok.jsonl", sft_rows(3))]) == 0
    argv = [
        "finetune",
        "--model",
        dense_dir,
        "--data",
        path,
        "--lora-rank",
        "2",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        *FAST,
    ]
    assert cli([*argv, "--out", str(tmp_path / "r1")]) == 1
    err = capsys.readouterr().err
    assert "line 5: not valid JSON" in err and "line 6: message 2: empty assistant turn" in err
    assert "--skip-bad-lines" in err and not (tmp_path / "r1").exists()
    assert cli([*argv, "--out", str(tmp_path / "r2"), "--skip-bad-lines"]) == 0
    err = capsys.readouterr().err
    assert "2 bad record(s)" in err and "line 5" in err and "(skipped)" in err


def test_too_long_policies(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [chat("short", "yes"), chat("q", "answer " * 20), chat("word " * 30, "x")]
    )
    seqs, rep = D.load_sft(path, tok, max_length=32, too_long="skip")
    assert len(seqs) == 1 and [p.where for p in rep.too_long] == ["line 2", "line 3"]
    seqs, rep = D.load_sft(path, tok, max_length=32, too_long="truncate")
    # line 2 keeps the first answer tokens; line 3 has no answer token left within 32 and is skipped (listed)
    assert [s.where for s in seqs] == ["line 1", "line 2"] and rep.truncated == 1
    assert len(seqs[1].input_ids) == 32 and seqs[1].n_targets > 0
    assert [p.where for p in rep.too_long] == ["line 3"]
    with pytest.raises(ErnieError, match=r"line 2: \d+ tokens, longer than --max-length 32"):
        D.load_sft(path, tok, max_length=32, too_long="error")


def test_packing_keeps_tokens_and_labels(tok):
    samples = [D.tokenize_conversation(tok, D.parse_conversation(r)) for r in sft_rows(7)]
    rows = D.pack(samples, max_length=80)
    assert all(len(r.input_ids) <= 80 for r in rows) and len(rows) < len(samples)
    assert [t for r in rows for t in r.input_ids] == [t for s in samples for t in s.input_ids]
    assert [t for r in rows for t in r.labels] == [t for s in samples for t in s.labels]
    assert sum(r.n_targets for r in rows) == sum(s.n_targets for s in samples)


def test_dpo_loss_formula():
    from ernie45.train.dpo import dpo_loss, sequence_logprobs

    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = 0.5 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    assert losses.item() == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)
    assert r_c.item() == pytest.approx(0.5) and r_r.item() == pytest.approx(-0.25)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[D.IGNORE, D.IGNORE, 2, 5]])
    lp = logits.log_softmax(-1)
    assert sequence_logprobs(logits, labels).item() == pytest.approx(
        (lp[0, 1, 2] + lp[0, 2, 5]).item(), abs=1e-6
    )


# ---- training ---------------------------------------------------------------------------------------
def test_lora_training_changes_only_adapter_weights(dense_dir, tmp_path, tok):
    a = FT.FinetuneArgs(model=dense_dir, data="", out=str(tmp_path), lora_rank=4, lr=1e-2)
    model = FT.build_model(a, torch.device("cpu"), bf16=False, resume_dir=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    opt = core.build_optimizer(model, 1e-2, 0.0)
    samples = [D.tokenize_conversation(tok, D.parse_conversation(r)) for r in sft_rows(6)]
    n = sum(s.n_targets for s in samples)
    losses = []
    for _ in range(5):
        losses.append(
            float(FT.sft_micro_step(model, samples, n, len(samples), torch.device("cpu"), False)[0]) / n
        )
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.5
    for name, p in model.named_parameters():
        if ".lora_" in name:
            if "lora_B" in name:
                assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


def test_lora_sft_cli_lowers_loss_and_saves_adapter(dense_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(24))
    ev = write_jsonl(tmp_path / "eval.jsonl", sft_rows(6, offset=100))
    out = tmp_path / "run"
    assert (
        cli(
            [
                "finetune",
                "--model",
                dense_dir,
                "--data",
                data,
                "--eval-data",
                ev,
                "--lora-rank",
                "8",
                "--max-steps",
                "12",
                "--batch-size",
                "8",
                "--lr",
                "1e-2",
                "--eval-every",
                "6",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert log[-1]["eval_loss"] < log[5]["eval_loss"]
    final = out / "final"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.model",
        "training_summary.json",
    } <= set(os.listdir(final))
    # the saved adapter reproduces the eval loss
    from ernie45.train.lora import load_adapter

    model, tok = ernie45.load(dense_dir, dtype="float32", device="cpu")
    load_adapter(model, str(out))  # a run directory resolves to its final/
    seqs, _ = D.load_sft(ev, tok, 2048)
    a = FT.FinetuneArgs(model=dense_dir, data=data, out=str(out), batch_size=8)
    metrics = FT.evaluate(model, None, seqs, a, torch.device("cpu"), False, FT.Dist())
    assert metrics["eval_loss"] == pytest.approx(log[-1]["eval_loss"], abs=1e-5)


def test_qlora_forward_backward_and_loss_falls(dense_dir, tmp_path):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    a = FT.FinetuneArgs(model=dense_dir, data="", out=str(tmp_path), qlora=True, lora_rank=4)
    model = FT.build_model(a, torch.device("cpu"), bf16=False, resume_dir=None)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear4bit) and isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert q.base_layer.weight.quant_type == "nf4" and q.base_layer.weight.quant_state.nested
    assert type(model.lm_head) is torch.nn.Linear
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    out = tmp_path / "run"
    assert (
        cli(
            [
                "finetune",
                "--model",
                dense_dir,
                "--data",
                data,
                "--qlora",
                "--lora-rank",
                "8",
                "--max-steps",
                "8",
                "--batch-size",
                "8",
                "--lr",
                "1e-2",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    log = log_of(out)
    assert log[-1]["loss"] < 0.75 * log[0]["loss"]
    assert (out / "final" / "adapter_model.safetensors").is_file()


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FILLER = ["the", "fox", "dog", "moon", "river", "tree", "sky", "bird", "stone", "rain", "wind", "lamp"]


def digit_task(n: int, seed: int) -> list[tuple[str, str]]:
    """'<filler> number 7 <filler>' -> 'seven': find the digit among filler words and name it."""
    import random

    rng = random.Random(seed)
    items = []
    for _ in range(n):
        d = rng.randrange(10)
        pre = " ".join(rng.choice(FILLER) for _ in range(rng.randrange(1, 4)))
        post = " ".join(rng.choice(FILLER) for _ in range(rng.randrange(0, 3)))
        items.append((f"{pre} number {d} {post}".strip(), WORDS[d]))
    return items


@torch.no_grad()
def exact_match(model, tok, items) -> float:
    """Greedy-decode each prompt (chat template) and compare the whole reply."""
    ok = 0
    for q, a in items:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
        out: list[int] = []
        for _ in range(8):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in tok.stop_token_ids:
                break
        ok += tok.decode(out) == a + "<|end_of_sentence|>"
    return ok / len(items)


@pytest.mark.slow
def test_lora_and_qlora_learn_a_task_the_base_cannot_do(dense_dir, tmp_path):
    """Acceptance: exact match on held-out prompts from ~0 to >= 80% (LoRA) and >= 70% (QLoRA)."""
    from ernie45.train.lora import load_adapter

    train = digit_task(200, seed=0)
    seen = {q for q, _ in train}
    held_out = [t for t in digit_task(60, seed=1) if t[0] not in seen][:30]
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in train])
    base, tok = ernie45.load(dense_dir, dtype="float32", device="cpu")
    assert exact_match(base, tok, held_out) <= 0.1
    for method, floor in (("lora", 0.8), ("qlora", 0.7)):
        out = tmp_path / method
        assert (
            cli(
                [
                    "finetune",
                    "--model",
                    dense_dir,
                    "--data",
                    data,
                    "--lora-rank",
                    "32",
                    "--max-steps",
                    "200",
                    "--batch-size",
                    "16",
                    "--lr",
                    "3e-3",
                    "--warmup",
                    "5",
                    "--out",
                    str(out),
                    *FAST,
                    *(["--qlora"] if method == "qlora" else []),
                ]
            )
            == 0
        )
        model, _ = ernie45.load(dense_dir, dtype="float32", device="cpu")
        load_adapter(model, str(out))
        assert exact_match(model, tok, held_out) >= floor, method


def _pairs(n: int, offset: int = 0) -> list[dict]:
    return [
        {"prompt": f"rate {i}", "chosen": f"good {i % 4}", "rejected": f"bad {i % 4}"}
        for i in range(offset, offset + n)
    ]


def test_dpo_raises_margin_on_held_out_pairs(dense_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", _pairs(16))
    ev = write_jsonl(tmp_path / "pe.jsonl", _pairs(8, offset=50))
    out = tmp_path / "run"
    assert (
        cli(
            [
                "finetune",
                "--model",
                dense_dir,
                "--data",
                data,
                "--eval-data",
                ev,
                "--dpo",
                "--beta",
                "0.5",
                "--lora-rank",
                "8",
                "--max-steps",
                "8",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--eval-every",
                "1",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    log = log_of(out)
    # step 1 starts from policy == reference (lora_B = 0), so its loss is exactly log 2
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    model, tok = ernie45.load(dense_dir, dtype="float32", device="cpu")
    pairs, _ = D.load_preferences(ev, tok, 2048)
    a = FT.FinetuneArgs(model=dense_dir, data=data, out=str(out), dpo=True, beta=0.5, batch_size=4)
    base = FT.evaluate(model, model, pairs, a, torch.device("cpu"), False, FT.Dist())
    assert base["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[-1]["eval_margin"] > base["eval_margin"] + 1.0
    assert log[-1]["eval_loss"] < 0.5 and log[-1]["eval_accuracy"] == 1.0


def test_full_finetune_moe_router_frozen_and_aux_loss(moe_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(8))
    from ernie45.checkpoint_read import read_state_dict

    base = read_state_dict(moe_dir)
    for extra, router_changes in (([], False), (["--train-router"], True)):
        out = tmp_path / f"run{len(extra)}"
        assert (
            cli(
                [
                    "finetune",
                    "--model",
                    moe_dir,
                    "--data",
                    data,
                    "--max-steps",
                    "2",
                    "--batch-size",
                    "4",
                    "--lr",
                    "1e-3",
                    "--out",
                    str(out),
                    *FAST,
                    *extra,
                ]
            )
            == 0
        )
        log = log_of(out)
        assert all(r["aux_loss"] > 0 for r in log)
        new = read_state_dict(str(out / "final"))
        assert not torch.equal(
            new["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"]
        )
        assert torch.equal(
            new["model.layers.1.mlp.moe_statics.e_score_correction_bias"],
            base["model.layers.1.mlp.moe_statics.e_score_correction_bias"],
        )
        assert (
            torch.equal(new["model.layers.2.mlp.gate.weight"], base["model.layers.2.mlp.gate.weight"])
            != router_changes
        )
    # LoRA on MoE: routed experts only with --lora-experts, never the router
    for extra in ([], ["--lora-experts"]):
        out = tmp_path / f"lora{len(extra)}"
        assert (
            cli(
                [
                    "finetune",
                    "--model",
                    moe_dir,
                    "--data",
                    data,
                    "--lora-rank",
                    "2",
                    "--max-steps",
                    "1",
                    "--batch-size",
                    "4",
                    "--out",
                    str(out),
                    *FAST,
                    *extra,
                ]
            )
            == 0
        )
        keys = set(read_state_dict(str(out / "final" / "adapter_model.safetensors")))
        assert ("base_model.model.model.layers.1.mlp.experts.0.up_proj.lora_A.weight" in keys) == bool(extra)
        assert "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_A.weight" in keys
        assert not any(".mlp.gate." in k for k in keys)
        assert "aux_loss" in log_of(out)[0]
    # the MoE full DPO reference is a frozen copy: step 1 loss is exactly log 2
    pairs = write_jsonl(tmp_path / "p.jsonl", _pairs(4))
    assert (
        cli(
            [
                "finetune",
                "--model",
                moe_dir,
                "--data",
                pairs,
                "--dpo",
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "dpo"),
                *FAST,
            ]
        )
        == 0
    )
    assert log_of(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_resume_continues_the_same_curve(dense_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(10))
    argv = [
        "finetune",
        "--model",
        dense_dir,
        "--data",
        data,
        "--lora-rank",
        "4",
        "--lora-dropout",
        "0.1",
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--save-every",
        "2",
        *FAST,
    ]
    assert cli([*argv, "--out", str(tmp_path / "full")]) == 0
    ref = log_of(tmp_path / "full")

    calls = {"n": 0}
    real = FT.sft_micro_step

    def crash_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(FT, "sft_micro_step", crash_at_step_4)
    assert cli([*argv, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(FT, "sft_micro_step", real)
    assert core.list_checkpoints(str(tmp_path / "cut")) == ["step-0000002"]
    assert cli([*argv, "--out", str(tmp_path / "cut")]) == 1  # refuses to mix runs without --resume
    assert cli([*argv, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    got = log_of(tmp_path / "cut")
    assert [r["step"] for r in got] == list(range(1, 7))
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], abs=1e-6), (r, g)
    assert cli([*argv[: -len(FAST)], "--lr", "1e-3", *FAST, "--out", str(tmp_path / "cut"), "--resume"]) == 1


def test_grad_accumulation_matches_one_big_batch(dense_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(12))
    runs = {}
    for bs, acc in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{bs}"
        assert (
            cli(
                [
                    "finetune",
                    "--model",
                    dense_dir,
                    "--data",
                    data,
                    "--lora-rank",
                    "4",
                    "--max-steps",
                    "3",
                    "--batch-size",
                    str(bs),
                    "--grad-accum",
                    str(acc),
                    "--lr",
                    "5e-3",
                    "--out",
                    str(out),
                    *FAST,
                ]
            )
            == 0
        )
        runs[bs] = [r["loss"] for r in log_of(out)]
    for bs in (2, 1):
        assert runs[bs] == pytest.approx(runs[4], rel=1e-5)
    # activation checkpointing recomputes the same numbers
    out = tmp_path / "ckpt"
    assert (
        cli(
            [
                "finetune",
                "--model",
                dense_dir,
                "--data",
                data,
                "--lora-rank",
                "4",
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--lr",
                "5e-3",
                "--gradient-checkpointing",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    assert [r["loss"] for r in log_of(out)] == pytest.approx(runs[4], rel=1e-5)


def test_packing_and_eval_split_run(dense_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(20))
    out = tmp_path / "run"
    assert (
        cli(
            [
                "finetune",
                "--model",
                dense_dir,
                "--data",
                data,
                "--lora-rank",
                "4",
                "--epochs",
                "2",
                "--pack",
                "--max-length",
                "96",
                "--eval-split",
                "0.2",
                "--batch-size",
                "2",
                "--lr",
                "5e-3",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    log = log_of(out)
    summary = json.loads((out / "final" / core.SUMMARY_FILE).read_text())
    assert summary["eval_records"] == 4 and summary["train_records"] < 16  # 16 conversations packed into rows
    assert len(log) == math.ceil(2 * summary["train_records"] / 2) and "eval_loss" in log[-1]
    assert all(r["tokens"] > 2 * 3 for r in log)  # several examples' targets per row


@pytest.mark.slow
def test_torchrun_two_processes_match_one(dense_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(12))
    common = [
        "finetune",
        "--model",
        dense_dir,
        "--data",
        data,
        "--lora-rank",
        "4",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        *FAST,
    ]
    assert cli([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "ernie45",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert [x["loss"] for x in two] == pytest.approx([x["loss"] for x in one], rel=1e-5)
    assert [x["grad_norm"] for x in two] == pytest.approx([x["grad_norm"] for x in one], rel=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-rank", "0"], "--lora-rank must be >= 1"),
        (["--lora-rank", "4", "--target-modules", "gate"], "router mlp.gate is never adapted"),
        (["--lora-rank", "4", "--target-modules", "lm_head"], "unknown --target-modules lm_head"),
        (["--lora-alpha", "16"], "--lora-alpha needs --lora-rank"),
        (["--lora-rank", "4", "--train-router"], "--train-router needs full fine-tuning"),
        (["--dpo", "--pack"], "--pack does not apply to --dpo"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--eval-split", "1.5"], "--eval-split must be in"),
        (["--resume"], "no checkpoint in"),
    ],
)
def test_bad_arguments_give_one_line_errors(dense_dir, tmp_path, capsys, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(2))
    rc = cli(["finetune", "--model", dense_dir, "--data", data, "--out", str(tmp_path / "o"), *FAST, *extra])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err


def test_bad_paths_and_data(dense_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(2))
    cases = [
        (["--model", str(tmp_path / "none"), "--data", data], "checkpoint directory not found"),
        (["--model", dense_dir, "--data", str(tmp_path / "none.jsonl")], "file not found"),
        (
            ["--model", dense_dir, "--data", write_jsonl(tmp_path / "e.jsonl", [])],
            "no usable training records",
        ),
        (
            ["--model", dense_dir, "--data", write_jsonl(tmp_path / "dpo.jsonl", sft_rows(2)), "--dpo"],
            "line 1: missing field 'chosen'",
        ),
    ]
    for args, message in cases:
        assert cli(["finetune", *args, "--out", str(tmp_path / "o"), *FAST]) == 1
        assert message in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert (
        cli(["finetune", "--model", dense_dir, "--data", data, "--out", str(tmp_path / "busy"), *FAST]) == 1
    )
    assert "not empty" in capsys.readouterr().err
    assert cli(["finetune", "--data", data]) == 1


# ---- the guide ---------------------------------------------------------------------------------------
def test_docs_commands_run(dense_dir, tmp_path, monkeypatch):
    """Run every `ernie45 finetune` / `merge-lora` command of docs/finetune.md on the tiny model, with the
    guide's own JSON examples as data (steps cut to 2 for speed)."""
    text = open(os.path.join(ROOT, "docs", "finetune.md"), encoding="utf-8").read()
    examples = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", text, re.S)]
    sft = [e for e in examples if "response" not in e and "chosen" not in e]
    prefs = [e for e in examples if "response" in e or "chosen" in e]
    assert len(sft) == 3 and len(prefs) == 2
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "sft.jsonl", sft * 3)
    write_jsonl(tmp_path / "data" / "eval.jsonl", sft)
    write_jsonl(tmp_path / "data" / "dpo.jsonl", prefs * 2)
    monkeypatch.chdir(tmp_path)
    ran = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(cmd.replace("./ERNIE-4.5-0.3B-PT", dense_dir))
            if argv[0] == "torchrun":
                argv = argv[argv.index("ernie45") :]
            if argv[:2] not in (["ernie45", "finetune"], ["ernie45", "merge-lora"]):
                continue
            argv = " ".join(argv[1:])
            argv = re.sub(r"--(epochs|max-steps) \d+", "--max-steps 2", argv)
            argv = re.sub(r"--batch-size \d+", "--batch-size 2", argv)
            argv = re.sub(r"--save-every \d+", "--save-every 1", argv)  # so that --resume finds a checkpoint
            argv = re.sub(r"--max-length \d+", "--max-length 256", argv).split()
            if argv[0] == "finetune" and "--validate" not in argv:
                argv += FAST
            assert cli(argv) == 0, argv
            ran.append(argv[0] + (" --resume" if "--resume" in argv else ""))
    assert ran.count("finetune") == 5 and "finetune --resume" in ran and "merge-lora" in ran
    ernie45.load(str(tmp_path / "ERNIE-4.5-0.3B-sft"), dtype="float32", device="cpu")
    zh = open(os.path.join(ROOT, "docs", "finetune_zh.md"), encoding="utf-8").read()
    assert re.findall(r"```(?:bash|json)\n.*?```", zh, re.S) == re.findall(
        r"```(?:bash|json)\n.*?```", text, re.S
    )
