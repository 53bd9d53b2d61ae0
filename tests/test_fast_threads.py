"""The C decoder shared by several threads (the web UI, LangChain, user code): each thread's greedy tokens are
those it gets alone. The decoder has one scratch area per model, so unguarded concurrent steps overwrite each
other's activations."""

import threading

import pytest
import torch
from conftest import make_hf_model, save_hf

import ernie45
from ernie45 import native
from ernie45.device import cpu_has_fast_bf16
from ernie45.fast import optimize_for_inference
from ernie45.generation import generate

NEW_TOKENS = 300  # long batch-1 decodes: thousands of C steps that overlap between the threads
ROUNDS = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    hf = make_hf_model("dense", max_position_embeddings=1024)
    return save_hf(hf, tmp_path_factory.mktemp("threads") / "dense", tokenizer_dir)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_concurrent_generate_matches_single_thread(ckpt, dtype):
    """Two threads decode two prompts on one model at once, several times: each gets its single-thread tokens."""
    lib = native.load("decode")
    if lib is None or lib.ernie_simd_width() < 128:
        pytest.skip("no C compiler: the C decode step is not built here")
    if dtype == "bfloat16" and not cpu_has_fast_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX)")
    model, tok = ernie45.load(ckpt, dtype=dtype, device="cpu")
    optimize_for_inference(model)
    assert model.fast_decoder is not None
    prompts = [torch.tensor([tok.encode("床前明月光，疑是地上霜。")]), torch.tensor([tok.encode("Hello world!")])]

    def run(p):
        return generate(model, p, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    alone = [run(p) for p in prompts]
    assert not torch.equal(alone[0], alone[1])
    for _ in range(ROUNDS):
        out = _together([lambda p=p: run(p) for p in prompts])
        for i in range(2):
            assert torch.equal(out[i], alone[i]), f"thread {i}'s tokens differ from its single-thread run"


def _together(fns: list) -> list:
    """The results of `fns`, each run in its own thread, all released at once."""
    out, start = [None] * len(fns), threading.Barrier(len(fns))

    def worker(i):
        start.wait()
        out[i] = fns[i]()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
