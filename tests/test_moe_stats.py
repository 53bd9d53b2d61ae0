"""`ernie45 moe-stats`: counts against the model's own dispatch, figures against scipy, aux loss against
transformers, valid PNGs, the documented commands, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
from conftest import CORPUS, make_hf_model, save_hf

from ernie45.cli import main as cli
from ernie45.errors import ErnieError

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
TEXTS = CORPUS[:5]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads spin badly when the CPUs are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer_dir):
    hf = make_hf_model("moe", bias_scale=0.3)
    return hf, save_hf(hf, tmp_path_factory.mktemp("moe") / "moe", tokenizer_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "texts.jsonl"
    p.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def report(moe_dir, data_file, tmp_path_factory):
    from ernie45.moe_stats import moe_stats

    out = str(tmp_path_factory.mktemp("report") / "out")
    return moe_stats(
        moe_dir[1], data_file, out, sample=1, grid_tokens=12, dtype="float32", progress=False
    ), out


def dispatched_counts(model_dir: str, texts: list[str]) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Reference: hook every MoE block and ask its own `route` which experts each token goes to."""
    import ernie45
    from ernie45.model import MoE

    model, tok = ernie45.load(model_dir, dtype="float32", device="cpu")
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    seen: list[np.ndarray] = []

    def hook(module, args):
        x = args[0]
        _, _, idx = module.route(x.reshape(-1, x.shape[-1]))
        seen.append(idx.numpy())

    handles = [b.register_forward_pre_hook(hook) for b in blocks]
    counts = np.zeros((len(blocks), model.config.moe_num_experts), np.int64)
    per_sample = []
    with torch.no_grad():
        for t in texts:
            seen.clear()
            model(torch.tensor([tok.encode(t)]))
            per_sample.append(list(seen))
            for row, idx in enumerate(seen):
                counts[row] += np.bincount(idx.ravel(), minlength=counts.shape[1])
    for h in handles:
        h.remove()
    return counts, per_sample


def test_counts_match_dispatch_exactly(report, moe_dir):
    result, _ = report
    counts, per_sample = dispatched_counts(moe_dir[1], TEXTS)
    got = np.array([f["counts"] for f in result["layers"]])
    np.testing.assert_array_equal(got, counts)
    assert got.sum() == result["tokens"] * result["top_k"] * len(result["moe_layers"])
    assert (
        result["moe_layers"] == [1, 2, 3] and result["num_experts"] == 6 and result["samples"] == len(TEXTS)
    )
    # The grid's sample: same experts per token and layer as the dispatch (first 12 tokens of sample 1).
    grid = np.array(result["sample"]["experts"])  # (S, L, K)
    ref = np.stack(per_sample[1], axis=1)[:12]
    np.testing.assert_array_equal(np.sort(grid, -1), np.sort(ref, -1))
    w = np.array(result["sample"]["weights"])
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


def test_next_token_shared_experts_match_dispatch(report, moe_dir):
    """`next_token_shared`: per layer, the mean count of experts a token shares with the token before it in its
    sample (what verifying a speculative draft re-reads), from the blocks' own dispatch; the overall figure is the
    layers' mean, beside the k^2 / E of random routing."""
    result, _ = report
    _, per_sample = dispatched_counts(moe_dir[1], TEXTS)
    L = len(result["moe_layers"])
    shared, pairs = [0] * L, 0
    for layers in per_sample:  # [layer] -> (S, K) expert ids
        pairs += layers[0].shape[0] - 1
        for row, idx in enumerate(layers):
            shared[row] += sum(len(set(a) & set(b)) for a, b in zip(idx[:-1].tolist(), idx[1:].tolist()))
    assert [f["next_token_shared"] for f in result["layers"]] == [x / pairs for x in shared]
    assert result["next_token_shared"] == pytest.approx(sum(shared) / (pairs * L), rel=1e-12)
    assert result["next_token_shared_random"] == result["top_k"] ** 2 / result["num_experts"]
    assert all(0 <= f["next_token_shared"] <= result["top_k"] for f in result["layers"])


def test_imbalance_figures_match_scipy(report):
    from scipy import stats as ss

    result, _ = report
    E = result["num_experts"]
    for f in result["layers"]:
        c = np.array(f["counts"], dtype=np.float64)
        assert f["cv"] == pytest.approx(ss.variation(c), rel=1e-12)
        assert f["max_over_mean"] == pytest.approx(c.max() / c.mean(), rel=1e-12)
        assert f["entropy"] == pytest.approx(ss.entropy(c), rel=1e-12)
        assert f["normalized_entropy"] == pytest.approx(ss.entropy(c) / np.log(E), rel=1e-12)
        assert f["load"] == pytest.approx((c / c.sum()).tolist())
        assert sum(f["mean_prob"]) == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_equals_models(report, moe_dir):
    """Per sample: the model's aux_loss and transformers' aux_loss; overall: a padded transformers batch."""
    import ernie45

    result, _ = report
    hf, path = moe_dir
    model, tok = ernie45.load(path, dtype="float32", device="cpu")
    ids = [tok.encode(t) for t in TEXTS]
    with torch.no_grad():
        for i, s in enumerate(ids):
            ours = model(torch.tensor([s]), output_router_logits=True).aux_loss
            theirs = hf(torch.tensor([s]), output_router_logits=True).aux_loss
            assert result["aux_loss_per_sample"][i] == float(ours)
            assert result["aux_loss_per_sample"][i] == pytest.approx(float(theirs), abs=1e-5)
        width = max(map(len, ids))
        batch = torch.tensor([[0] * (width - len(s)) + s for s in ids])  # left padded
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
        theirs = hf(batch, attention_mask=mask, output_router_logits=True).aux_loss
    assert result["aux_loss"] == pytest.approx(float(theirs), abs=1e-5)
    assert result["router_aux_loss_coef"] == model.config.router_aux_loss_coef


def test_pictures_and_json(report):
    from PIL import Image

    result, out = report
    assert sorted(os.listdir(out)) == ["imbalance.png", "load_heatmap.png", "stats.json", "token_experts.png"]
    for name in ("imbalance.png", "load_heatmap.png", "token_experts.png"):
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200
            im.verify()
    with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    # Sample 1 is the second poem; its labels are its characters.
    assert "".join(result["sample"]["tokens"]).startswith(TEXTS[1][:6])


def test_cjk_font_used_or_clean_fallback(moe_dir, data_file, tmp_path, monkeypatch):
    from ernie45 import moe_stats as ms

    if os.path.exists("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"):
        assert ms.find_cjk_font() == "WenQuanYi Micro Hei"
    monkeypatch.setattr(ms, "find_cjk_font", lambda: None)
    with pytest.warns(UserWarning, match="no CJK font found") as record:
        ms.moe_stats(moe_dir[1], data_file, str(tmp_path / "o"), max_samples=1, progress=False)
    assert not [w for w in record if "Glyph" in str(w.message)]  # one clear warning, not one per glyph
    assert os.path.isfile(tmp_path / "o" / "token_experts.png")


def doc_commands(doc: str) -> list[str]:
    with open(os.path.join(DOCS, doc), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    return [ln for b in blocks for ln in b.splitlines() if ln.startswith("ernie45 moe-stats")]


def test_documented_commands_run(moe_dir, data_file, tmp_path, capsys):
    """Every `ernie45 moe-stats` line of docs/moe_stats.md runs, with the tiny model and data swapped in."""
    lines = doc_commands("moe_stats.md")
    assert len(lines) >= 2 and doc_commands("moe_stats_zh.md") == lines
    for n, line in enumerate(lines):
        out = tmp_path / f"report{n}"
        swap = {"ERNIE-4.5-21B-A3B-PT": moe_dir[1], "texts.jsonl": data_file, "moe_report": str(out)}
        assert cli([swap.get(a, a) for a in shlex.split(line)[1:]]) == 0, line
        with open(out / "stats.json", encoding="utf-8") as f:
            stats = json.load(f)
        assert stats["samples"] == len(TEXTS) and stats["sample"]["index"] == (2 if "--sample" in line else 0)
    assert "aux loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "model path not found"),
        ("missing_data", "data file not found"),
        ("dense", "is a dense model"),
        ("bad_json", "line 2: not valid JSON"),
        ("no_text", "no text samples"),
        ("sample_range", "--sample 9 is out of range"),
        ("max_length", "--max-length must be between 1 and"),
        ("out_exists", "destination exists"),
    ],
)
def test_bad_input_is_one_clear_error(case, message, moe_dir, data_file, tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "out"
    args = {"--model": moe_dir[1], "--data": data_file, "--out": str(out)}
    extra: list[str] = []
    if case == "missing_model":
        args["--model"] = str(tmp_path / "nope")
    elif case == "missing_data":
        args["--data"] = str(tmp_path / "nope.jsonl")
    elif case == "dense":
        args["--model"] = save_hf(make_hf_model("dense"), tmp_path / "dense", tokenizer_dir)
    elif case == "bad_json":
        (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
        args["--data"] = str(tmp_path / "bad.jsonl")
    elif case == "no_text":
        (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
        args["--data"] = str(tmp_path / "empty.txt")
    elif case == "sample_range":
        extra = ["--sample", "9"]
    elif case == "max_length":
        extra = ["--max-length", "100000"]
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    argv = ["moe-stats", *[x for kv in args.items() for x in kv], *extra]
    capsys.readouterr()
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    if case == "out_exists":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()


def test_plain_text_data(moe_dir, tmp_path):
    from ernie45.moe_stats import read_texts

    p = tmp_path / "t.txt"
    p.write_text("一行\n\n第二行\n", encoding="utf-8")
    assert read_texts(str(p), 10) == ["一行", "第二行"]
    assert read_texts(str(p), 1) == ["一行"]
    with pytest.raises(ErnieError, match="not UTF-8"):
        (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
        read_texts(str(tmp_path / "b.txt"), 10)


def test_example_script(moe_dir, tmp_path, monkeypatch, capsys, tokenizer_dir):
    import runpy
    import sys

    from PIL import Image

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "moe", "routing_visualization.py")
    out = tmp_path / "heat.png"
    monkeypatch.setattr(sys, "argv", [script, "--model", moe_dir[1], "--out", str(out), *TEXTS[:2]])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert printed.count("layer ") == 3 and f"wrote {out}" in printed
    with Image.open(out) as im:
        assert im.format == "PNG"
    dense = save_hf(make_hf_model("dense"), tmp_path / "dense", tokenizer_dir)
    monkeypatch.setattr(sys, "argv", [script, "--model", dense])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 2 and "dense model" in capsys.readouterr().err
