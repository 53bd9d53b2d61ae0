"""The other side of `ernie45 serve --tp N`: ranks > 0 serve no HTTP; they replay rank 0's engine steps on
their shard of the model (`ModelRunner.follow`) until rank 0 releases them or is gone.
"""

from __future__ import annotations

import logging
import signal

import torch

from ernie45.errors import ErnieError
from ernie45.serve.kv import kv_cache_blocks
from ernie45.serve.request import EngineArgs
from ernie45.serve.runner import ModelRunner

log = logging.getLogger("ernie45.serve")


def follow(model, args: EngineArgs, rank: int) -> None:
    """Ranks > 0: replay rank 0's engine steps on this rank's shard until rank 0 stops."""
    runner = ModelRunner(
        model, kv_cache_blocks(model, args), args.block_size, room=3 * args.max_num_seqs, kv_dtype=args.kv_cache_dtype
    )
    # Rank 0 decides when to stop: on Ctrl-C / SIGTERM it drains its requests (which needs every rank), then
    # releases the followers. If rank 0 is gone instead, the next collective fails and this rank exits.
    if args.speculative == "mtp":  # rank 0 sends each MTP-layer call (`ernie45.serve.drafter.ReplicatedMTP`)
        from ernie45.generation.speculative import _mtp_head

        runner.mtp_head = _mtp_head(model, None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.info("rank %d: following rank 0", rank)
    try:
        with torch.inference_mode():
            runner.follow()
    except RuntimeError as e:  # gloo reports a lost peer as a plain RuntimeError, NCCL as DistError
        raise ErnieError(f"rank {rank} stopped: {e}") from None
    log.info("rank %d: stopped", rank)
