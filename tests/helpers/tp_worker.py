"""Run under torchrun: load a checkpoint tensor-parallel, compute logits and greedy tokens, report RSS growth.

Usage: torchrun --standalone --nproc-per-node N tp_worker.py CKPT OUT.pt TP EP
With TP=1 and no torchrun it runs the single-process reference.
"""

import os
import sys

import torch


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def main():
    ckpt, out, tp, ep = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    from ernie45.checkpoint import build_model, load_checkpoint
    from ernie45.config import preset

    # warm torch's lazy one-off allocations so RSS growth measures the model only
    build_model(preset("tiny"), torch.float32, meta=True)
    w = build_model(preset("tiny"), torch.float32)
    with torch.no_grad():
        w(torch.tensor([[1, 2, 3]]))
        for n in (1, 11, 22):  # first GEMMs of each shape class allocate BLAS scratch buffers
            torch.randn(n, 2048) @ torch.randn(2048, 1024)
    del w
    base = rss()
    if tp > 1:
        from ernie45.parallel import init_distributed, load_parallel

        rank, _ = init_distributed("cpu", timeout_s=60)
        model = load_parallel(ckpt, tp, ep, dtype="float32", device="cpu")
    else:
        rank = 0
        model = load_checkpoint(ckpt, dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
        cache = model.new_cache(1, 64)
        seq = ids[:1]
        step = model(seq, cache=cache, logits_to_keep=1).logits
        toks = []
        for _ in range(16):
            t = step[:, -1].argmax(-1, keepdim=True)
            toks.append(int(t))
            step = model(t, cache=cache).logits
    peak = rss() - base
    if tp > 1:
        import torch.distributed as dist

        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
        dist.destroy_process_group()
    else:
        peaks = [peak]
    if rank == 0:
        torch.save({"logits": logits, "tokens": toks, "peaks": peaks}, out)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
