"""Streaming quantization (ernie45.quant.stream): the files equal the in-memory path's byte for byte, the
blocked tensor quantizers equal the former whole-matrix ones, and a checkpoint of >= 1.5 GB is quantized in a
child process whose peak RSS stays far below the checkpoint's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, save_hf
from torch import nn

import ernie45
from ernie45.checkpoint import CheckpointReader, build_model, checkpoint_state_dict, save_checkpoint
from ernie45.cli import main as cli_main
from ernie45.config import ErnieConfig, preset
from ernie45.errors import ErnieError
from ernie45.quant import kernels, quantize_model
from ernie45.quant.cli import quantize_checkpoint
from ernie45.quant.linear import (
    INT4_CLIP_RATIOS,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    rel_error,
)
from ernie45.quant.stream import StreamQuantizer
from ernie45.tokenizer import Tokenizer


# ---- the former quantizers, verbatim (whole matrix in fp32), as the reference -----------------------------
def old_quantize_int8_per_channel(w, dtype):
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(dtype).tiny).to(dtype)
    q = (wf / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def old_pack_int4_rowmajor(q):
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def old_quantize_int4_groupwise(w, group_size, dtype):
    n, k = w.shape
    wg = w.detach().float().view(n, k // group_size, group_size)  # (N, K/g, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    tiny = torch.finfo(dtype).tiny
    best_err = best_q = best_scale = best_zero = None
    for r in INT4_CLIP_RATIOS:
        scale = (half * r / 7.5).clamp(min=tiny).to(dtype)  # 15 steps across [mid - r*half, mid + r*half]
        zero = (mid - half * r + 8 * scale.float()).to(dtype)
        s, z = scale.float()[..., None], zero.float()[..., None]
        q = ((wg - z) / s + 8).round_().clamp_(0, 15)
        err = ((q - 8) * s + z - wg).square_().sum(dim=-1)  # (N, K/g)
        if best_err is None:
            best_err, best_q, best_scale, best_zero = err, q, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[..., None], q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    packed = old_pack_int4_rowmajor(best_q.view(n, k))
    return packed, best_scale, best_zero


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # the blocks then go to a pool of two threads
    yield
    torch.set_num_threads(prev)


def _weights(seed: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.001 + 0.1 * float(torch.rand(1, generator=g)))
    w[0, :64] = 0  # an all-zero group: the scale clamps to `tiny`
    w[1, 64:128] = 0.25  # a constant group
    w[2, 5] = 3.0  # an outlier
    w[3] *= 1e-6  # a row of tiny values
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [64, 128])
def test_blocked_quantizers_equal_the_former_ones(dtype, group_size, two_threads, monkeypatch):
    import ernie45.quant.linear as qlin

    shapes = [(7, 128), (96, 512), (300, 1024), (1031, 384), (64, 12288)]
    for chunk in (qlin.QUANT_CHUNK, 5000):  # many blocks, block sizes that do not divide the rows
        monkeypatch.setattr(qlin, "QUANT_CHUNK", chunk)
        for i, (n, k) in enumerate(shapes):
            w = _weights(i, n, k, dtype)
            for out_dtype in (dtype, torch.float16):
                stats: dict = {}
                got = quantize_int4_groupwise(w, group_size, out_dtype, stats=stats)
                want = old_quantize_int4_groupwise(w, group_size, out_dtype)
                for a, b in zip(got, want):
                    assert a.dtype == b.dtype and torch.equal(a, b), (chunk, n, k, out_dtype)
                deq = kernels.dequantize_int4(*got, group_size, kernels.ROWMAJOR_INT4_LAYOUT, torch.float32)
                ref = float((deq.double() - w.double()).norm() / w.double().norm())
                assert rel_error(stats) == pytest.approx(ref, rel=1e-4)
                stats = {}
                got = quantize_int8_per_channel(w, out_dtype, stats=stats)
                want = old_quantize_int8_per_channel(w, out_dtype)
                for a, b in zip(got, want):
                    assert a.dtype == b.dtype and torch.equal(a, b), (chunk, n, k, out_dtype)
                ref = float(
                    (got[0].double() * got[1].double()[:, None] - w.double()).norm() / w.double().norm()
                )
                assert rel_error(stats) == pytest.approx(ref, rel=1e-4)
            assert torch.get_num_threads() == 2  # the pool gives the caller its thread count back
    # a non-contiguous input and an input that requires grad
    w = _weights(9, 256, 256, torch.float32).t().requires_grad_(True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            quantize_int4_groupwise(w, group_size, dtype), old_quantize_int4_groupwise(w, group_size, dtype)
        )
    )


# ---- streamed checkpoints == in-memory checkpoints ---------------------------------------------------------
def _checkpoint(path: Path, kind: str, dtype: torch.dtype, tokenizer_dir: str, seed: int = 0, **over) -> str:
    cfg = preset("tiny" if kind == "dense" else "tiny-moe", **over)
    if kind == "moe":
        cfg = cfg.replace(tie_word_embeddings=False, moe_intermediate_size=64)
    model = build_model(cfg, dtype)
    model.init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + (0.8 if "norm" in name else -0.2))
    save_checkpoint(model, path, tokenizer=Tokenizer.from_pretrained(tokenizer_dir))
    return str(path)


def _files(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


def _assert_same_checkpoints(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], name  # shards, index, config.json, report, tokenizer: byte for byte


CASES = [  # (kind, mode, source dtype, options)
    ("dense", "wint8", torch.bfloat16, {}),
    ("dense", "wint8", torch.float32, {"quantize_lm_head": True}),
    ("dense", "wint4", torch.bfloat16, {"quantize_lm_head": True}),
    ("dense", "wint4", torch.float32, {}),
    ("moe", "wint8", torch.bfloat16, {"quantize_lm_head": True}),
    ("moe", "wint8", torch.float32, {}),
    ("moe", "wint4", torch.bfloat16, {}),
    ("moe", "wint4", torch.float32, {"quantize_lm_head": True}),
    ("dense", "wint4", torch.float32, {"group_size": 128, "hidden": 128, "skip": ("down_proj",)}),
    ("dense", "wint8", torch.float32, {"dtype": "bfloat16", "bias": True, "quantize_lm_head": True}),
    ("moe", "wint4", torch.float32, {"dtype": "float16", "group_size": 64}),
    ("dense", "llm.int8", torch.bfloat16, {"quantize_lm_head": True}),
    ("moe", "llm.int8", torch.float32, {}),
    # the int8 token embedding: tied (the head quantized from the float embedding, then untied) and untied
    ("dense", "wint8", torch.bfloat16, {"quantize_lm_head": True, "quantize_embedding": True}),
    ("dense", "wint4", torch.float32, {"dtype": "bfloat16", "quantize_lm_head": True, "quantize_embedding": True}),
    ("moe", "wint8", torch.float32, {"quantize_embedding": True}),
    ("moe", "wint4", torch.bfloat16, {"quantize_lm_head": True, "quantize_embedding": True}),
    ("moe", "llm.int8", torch.bfloat16, {"quantize_embedding": True}),
]


@pytest.mark.parametrize("kind,mode,src_dtype,opts", CASES)
@pytest.mark.parametrize("shards", ["2GB", "30KB"])
def test_streamed_equals_in_memory(kind, mode, src_dtype, opts, shards, tmp_path, tokenizer_dir):
    opts = dict(opts)
    over = {}
    if opts.pop("hidden", None):
        over = dict(hidden_size=128, head_dim=32)
    if opts.pop("bias", None):
        over["use_bias"] = True
    src = _checkpoint(tmp_path / "src", kind, src_dtype, tokenizer_dir, **over)
    kw = dict(opts, progress=False, max_shard_size=shards)
    st_stats: dict = {}
    mem_stats: dict = {}
    rep_s, before, after = quantize_checkpoint(src, tmp_path / "s", mode, stream=True, stats=st_stats, **kw)
    rep_m, before_m, after_m = quantize_checkpoint(
        src, tmp_path / "m", mode, stream=False, stats=mem_stats, **kw
    )
    assert st_stats["streamed"] and not mem_stats["streamed"] and st_stats["params"] == mem_stats["params"]
    _assert_same_checkpoints(tmp_path / "s", tmp_path / "m")
    assert rep_s == rep_m and (before, after) == (before_m, after_m) and after < before
    assert (tmp_path / "s" / "model.safetensors.index.json").exists() == (shards == "30KB")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["mode"] == mode and ("lm_head" in qc["modules_to_not_convert"]) != bool(
        opts.get("quantize_lm_head")
    )
    assert qc.get("embedding") == ("int8" if opts.get("quantize_embedding") else None)
    model, _ = ernie45.load(tmp_path / "s", dtype="float32", device="cpu")  # loads with no flag
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.mode == mode and (type(model.lm_head) is not nn.Linear) == bool(opts.get("quantize_lm_head"))
    assert not (opts.get("quantize_lm_head") and model.config.tie_word_embeddings)
    emb = model.model.embed_tokens
    assert (type(emb) is Int8Embedding) == bool(opts.get("quantize_embedding"))
    if opts.get("quantize_embedding"):
        assert (rep_s.embedding.name, rep_s.embedding.shape) == ("model.embed_tokens", tuple(emb.weight.shape))
        assert emb.weight.dtype == torch.int8 and emb.weight_scale.shape == (model.config.vocab_size,)


def test_transformers_fused_experts_layout(tmp_path, tokenizer_dir):
    """A transformers-saved MoE checkpoint (fused expert tensors, fp32) streams to the in-memory result."""
    src = save_hf(
        make_hf_model("moe", bias_scale=0.3, intermediate_size=128, moe_intermediate_size=64),
        tmp_path / "hf",
        tokenizer_dir,
    )
    for stream, out in ((True, "s"), (False, "m")):
        quantize_checkpoint(
            src, tmp_path / out, "wint4", quantize_lm_head=True, progress=False, stream=stream
        )
    _assert_same_checkpoints(tmp_path / "s", tmp_path / "m")


def test_stream_quantizer_api(tmp_path, tokenizer_dir):
    src = _checkpoint(tmp_path / "src", "dense", torch.bfloat16, tokenizer_dir)
    model, _ = ernie45.load(src, dtype="bfloat16", device="cpu")
    report = quantize_model(model, "wint4", quantize_lm_head=True, progress=False)
    want = checkpoint_state_dict(model)
    with CheckpointReader(src) as reader:
        sq = StreamQuantizer(reader, ErnieConfig.from_pretrained(src), "wint4", quantize_lm_head=True)
        plain = StreamQuantizer(
            reader, ErnieConfig.from_pretrained(src), "wint4", quantize_lm_head=True, prefetch=False
        )
        for name, t in plain:  # in order, no threads
            assert torch.equal(t, want[name]), name
        assert plain.report == report and not plain._pools
        assert sq.dtype == torch.bfloat16 and sq.group_size == 64
        assert sq.config.quantization_config == model.config.quantization_config == sq.quantization_config
        assert not sq.config.tie_word_embeddings and sq.config.torch_dtype == "bfloat16"
        assert [(s.name, s.dtype, s.shape) for s in sq.specs] == [
            (k, v.dtype, tuple(v.shape)) for k, v in want.items()
        ]
        float_model, _ = ernie45.load(src, dtype="bfloat16", device="cpu")
        assert (
            sq.total_params
            == sum(sq.source_params.values())
            == sum(v.numel() for v in checkpoint_state_dict(float_model).values())
        )  # the tied head, quantized from the embeddings, is not counted twice
        names = [s.name for s in sq.specs]
        for name in reversed(names):  # any order works (a module's siblings wait until asked for)
            assert torch.equal(sq.tensor(name), want[name]), name
        assert sq._ready == {}
        assert sq.report == report
        sq.close()
        assert not sq._pools and not sq._computing and not sq._reading
        with StreamQuantizer(
            reader, ErnieConfig.from_pretrained(src), "wint4", quantize_lm_head=True
        ) as again:
            for name, t in again:  # in order, prefetched
                assert torch.equal(t, want[name]), name
            assert again.report == report
        assert "lm_head" in sq.targets and sq.targets["lm_head"] == (model.config.vocab_size, 64)
        with pytest.raises(KeyError):
            sq.tensor("model.nothing.weight")
        with pytest.raises(ErnieError, match="not quantized tensor by tensor"):
            StreamQuantizer(reader, ErnieConfig.from_pretrained(src), "nf4")
        with pytest.raises(ErnieError, match="group size must be one of"):
            StreamQuantizer(reader, ErnieConfig.from_pretrained(src), "wint4", group_size=48)
        with pytest.raises(ErnieError, match="already quantized"):
            StreamQuantizer(reader, sq.config, "wint8")
        bad = ErnieConfig.from_pretrained(src).replace(intermediate_size=256)
        with pytest.raises(ErnieError, match="does not match its config.json"):
            StreamQuantizer(reader, bad, "wint8")


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_stream_quantizer_quantizes_the_embedding(kind, tmp_path, tokenizer_dir):
    """quantize_embedding: the int8 table and its scales are one unit (in file order first), equal to
    quantize_model's in any order, counted once in the progress parameters, recorded in the report."""
    src = _checkpoint(tmp_path / "src", kind, torch.bfloat16, tokenizer_dir)
    head = kind == "dense"  # the dense checkpoint's embeddings are tied: its head must be quantized too
    model, _ = ernie45.load(src, dtype="bfloat16", device="cpu")
    report = quantize_model(model, "wint8", quantize_lm_head=head, quantize_embedding=True, progress=False)
    want = checkpoint_state_dict(model)
    with CheckpointReader(src) as reader:
        cfg = ErnieConfig.from_pretrained(src)
        with StreamQuantizer(reader, cfg, "wint8", quantize_lm_head=head, quantize_embedding=True) as sq:
            assert [(s.name, s.dtype, s.shape) for s in sq.specs] == [
                (k, v.dtype, tuple(v.shape)) for k, v in want.items()
            ]
            assert [s.name for s in sq.specs[:2]] == ["model.embed_tokens.weight", "model.embed_tokens.weight_scale"]
            assert sq.embedding == (cfg.vocab_size, cfg.hidden_size)
            assert sq.source_params["model.embed_tokens.weight"] == cfg.vocab_size * cfg.hidden_size
            assert sq.source_params["model.embed_tokens.weight_scale"] == 0
            float_model, _ = ernie45.load(src, dtype="bfloat16", device="cpu")
            assert sq.total_params == sum(v.numel() for v in checkpoint_state_dict(float_model).values())
            for name, t in sq:
                assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
            assert sq.report == report and sq.report.embedding is not None
            assert sq.config.quantization_config == model.config.quantization_config
            assert sq.config.tie_word_embeddings is False
        plain = StreamQuantizer(reader, cfg, "wint4", quantize_lm_head=head, quantize_embedding=True, prefetch=False)
        wint4, _ = ernie45.load(src, dtype="bfloat16", device="cpu")
        quantize_model(wint4, "wint4", quantize_lm_head=head, quantize_embedding=True, progress=False)
        want = checkpoint_state_dict(wint4)
        for name in reversed([s.name for s in plain.specs]):  # any order
            assert torch.equal(plain.tensor(name), want[name]), name
        if head:
            with pytest.raises(ErnieError, match="needs quantize_lm_head"):
                StreamQuantizer(reader, cfg, "wint8", quantize_embedding=True)


def test_cli_quantize_embedding_flag(tmp_path, tokenizer_dir, capsys):
    src = _checkpoint(tmp_path / "src", "dense", torch.bfloat16, tokenizer_dir)
    out = tmp_path / "q"
    assert cli_main(["quantize", "--model", src, "--mode", "wint8", "--out", str(out), "--quiet",
                     "--quantize-embedding"]) == 1
    err = capsys.readouterr().err.strip()
    assert "needs quantize_lm_head=True (--quantize-lm-head" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert cli_main(["quantize", "--model", src, "--mode", "wint8", "--out", str(out), "--quiet",
                     "--quantize-lm-head", "--quantize-embedding"]) == 0
    assert "token embedding" in capsys.readouterr().out
    assert ErnieConfig.from_pretrained(out).quantization_config["embedding"] == "int8"
    with CheckpointReader(out) as reader:
        assert reader.entries["model.embed_tokens.weight"].dtype == torch.int8
        assert reader.entries["model.embed_tokens.weight_scale"].dtype == torch.bfloat16
    plain = tmp_path / "p"
    assert cli_main(["quantize", "--model", src, "--mode", "wint8", "--out", str(plain), "--quiet",
                     "--quantize-lm-head"]) == 0
    def tensor_bytes(d):
        with CheckpointReader(d) as reader:
            return sum(e.nbytes for e in reader.entries.values())

    cfg = ErnieConfig.from_pretrained(src)  # bf16 V x H -> int8 V x H + a bf16 scale per row
    assert tensor_bytes(plain) - tensor_bytes(out) == cfg.vocab_size * cfg.hidden_size - 2 * cfg.vocab_size
    with pytest.raises(SystemExit):
        cli_main(["quantize", "--help"])
    assert "--quantize-embedding" in capsys.readouterr().out


def test_cli_streams_with_progress_and_peak_rss(tmp_path, tokenizer_dir, capsys):
    src = _checkpoint(tmp_path / "src", "moe", torch.bfloat16, tokenizer_dir)
    out = tmp_path / "q"
    assert (
        cli_main(
            ["quantize", "--model", src, "--mode", "wint4", "--out", str(out), "--max-shard-size", "20KB"]
        )
        == 0
    )
    cap = capsys.readouterr()
    assert "param/s" in cap.err and "quantize wint4" in cap.err  # the tqdm bar, on stderr
    assert "M params/s, streamed" in cap.out and "peak RSS" in cap.out and "wrote" in cap.out
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1


def test_cli_bad_input_is_one_line(tmp_path, tokenizer_dir, capsys, monkeypatch):
    src = _checkpoint(tmp_path / "src", "dense", torch.float32, tokenizer_dir)
    out = str(tmp_path / "o")

    def run(*args):
        rc = cli_main(["quantize", *args, "--quiet"])
        err = capsys.readouterr().err.strip()
        return rc, err

    rc, err = run("--model", str(tmp_path / "missing"), "--mode", "wint4", "--out", out)
    assert rc == 1 and "model path not found" in err and len(err.splitlines()) == 1
    rc, err = run("--model", src, "--mode", "wint4", "--out", out, "--max-shard-size", "lots")
    assert rc == 1 and "invalid size" in err
    rc, err = run("--model", src, "--mode", "wint4", "--out", out, "--group-size", "96")
    assert rc == 1 and "group size must be one of 32, 64, 128" in err
    rc, err = run("--model", src, "--mode", "wint4", "--out", src)
    assert rc == 1 and "--out must differ" in err

    quantized = tmp_path / "quantized"
    assert run("--model", src, "--mode", "wint8", "--out", str(quantized))[0] == 0
    rc, err = run("--model", str(quantized), "--mode", "wint4", "--out", out)
    assert rc == 1 and "already quantized (wint8)" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(src):
        (broken / f).write_bytes((Path(src) / f).read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    rc, err = run("--model", str(broken), "--mode", "wint4", "--out", out)
    assert rc == 1 and "truncated" in err and len(err.splitlines()) == 1
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    rc, err = run("--model", str(broken), "--mode", "wint4", "--out", out)
    assert rc == 1 and "not a safetensors file" in err and len(err.splitlines()) == 1

    # Ctrl-C in the middle of the stream (main thread, with the prefetch threads busy): nothing is left behind,
    # not even the temporary directory, and the prefetch threads are stopped
    import threading

    import ernie45.quant.stream as stream

    calls = []
    real = stream.StreamQuantizer.tensor

    def interrupted(self, name):
        calls.append(name)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(self, name)

    threads = threading.active_count()
    monkeypatch.setattr(stream.StreamQuantizer, "tensor", interrupted)
    assert cli_main(["quantize", "--model", src, "--mode", "wint4", "--out", out, "--quiet"]) == 130
    assert len(calls) == 7 and threading.active_count() == threads
    assert sorted(os.listdir(tmp_path)) == ["broken", "quantized", "src"]


def test_background_failure_surfaces(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """An error while a prefetch thread quantizes a later tensor reaches the caller as itself."""
    import threading

    import ernie45.quant.stream as stream

    src = _checkpoint(tmp_path / "src", "moe", torch.bfloat16, tokenizer_dir)
    real = stream.StreamQuantizer._compute

    def failing(self, unit, source):
        if unit == "model.layers.1.mlp.experts.2.up_proj":
            raise ErnieError("disk on fire")
        return real(self, unit, source)

    threads = threading.active_count()
    monkeypatch.setattr(stream.StreamQuantizer, "_compute", failing)
    assert (
        cli_main(["quantize", "--model", src, "--mode", "wint8", "--out", str(tmp_path / "o"), "--quiet"])
        == 1
    )
    assert "disk on fire" in capsys.readouterr().err
    assert threading.active_count() == threads and sorted(os.listdir(tmp_path)) == ["src"]


# ---- a checkpoint larger than the memory the quantizer uses --------------------------------------------
BIG = ErnieConfig(  # 807 M bf16 parameters (1.61 GB); the largest tensors are 8192 x 2048 (33.5 MB)
    vocab_size=8192,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=13,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)


def _big_tensor(index: int, spec) -> torch.Tensor:
    """Tensor `index` of the big checkpoint, regenerated from its index (nothing is kept in memory)."""
    g = torch.Generator().manual_seed(1000 + index)
    if spec.name.endswith("norm.weight"):
        return torch.rand(spec.shape, generator=g, dtype=spec.dtype).add_(0.5)
    return torch.randn(spec.shape, generator=g, dtype=spec.dtype).mul_(0.02)


def _child_peak_rss(code: str) -> tuple[int, str]:
    """Run `code` in a fresh interpreter that prints its VmHWM (KiB) last; (peak bytes, stdout)."""
    code += (
        "\nprint('VmHWM', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
        "raise SystemExit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1].split()
    assert last[0] == "VmHWM"
    return int(last[1]) * 1024, r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads VmHWM from /proc")
@pytest.mark.timeout(600)
def test_big_checkpoint_streams_in_bounded_memory(tmp_path, tokenizer_dir, two_threads):
    from ernie45.convert.safetensors_io import TensorSpec, write_shards

    src, out = tmp_path / "big", tmp_path / "big-wint4"
    model = build_model(BIG, torch.bfloat16, meta=True)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in checkpoint_state_dict(model).items()]
    index = {s.name: i for i, s in enumerate(specs)}
    src.mkdir()
    write_shards(str(src), specs, lambda s: _big_tensor(index[s.name], s), "400MB", progress=False)
    BIG.save(src)
    Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    size = sum(s.nbytes for s in specs)
    assert size >= 1.5e9

    imports = (
        "import torch, tqdm, ernie45.cli, ernie45.quant.cli, ernie45.quant.stream, ernie45.checkpoint, "
        "ernie45.tokenizer, ernie45.model, ernie45.convert.safetensors_io\nrc = 0"
    )
    baseline, _ = _child_peak_rss(imports)
    argv = [
        "quantize",
        "--model",
        str(src),
        "--mode",
        "wint4",
        "--out",
        str(out),
        "--quiet",
        "--quantize-lm-head",
        "--max-shard-size",
        "300MB",
    ]
    peak, stdout = _child_peak_rss(f"from ernie45.cli import main\nrc = main({argv!r})")
    largest = max(s.nbytes for s in specs)
    print(
        f"checkpoint {size / 1e9:.2f} GB, baseline {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB,"
        f" largest tensor {largest / 2**20:.1f} MiB\n{stdout}"
    )
    # the in-memory path holds the whole model (>= 1x the checkpoint); streaming holds about one tensor
    assert peak - baseline <= 0.25 * size, (peak, baseline, size)

    # every tensor equals the in-memory quantization of that tensor (same functions as quantize_model)
    with CheckpointReader(out) as reader:
        cfg = ErnieConfig.from_pretrained(out)
        assert cfg.quantization_config["group_size"] == 128 and not cfg.tie_word_embeddings
        seen = set()
        for i, spec in enumerate(specs):
            w = _big_tensor(i, spec)
            if spec.name.endswith("_proj.weight") or spec.name == "model.embed_tokens.weight":
                module = spec.name[: -len(".weight")] if spec.name.endswith("_proj.weight") else "lm_head"
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                lin.weight = nn.Parameter(w, requires_grad=False)
                want = Int4Linear.from_float(lin, torch.bfloat16, 128).state_dict()
                for key, t in want.items():
                    assert torch.equal(reader.read(f"{module}.{key}"), t), (module, key)
                    seen.add(f"{module}.{key}")
            if not spec.name.endswith("_proj.weight"):
                assert torch.equal(reader.read(spec.name), w), spec.name
                seen.add(spec.name)
        assert seen == set(reader.entries)


def test_int8_module_from_float_matches_quantizer():
    """`Int8Linear.from_float` / `Int4Linear.from_float` fill `stats` like the tensor quantizers."""
    lin = nn.Linear(256, 64)
    s8: dict = {}
    s4: dict = {}
    m8 = Int8Linear.from_float(lin, torch.float32, stats=s8)
    m4 = Int4Linear.from_float(lin, torch.float32, 64, stats=s4)
    w = lin.weight.detach()
    assert rel_error(s8) == pytest.approx(float((m8.dequantize() - w).norm() / w.norm()), rel=1e-4)
    assert rel_error(s4) == pytest.approx(float((m4.dequantize() - w).norm() / w.norm()), rel=1e-4)
