"""`ernie45 eval`: official-format readers, prompts, scores equal to lm-eval's, perplexity, resume, bad input."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil

import pytest
import torch
from conftest import make_hf_model, save_hf

from ernie45.cli import main as cli_main
from ernie45.errors import ErnieError
from ernie45.eval import cli as eval_cli
from ernie45.eval import scoring
from ernie45.eval.scoring import encode_pair, sliding_windows
from ernie45.eval.tasks import load_subsets

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "eval")
ROOT = os.path.dirname(HERE)
SHOTS = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random transformers ERNIE checkpoint plus a tokenizer trained on the fixture texts."""
    from ernie45.data.train_tokenizer import train_tokenizer

    texts = []
    for f in sorted(glob.glob(os.path.join(FIX, "**", "*.*"), recursive=True)):
        with open(f, encoding="utf-8") as fh:
            texts += fh.read().splitlines()
    tok = tmp_path_factory.mktemp("evaltok")
    train_tokenizer(texts, tok, vocab_size=1200)
    hf = make_hf_model("dense", vocab_size=1280, max_position_embeddings=512, num_hidden_layers=2)
    return save_hf(hf, tmp_path_factory.mktemp("evalmodel") / "m", str(tok))


@pytest.fixture(scope="module")
def ernie(model_dir):
    import ernie45

    return ernie45.load(model_dir, dtype="float32", device="cpu")


def native_run(model, tok, subsets, tmp_path) -> tuple[dict, dict[str, list[float]]]:
    """`score_subsets`' report, and the log-likelihoods it computed (read back from its resume log) per subset."""
    log = eval_cli.ResumeLog(str(tmp_path / "run.partial"), "test")
    report = eval_cli.score_subsets(model, tok, subsets, batch_size=8, log=log)
    return report, {s.name: [ll for item in log.done[f"{s.name}/0"] for ll in item] for s in subsets}


def harness_lls(samples) -> list[float]:
    return [float(r[0][0]) for s in samples for r in s["resps"]]


# ---- readers and prompts -----------------------------------------------------------------------------------------


def test_ceval_prompt_is_lm_evals_layout():
    sub = load_subsets("ceval", os.path.join(FIX, "ceval"), shots=1)
    assert [s.name for s in sub] == ["computer_network", "logic"]  # C-Eval's subject order
    ex = sub[0].examples[2]
    assert ex.context == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
        "使用位填充方法，以01111110为位首flag，数据为011011111111111111110010，求问传送时要添加几个0____\n"
        "A. 1\nB. 2\nC. 3\nD. 4\n答案： C\n\n"
        "用于将域名解析为IP地址的协议是____,它通常使用UDP。\nA. DHCP\nB. DNS\nC. SMTP\nD. ICMP\n答案："
    )
    assert ex.continuations == [" A", " B", " C", " D"] and ex.gold == 1


def test_cmmlu_reader_keeps_strings_and_multiline_questions():
    sub = load_subsets("cmmlu", os.path.join(FIX, "cmmlu"))
    agronomy, anatomy = sub
    assert agronomy.examples[3].context.endswith("\nA. 30\nB. 50\nC. 69\nD. 3.50\n答案：")
    assert agronomy.examples[3].context.startswith(
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n每公顷"
    )
    assert "正确的是____。\n（多行题干）\nA. 左肺三叶" in anatomy.examples[1].context
    assert [e.gold for e in anatomy.examples] == [1, 1, 1]


def test_clue_readers_official_fields():
    wsc = load_subsets("clue-cluewsc2020", os.path.join(FIX, "clue"), shots=1)[0]
    assert wsc.examples[1].context == (
        "我在游泳池边看到了一张床，看起来很舒服，于是我决定买下它，可是它太重了，我搬不动它。\n"
        "问题：句中的“它”指的是“床”吗？\n回答：否\n\n"
        "这个奖杯放不进手提箱，因为它太小了。\n问题：句中的“它”指的是“奖杯”吗？\n回答："
    )
    assert wsc.examples[1].continuations == ["否", "是"] and wsc.examples[1].gold == 0
    assert (
        len(load_subsets("clue-cmnli", os.path.join(FIX, "clue"))[0].examples) == 4
    )  # the "-" row is skipped
    ifly = load_subsets("clue-iflytek", os.path.join(FIX, "clue", "iflytek_public"))[0]
    assert ifly.examples[0].choices == ["打车", "地图导航", "免费WIFI", "租车", "同城服务"]
    assert [e.gold for e in ifly.examples] == [2, 4, 0]
    csl = load_subsets("clue-csl", os.path.join(FIX, "clue"))[0]
    assert "关键词：交通流量，信号灯配时，蛋白质折叠\n" in csl.examples[1].context


def test_encode_pair_and_windows():
    enc = list  # characters as tokens: the seam handling is what is checked
    assert encode_pair(enc, "答案： ", "A") == (list("答案："), list(" A"))
    for n, window, stride in [(2, 4, 1), (10, 4, 2), (101, 16, 5), (17, 16, 15)]:
        wins = sliding_windows(n, window, stride)
        scored = [t for _, first, end in wins for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(
            end - begin <= window and first - begin >= (1 if begin == 0 else window - stride)
            for begin, first, end in wins
        )


# ---- scores equal lm-eval's ---------------------------------------------------------------------------------------

LM_EVAL_TASKS = {  # our native task -> (data dir, lm-eval task names of its subsets)
    "ceval": ("ceval", ["ernie45_ceval_computer_network", "ernie45_ceval_logic"]),
    "cmmlu": ("cmmlu", ["ernie45_cmmlu_agronomy", "ernie45_cmmlu_anatomy"]),
    "clue-afqmc": ("clue", ["ernie45_clue_afqmc"]),
    "clue-iflytek": ("clue", ["ernie45_clue_iflytek"]),
}


@pytest.fixture(scope="module")
def harness(ernie, tmp_path_factory):
    """One lm-eval run of the ernie45 model over our YAMLs (plus a micro-averaged C-Eval group) on the fixtures."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from ernie45.eval.lm_eval_model import TASKS_DIR, Ernie45LM

    extra = tmp_path_factory.mktemp("groups")
    (extra / "g.yaml").write_text(
        "group: fixture_ceval\ntask:\n  - ernie45_ceval_computer_network\n  - ernie45_ceval_logic\n"
        "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n",
        "utf-8",
    )
    meta = {f"{k}_dir": os.path.join(FIX, k) for k in ("ceval", "cmmlu", "clue")}
    tm = TaskManager(include_path=[TASKS_DIR, str(extra)], include_defaults=False, metadata=meta)
    model, tok = ernie
    names = ["fixture_ceval"] + [t for _, ts in list(LM_EVAL_TASKS.values())[1:] for t in ts]
    return lm_eval.simple_evaluate(
        model=Ernie45LM(model=model, tokenizer=tok, batch_size=8),
        tasks=names,
        num_fewshot=SHOTS,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,
    )


@pytest.mark.parametrize("task", list(LM_EVAL_TASKS))
def test_native_scores_equal_lm_eval(task, ernie, harness, tmp_path):
    model, tok = ernie
    data, names = LM_EVAL_TASKS[task]
    subsets = load_subsets(task, os.path.join(FIX, data), shots=SHOTS)
    native, lls = native_run(model, tok, subsets, tmp_path)
    for s, name in zip(subsets, names):
        theirs = harness["results"][name]
        assert native["subsets"][s.name]["acc"] == pytest.approx(theirs["acc,none"], abs=1e-6)
        assert native["subsets"][s.name]["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-6)
        samples = harness["samples"][name]
        assert [smp["arguments"][0][0] for smp in samples] == [ex.context for ex in s.examples]
        assert [[a[1] for a in smp["arguments"]] for smp in samples] == [
            ex.continuations for ex in s.examples
        ]
        assert [smp["target"] for smp in samples] == [ex.gold for ex in s.examples]
        assert harness_lls(samples) == pytest.approx(lls[s.name], abs=1e-4)
    if task == "ceval":
        assert native["micro"]["acc"] == pytest.approx(
            harness["results"]["fixture_ceval"]["acc,none"], abs=1e-6
        )
        macro = sum(harness["results"][n]["acc,none"] for n in names) / len(names)
        assert native["macro"]["acc"] == pytest.approx(macro, abs=1e-6)


def test_loglikelihoods_equal_hflm_over_transformers(model_dir, ernie, tmp_path):
    """An independent scorer: lm-eval's HFLM over the transformers model on the same weights."""
    lm_eval = pytest.importorskip("lm_eval")
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ernie45.eval.lm_eval_model import TASKS_DIR

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hflm = HFLM(
        pretrained=hf,
        tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir),
        batch_size=4,
        device="cpu",
    )
    tm = TaskManager(
        include_path=TASKS_DIR,
        include_defaults=False,
        metadata={"ceval_dir": os.path.join(FIX, "ceval"), "clue_dir": os.path.join(FIX, "clue")},
    )
    res = lm_eval.simple_evaluate(
        model=hflm,
        tasks=["ernie45_ceval_logic", "ernie45_clue_csl"],
        num_fewshot=1,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,
    )
    model, tok = ernie
    for task, data, name in [
        ("ceval", "ceval", "ernie45_ceval_logic"),
        ("clue-csl", "clue", "ernie45_clue_csl"),
    ]:
        subset = [s for s in load_subsets(task, os.path.join(FIX, data), shots=1) if name.endswith(s.name)]
        report, lls = native_run(model, tok, subset, tmp_path / task)
        native = report["subsets"][subset[0].name]
        assert native["acc"] == pytest.approx(res["results"][name]["acc,none"], abs=1e-6)
        assert native["acc_norm"] == pytest.approx(res["results"][name]["acc_norm,none"], abs=1e-6)
        assert harness_lls(res["samples"][name]) == pytest.approx(lls[subset[0].name], abs=1e-4)

    # Rolling log-likelihood (lm-eval's perplexity tasks) over a text longer than a 48-token context.
    from lm_eval.api.instance import Instance

    from ernie45.eval.lm_eval_model import Ernie45LM

    with open(os.path.join(FIX, "ppl", "sample.txt"), encoding="utf-8") as f:
        reqs = [Instance("loglikelihood_rolling", {}, (f.read(),), 0)]
    ours = Ernie45LM(model=model, tokenizer=tok, batch_size=4, max_length=48).loglikelihood_rolling(reqs)
    short = HFLM(pretrained=hf, tokenizer=hflm.tokenizer, batch_size=4, device="cpu", max_length=48)
    assert ours == pytest.approx(short.loglikelihood_rolling(reqs), rel=1e-5)


# ---- perplexity ---------------------------------------------------------------------------------------------------


def test_perplexity_equals_direct_sliding_window(model_dir, ernie, tmp_path):
    """`ernie45 eval --task ppl` equals exp(mean NLL) from transformers' own loss, window by window (HF recipe)."""
    import transformers

    model, tok = ernie
    text_file = os.path.join(FIX, "ppl", "sample.txt")
    ids = eval_cli.document_ids(tok, text_file)
    window, stride = 64, 24
    assert len(ids) > 3 * window  # longer than the context window
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    nll, count, prev_end = 0.0, 0, 0
    x = torch.tensor([ids])
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            labels = x[:, begin:end].clone()
            labels[:, : -(end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll += hf(x[:, begin:end], labels=labels).loss.item() * n
            count += n
            prev_end = end
            if end == len(ids):
                break
    out = tmp_path / "ppl.json"
    report = eval_cli.run_eval(
        model_dir,
        "ppl",
        text_file,
        str(out),
        window=window,
        stride=stride,
        batch_size=3,
        dtype="float32",
        device="cpu",
        progress=False,
    )
    assert count == len(ids) - 1 == report["results"]["tokens"]
    assert report["results"]["ppl"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-5)
    assert json.loads(out.read_text("utf-8"))["results"]["ppl"] == report["results"]["ppl"]
    assert report["config"]["window"] == window and report["config"]["stride"] == stride


# ---- the command: report, resume, fingerprint ------------------------------------------------------------------


def test_cli_report_and_resume_after_interruption(model_dir, ernie, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ceval.json"
    args = [
        "eval",
        "--model",
        model_dir,
        "--task",
        "ceval",
        "--data-dir",
        os.path.join(FIX, "ceval"),
        "--shots",
        "1",
        "--limit",
        "2",
        "--batch-size",
        "3",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    calls = []
    real = scoring.loglikelihoods

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # dies while scoring the second subject
        return real(*a, **k)

    monkeypatch.setattr(scoring, "loglikelihoods", interrupted)
    assert cli_main(args) == 130
    assert not out.exists()
    partial = (tmp_path / "ceval.json.partial").read_text("utf-8").splitlines()
    assert len(partial) == 2 and json.loads(partial[1])["key"] == "computer_network/0"

    monkeypatch.setattr(scoring, "loglikelihoods", real)
    assert cli_main(args) == 0
    table = capsys.readouterr().out
    assert re.search(r"computer_network\s+2\s+\d\.\d{4}\s+\d\.\d{4}", table) and "micro average" in table
    report = json.loads(out.read_text("utf-8"))
    assert report["timings"]["resumed_chunks"] == 1 and not (tmp_path / "ceval.json.partial").exists()
    model, tok = ernie
    expected = eval_cli.score_subsets(model, tok, load_subsets("ceval", os.path.join(FIX, "ceval"), 1, 2))
    assert report["results"] == expected  # the resumed chunk holds the very numbers a clean run computes
    assert report["config"]["shots"] == 1 and report["config"]["limit"] == 2
    assert report["model"]["fingerprint"] == eval_cli.model_fingerprint(model_dir)
    assert report["timings"]["requests"] == 16 and report["timings"]["seconds"] > 0


def test_model_fingerprint_follows_the_weights(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert eval_cli.model_fingerprint(str(copy)) == eval_cli.model_fingerprint(model_dir)
    sd = load_file(os.path.join(copy, "model.safetensors"))
    name = sorted(sd)[-1]
    sd[name] = sd[name] + 1e-3
    save_file(sd, os.path.join(copy, "model.safetensors"), metadata={"format": "pt"})
    assert eval_cli.model_fingerprint(str(copy)) != eval_cli.model_fingerprint(model_dir)


# ---- bad input ----------------------------------------------------------------------------------------------------


def _copy(kind: str, tmp_path) -> str:
    return shutil.copytree(os.path.join(FIX, kind), tmp_path / kind)


def _rewrite(path: str, fn) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(fn(text))


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing column", r"logic_val\.csv: missing column\(s\) D"),
        ("answer E", r"computer_network_val\.csv, line 3: answer must be one of A, B, C, D, got 'E'"),
        ("empty split", r"logic_val\.csv: no rows \(empty split\)"),
        ("short row", r"logic_val\.csv, row 2 \(line 3\): 6 fields, expected 7"),
        ("unknown subject", r"unknown C-Eval subject\(s\) cooking"),
        ("too many shots", r"subject computer_network has 5 dev examples; --shots must be at most that"),
    ],
)
def test_bad_ceval_input_names_file_and_row(case, pattern, tmp_path):
    d = _copy("ceval", tmp_path)
    val = os.path.join(d, "val")
    shots = 0
    if case == "missing column":
        _rewrite(os.path.join(val, "logic_val.csv"), lambda t: re.sub(r",D(?=,answer)", "", t, count=1))
    elif case == "answer E":
        _rewrite(
            os.path.join(val, "computer_network_val.csv"),
            lambda t: t.replace("48位,64位,128位,B", "48位,64位,128位,E"),
        )
    elif case == "empty split":
        _rewrite(os.path.join(val, "logic_val.csv"), lambda t: t.splitlines()[0] + "\n")
    elif case == "short row":
        _rewrite(os.path.join(val, "logic_val.csv"), lambda t: t.replace(",科学归纳推理,C", ",C"))
    elif case == "unknown subject":
        shutil.copy(os.path.join(val, "logic_val.csv"), os.path.join(val, "cooking_val.csv"))
    else:
        shots = 6
    with pytest.raises(ErnieError, match=pattern):
        load_subsets("ceval", d, shots=shots)


def test_bad_cmmlu_and_clue_input(tmp_path):
    d = _copy("cmmlu", tmp_path)
    _rewrite(
        os.path.join(d, "test", "anatomy.csv"),
        lambda t: t.replace("肝细胞,胰腺,十二指肠,B", "肝细胞,胰腺,十二指肠,b"),
    )
    with pytest.raises(ErnieError, match=r"anatomy\.csv, line 5: answer must be one of A, B, C, D, got 'b'"):
        load_subsets("cmmlu", d)
    c = _copy("clue", tmp_path)
    _rewrite(
        os.path.join(c, "afqmc_public", "dev.json"), lambda t: t.replace('"label": "1"}', '"label": "2"}', 1)
    )
    with pytest.raises(ErnieError, match=r"afqmc_public/dev\.json, line 1: label '2' is not one of 0, 1"):
        load_subsets("clue-afqmc", c)
    _rewrite(os.path.join(c, "tnews_public", "dev.json"), lambda t: t + "{not json\n")
    with pytest.raises(ErnieError, match=r"tnews_public/dev\.json, line 5: not valid JSON"):
        load_subsets("clue-tnews", c)
    os.remove(os.path.join(c, "iflytek_public", "labels.json"))
    with pytest.raises(ErnieError, match="needs the official labels.json"):
        load_subsets("clue-iflytek", c)
    with pytest.raises(ErnieError, match="no dev.json for CLUE csl"):
        load_subsets("clue-csl", tmp_path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--task", "mmlu", "--data-dir", FIX],
            "unknown task 'mmlu'; choose one of ceval, cmmlu, clue-afqmc",
        ),
        (
            ["--task", "ceval", "--data-dir", "/nonexistent/ceval"],
            "C-Eval data directory not found: /nonexistent/ceval",
        ),
        (["--task", "ceval", "--data-dir", FIX], "has no val/ folder"),
        (["--task", "ceval", "--data-dir", FIX, "--batch-size", "0"], "--batch-size must be at least 1"),
        (
            ["--task", "ceval", "--data-dir", FIX, "--window", "8"],
            "--window and --stride apply to --task ppl only",
        ),
        (["--task", "ppl", "--data-dir", "/nonexistent.txt"], "perplexity data not found"),
    ],
)
def test_cli_errors_are_one_line(extra, message, tmp_path, capsys):
    rc = cli_main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "r.json"), *extra])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


# ---- the guide's commands -----------------------------------------------------------------------------------------


def _guide_commands(prefix: str, guide: str = "eval.md") -> list[str]:
    with open(os.path.join(ROOT, "docs", guide), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    cmds = [c.strip() for b in blocks for c in b.replace("\\\n", " ").splitlines()]
    return [c for c in cmds if c.startswith(prefix)]


def _substitute(cmd: str, model_dir: str, tmp_path) -> str:
    cmd = cmd.replace("ERNIE-4.5-0.3B-PT", model_dir).replace(
        "data/wiki.txt", os.path.join(FIX, "ppl", "sample.txt")
    )
    cmd = re.sub(r"data/(ceval|cmmlu|clue)", lambda m: os.path.join(FIX, m.group(1)), cmd)
    return cmd.replace("results/", f"{tmp_path}/")


def test_guide_commands_run(model_dir, tmp_path):
    cmds = _guide_commands("ernie45 eval")
    assert len(cmds) >= 4 and _guide_commands("", "eval_zh.md") == _guide_commands(
        ""
    )  # the Chinese guide agrees
    for cmd in cmds:
        argv = shlex.split(_substitute(cmd, model_dir, tmp_path))[1:]
        if "ppl" not in argv:
            argv += ["--limit", "1"]  # the whole fixture is covered by the tests above
        assert cli_main(argv + ["--dtype", "float32", "--device", "cpu", "--no-progress"]) == 0, cmd
        report = json.loads(open(argv[argv.index("--out") + 1], encoding="utf-8").read())
        assert report["task"] == argv[argv.index("--task") + 1]


@pytest.mark.slow
def test_guide_lm_eval_command_runs(model_dir, tmp_path, monkeypatch):
    """The documented `python -m ernie45.eval.lm_eval_run` line, through lm-eval's own command line."""
    pytest.importorskip("lm_eval")
    from ernie45.eval.lm_eval_run import main as lm_eval_main

    (cmd,) = _guide_commands("python -m ernie45.eval.lm_eval_run")
    cmd = _substitute(cmd, model_dir, tmp_path).replace("dtype=bfloat16", "dtype=float32")
    argv = [("ernie45_ceval_logic" if a == "ernie45_ceval" else a) for a in shlex.split(cmd)[3:]]
    monkeypatch.chdir(tmp_path)
    lm_eval_main(argv + ["--device", "cpu", "--limit", "2"])
    (result,) = glob.glob(str(tmp_path / "lm-eval" / "**" / "results_*.json"), recursive=True)
    with open(result, encoding="utf-8") as f:
        acc = json.load(f)["results"]["ernie45_ceval_logic"]["acc,none"]
    import ernie45

    model, tok = ernie45.load(model_dir, dtype="float32", device="cpu")
    shots = int(argv[argv.index("--num_fewshot") + 1])
    subset = [s for s in load_subsets("ceval", os.path.join(FIX, "ceval"), shots, 2) if s.name == "logic"]
    assert eval_cli.score_subsets(model, tok, subset)["subsets"]["logic"]["acc"] == pytest.approx(
        acc, abs=1e-6
    )


def test_task_yamls_cover_every_subject():
    """One lm-eval task per C-Eval / CMMLU subject and CLUE task, each with the native prompt's description."""
    pytest.importorskip("lm_eval")
    import yaml

    from ernie45.eval.lm_eval_model import TASKS_DIR
    from ernie45.eval.subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS
    from ernie45.eval.tasks import CEVAL_DESCRIPTION, CLUE_TASKS, CMMLU_DESCRIPTION

    for kind, subjects, desc in [
        ("ceval", CEVAL_SUBJECTS, CEVAL_DESCRIPTION),
        ("cmmlu", CMMLU_SUBJECTS, CMMLU_DESCRIPTION),
    ]:
        files = sorted(glob.glob(os.path.join(TASKS_DIR, kind, f"ernie45_{kind}_*.yaml")))
        docs = [yaml.safe_load(open(f, encoding="utf-8")) for f in files]
        assert {d["dataset_kwargs"]["subject"]: d["description"] for d in docs} == {
            s: desc.format(zh) for s, zh in subjects.items()
        }
        assert all(d["task"] == f"ernie45_{kind}_{d['dataset_kwargs']['subject']}" for d in docs)
        group = yaml.safe_load(open(os.path.join(TASKS_DIR, kind, f"_ernie45_{kind}.yaml"), encoding="utf-8"))
        assert group["task"] == [f"ernie45_{kind}_{s}" for s in subjects]
    group = yaml.safe_load(open(os.path.join(TASKS_DIR, "clue", "_ernie45_clue.yaml"), encoding="utf-8"))
    assert group["task"] == [f"ernie45_clue_{n}" for n in CLUE_TASKS]
