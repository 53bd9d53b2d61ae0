"""`ernie45 bench` on the tiny shape: the JSON rows and Markdown table it writes, the bytes-per-token floor, errors."""

from __future__ import annotations

import json

import pytest
import torch

from ernie45.bench import SHAPES, decode_bytes_per_token
from ernie45.bench import main as bench_main
from ernie45.checkpoint import build_model
from ernie45.config import ErnieConfig
from ernie45.errors import ErnieError

FIELDS = ("engine", "shape", "dtype", "prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "floor_decode_tok_s")


@pytest.mark.parametrize("shape", ["0.3b", "moe"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "wint8", "wint4"])
def test_floor_counts_every_weight_read_once(shape, dtype):
    """Dense: every Linear (the tied head once). MoE: attention, the dense layer, top-k + shared experts, router."""
    cfg = ErnieConfig(**SHAPES[shape])
    model = build_model(cfg, torch.float32, meta=True)
    per = {"fp32": 4.0, "bf16": 2.0, "wint8": 1.0, "wint4": 0.5}[dtype]
    expected = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        n = m.weight.numel()
        if ".experts." in name:
            n = n * cfg.moe_k / cfg.moe_num_experts  # only the routed top-k of E experts are read
        expected += n * (4.0 if name.endswith("mlp.gate") else per)  # the fp32 router
    assert decode_bytes_per_token(cfg, dtype) == pytest.approx(expected, rel=1e-3)


def test_bench_writes_rows_and_table(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = bench_main(["--shape", "tiny", "--dtype", "fp32,wint8", "--vs", "transformers", "--runs", "1", "--rounds", "2",
                     "--prompt-len", "16", "--gen-len", "4", "--threads", "1", "--workdir", str(tmp_path / "w"),
                     "--json", str(out_json), "--out", str(out_md)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    rows = {(r["engine"], r["dtype"]): r for r in data["rows"]}
    assert set(rows) == {("ernie45", "fp32"), ("transformers", "fp32"), ("ernie45", "wint8"), ("transformers", "wint8")}
    for key in [("ernie45", "fp32"), ("transformers", "fp32"), ("ernie45", "wint8")]:
        r = rows[key]
        assert all(f in r for f in FIELDS), r
        assert r["shape"] == "tiny" and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["ttft_s"] < 60 and r["rounds"] == 2  # engines took turns twice; the row is the median
    assert "skipped" in rows[("transformers", "wint8")]  # transformers has no wint8
    assert data["meta"]["bandwidth_gbs"] > 0 and data["meta"]["prompt_len"] == 16 and data["meta"]["rounds"] == 2
    table = out_md.read_text()
    ratio = rows[("ernie45", "fp32")]["decode_tok_s"] / rows[("transformers", "fp32")]["decode_tok_s"]
    assert "| tiny | fp32 | transformers |" in table and f"{ratio:.2f}×" in table
    assert table in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "int3"], "unknown dtype 'int3'"),
    (["--shape", "7b"], "unknown shape '7b'"),
    (["--vs", "vllm"], "unknown peer 'vllm'"),
    (["--gen-len", "1"], "--gen-len"),
    (["--rounds", "0"], "--rounds"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(ErnieError, match=message):
        bench_main(argv + ["--vs", "none"] if "--vs" not in argv else argv)
