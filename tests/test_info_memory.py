"""`ernie45 info --memory`: weights as a run holds them, KV cache, overhead; `info`'s KV bytes per token; errors."""

from __future__ import annotations

import json

import pytest
import torch

from ernie45.commands.info import (
    RUNTIME_OVERHEAD_BYTES,
    kv_cache_bytes_per_token,
    memory_estimate,
    run_dtype,
)
from ernie45.commands.info import main as info_main
from ernie45.config import ErnieConfig
from ernie45.errors import ErnieError
from ernie45.models import bundled_path


def held_bytes(model) -> int:
    """What a loaded model really holds: every distinct tensor's bytes (a tied head shares the embedding's)."""
    tensors = {}
    for t in [*model.parameters(), *model.buffers()]:
        tensors[t.data_ptr()] = t.numel() * t.element_size()
    return sum(tensors.values())


def loaded(path: str, dtype, quantize: str | None = None):
    from ernie45.checkpoint import load_checkpoint

    model = load_checkpoint(path, dtype=dtype, device="cpu")
    if quantize:
        from ernie45.quant import quantize_model

        quantize_model(model, quantize, progress=False)
    return model


def test_weights_fp32_equal_the_loaded_model():
    path = bundled_path()
    mem = memory_estimate(path, dtype="float32")
    model = loaded(path, torch.float32)
    assert model.config.tie_word_embeddings
    assert mem["weights_bytes"] == held_bytes(model)
    assert mem["weights_bytes"] == sum(p.numel() for p in model.parameters()) * 4  # the tied head once
    assert mem["dtype"] == "float32" and mem["quantization"] is None


@pytest.mark.parametrize("name, mode, dtype", [
    ("ernie-tiny-moe", "wint4", "float32"),
    ("ernie-tiny-moe", "wint4", "auto"),
    ("ernie-tiny", "wint8", "float32"),
    ("ernie-tiny-moe", "wint8", "bfloat16"),
])
def test_weights_under_quantize_equal_the_quantized_model(name, mode, dtype):
    path = bundled_path(name)
    mem = memory_estimate(path, quantize=mode, dtype=dtype)
    model = loaded(path, run_dtype(dtype), mode)
    assert mem["weights_bytes"] == held_bytes(model)
    assert mem["quantization"] == mode and mem["dtype"] == str(run_dtype(dtype)).replace("torch.", "")
    assert mem["weights_bytes"] < memory_estimate(path, dtype=dtype)["weights_bytes"]


def test_wint4_refused_as_quantize_refuses_it():
    """ernie-tiny's FFN width (688) divides by neither wint4 group size: info says so, as quantizing would."""
    with pytest.raises(ErnieError, match="not divisible by the group size") as quant:
        loaded(bundled_path(), torch.float32, "wint4")
    with pytest.raises(ErnieError) as info:
        memory_estimate(bundled_path(), quantize="wint4")
    assert str(info.value) == str(quant.value)


def test_weights_of_a_quantized_checkpoint(tmp_path):
    """A checkpoint quantized with its head (untied): its own quantization_config decides, --quantize is refused."""
    from ernie45.quant.cli import quantize_checkpoint

    out = tmp_path / "q"
    quantize_checkpoint(bundled_path("ernie-tiny-moe"), out, "wint4", quantize_lm_head=True, progress=False)
    mem = memory_estimate(str(out), dtype="float32")
    model = loaded(str(out), torch.float32)
    assert not model.config.tie_word_embeddings
    assert mem["weights_bytes"] == held_bytes(model) and mem["quantization"] == "wint4"
    with pytest.raises(ErnieError, match=r"already quantized \(wint4\)"):
        memory_estimate(str(out), quantize="wint8")


@pytest.mark.parametrize("name, mode, dtype", [
    ("ernie-tiny", "wint8", "float32"),  # tied: the head is quantized too
    ("ernie-tiny-moe", "wint4", "bfloat16"),
])
def test_weights_with_an_int8_embedding(name, mode, dtype, tmp_path, capsys):
    """`--quantize-embedding`: a checkpoint written with the int8 embedding is counted as loaded; `--quantize MODE
    --quantize-embedding` predicts that checkpoint from the float one; the table is V x H bytes + V scales."""
    from ernie45.quant.cli import quantize_checkpoint

    path = bundled_path(name)
    cfg = ErnieConfig.from_pretrained(path)
    out = tmp_path / "q"
    quantize_checkpoint(path, out, mode, quantize_lm_head=True, quantize_embedding=True, progress=False)
    model = loaded(str(out), run_dtype(dtype))
    assert type(model.model.embed_tokens).__name__ == "Int8Embedding"
    mem = memory_estimate(str(out), dtype=dtype)
    assert mem["weights_bytes"] == held_bytes(model)
    assert (mem["quantization"], mem["embedding"]) == (mode, "int8")
    predicted = memory_estimate(path, quantize=mode, dtype=dtype, quantize_embedding=True)
    assert predicted["weights_bytes"] == held_bytes(model) and predicted["embedding"] == "int8"
    item = run_dtype(dtype).itemsize
    without = memory_estimate(path, quantize=mode, dtype=dtype)["weights_bytes"]
    table = cfg.vocab_size * cfg.hidden_size
    if cfg.tie_word_embeddings:  # without the flag the head is float and shares the table
        assert without == predicted["weights_bytes"] - (table + cfg.vocab_size * item) + table * item - sum(
            t.numel() * t.element_size() for t in model.lm_head.state_dict().values())
    else:
        assert without - predicted["weights_bytes"] == table * item - (table + cfg.vocab_size * item)
    assert info_main([path, "--quantize", mode, "--quantize-embedding", "--dtype", dtype]) == 0
    assert f"{mode} weights, int8 embedding" in capsys.readouterr().out
    assert info_main([path, "--json", "--quantize", mode, "--quantize-embedding", "--dtype", dtype]) == 0
    assert json.loads(capsys.readouterr().out)["memory"] == predicted
    with pytest.raises(ErnieError, match="--quantize-embedding needs --quantize MODE"):
        info_main([path, "--quantize-embedding"])
    with pytest.raises(ErnieError, match="not nf4"):
        memory_estimate(path, quantize="nf4", quantize_embedding=True)


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
def test_kv_cache_bytes(dtype, size):
    path = bundled_path("ernie-tiny-moe")
    cfg = ErnieConfig.from_pretrained(path)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size
    mem = memory_estimate(path, dtype=dtype, max_model_len=100, max_num_seqs=3)
    assert mem["kv_cache_bytes_per_token"] == per_token == kv_cache_bytes_per_token(cfg, run_dtype(dtype))
    assert mem["kv_cache_bytes"] == per_token * 100 * 3
    # what the model allocates for 3 sequences of 100 positions
    model = loaded(path, run_dtype(dtype))
    cache = model.new_cache(3, 100)
    assert mem["kv_cache_bytes"] == sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v])
    assert mem["overhead_bytes"] == RUNTIME_OVERHEAD_BYTES
    assert mem["total_bytes"] == mem["weights_bytes"] + mem["kv_cache_bytes"] + RUNTIME_OVERHEAD_BYTES
    # defaults: min(context window, 4096) positions, one sequence
    mem = memory_estimate(path, dtype=dtype)
    assert (mem["max_model_len"], mem["max_num_seqs"]) == (min(cfg.max_position_embeddings, 4096), 1)


def test_int8_kv_cache_bytes_equal_the_serving_pool():
    """--kv-cache-dtype int8 predicts what the server's int8 page pool holds per position."""
    from ernie45.serve.kv import PagedKVCache

    path = bundled_path("ernie-tiny-moe")
    cfg = ErnieConfig.from_pretrained(path)
    mem = memory_estimate(path, dtype="bfloat16", max_model_len=64, kv_cache_dtype="int8")
    assert mem["kv_cache_bytes_per_token"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.head_dim + 4)
    assert mem["kv_cache_dtype"] == "int8"
    pool = PagedKVCache(loaded(path, torch.bfloat16), num_blocks=4, block_size=16, kv_dtype="int8")
    assert pool.nbytes == mem["kv_cache_bytes"]  # 4 blocks x 16 positions = 64


def test_a3b_full_model_prediction(tmp_path):
    """ERNIE-4.5-21B-A3B's config alone: wint4 weights ~11 GiB in bf16, 57,344 B of bf16 KV per token."""
    from ernie45.config import preset

    preset("21b-a3b").save(tmp_path)
    mem = memory_estimate(str(tmp_path), quantize="wint4", dtype="bfloat16", max_model_len=8192)
    assert mem["kv_cache_bytes_per_token"] == 2 * 28 * 4 * 128 * 2 == 57344
    assert 10.5 * 2**30 < mem["weights_bytes"] < 12 * 2**30
    assert 40 * 2**30 < memory_estimate(str(tmp_path), dtype="bfloat16")["weights_bytes"] < 41 * 2**30


def test_cli_table_and_json(capsys):
    assert info_main([bundled_path(), "--memory", "--dtype", "float32", "--max-model-len", "512"]) == 0
    out = capsys.readouterr().out
    mem = memory_estimate(bundled_path(), dtype="float32", max_model_len=512)
    cfg = ErnieConfig.from_pretrained(bundled_path())
    assert f"kv_cache_bytes_per_token {mem['kv_cache_bytes_per_token']:,} (float32)" in out
    table = out[out.index("memory (predicted, before loading)"):].splitlines()
    assert [ln.split()[0] for ln in table[1:]] == ["weights", "KV", "runtime", "total"]
    assert f"1 x 512 positions x {mem['kv_cache_bytes_per_token']:,} B per token" in table[2]

    assert info_main([bundled_path(), "--json", "--quantize", "wint8", "--max-num-seqs", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory"] == memory_estimate(bundled_path(), quantize="wint8", max_num_seqs=2)
    assert data["memory"]["max_model_len"] == min(cfg.max_position_embeddings, 4096)
    assert data["kv_cache_bytes_per_token"] == data["memory"]["kv_cache_bytes_per_token"]

    assert info_main([bundled_path(), "--json"]) == 0  # plain info: the KV bytes per token, no prediction
    data = json.loads(capsys.readouterr().out)
    assert "memory" not in data
    assert data["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(cfg, run_dtype("auto"))


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int3"], "unknown quantization mode 'int3'"),
    (["--memory", "--max-model-len", "0"], "--max-model-len must be positive, got 0"),
    (["--max-model-len", "-5"], "--max-model-len must be positive, got -5"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be positive, got 0"),
    (["--max-model-len", "999999"], r"--max-model-len 999999 exceeds the model's context window \(2048\)"),
    (["--memory", "--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    from ernie45.cli import main as cli_main

    with pytest.raises(ErnieError, match=message):
        info_main([bundled_path(), *argv])
    assert cli_main(["info", bundled_path(), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
