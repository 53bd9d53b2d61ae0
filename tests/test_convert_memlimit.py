"""Converting a checkpoint larger than the memory the process may use (a cgroup memory limit) succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import torch

from ernie45.checkpoint import build_model, save_checkpoint
from ernie45.checkpoint_read import read_state_dict
from ernie45.config import ErnieConfig

CGROUP_ROOT = "/sys/fs/cgroup/memory"
LIMIT = 450 * 2**20  # the python + torch import alone takes ~300 MB of it


def _cgroup_available() -> bool:
    return os.geteuid() == 0 and os.access(CGROUP_ROOT, os.W_OK) and os.path.isfile(
        os.path.join(CGROUP_ROOT, "memory.limit_in_bytes"))


def _run_limited(cgroup: str, argv: list[str]) -> subprocess.CompletedProcess:
    code = (f"import os; open({os.path.join(cgroup, 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            f"from ernie45.cli import main\nraise SystemExit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(not _cgroup_available(), reason="needs root and a writable cgroup-v1 memory controller")
def test_round_trip_under_a_memory_limit_smaller_than_the_checkpoint(tmp_path):
    # 844 MB of fp32 weights in 100 MB shards; the largest tensor is 16 MB
    cfg = ErnieConfig(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=14,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False)
    model = build_model(cfg, torch.float32)
    model.init_weights(seed=0)
    save_checkpoint(model, tmp_path / "hf", max_shard_size="100MB")
    del model
    size = sum(os.path.getsize(tmp_path / "hf" / f) for f in os.listdir(tmp_path / "hf"))
    assert size > 1.8 * LIMIT
    cgroup = os.path.join(CGROUP_ROOT, f"ernie45-test-{uuid.uuid4().hex[:8]}")
    os.makedirs(cgroup)
    try:
        with open(os.path.join(cgroup, "memory.limit_in_bytes"), "w") as f:
            f.write(str(LIMIT))
        r = _run_limited(cgroup, ["convert", "--from", "hf", "--to", "paddle", str(tmp_path / "hf"),
                                  str(tmp_path / "pd"), "--quiet"])
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        r = _run_limited(cgroup, ["convert", "--from", "paddle", "--to", "hf", str(tmp_path / "pd"),
                                  str(tmp_path / "back"), "--quiet"])
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes")) as f:
            assert int(f.read()) <= LIMIT
    finally:
        os.rmdir(cgroup)
    a, b = read_state_dict(str(tmp_path / "hf")), read_state_dict(str(tmp_path / "back"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
