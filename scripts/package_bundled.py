"""Last step of scripts/build_bundled_models.sh: SFT a pre-trained run, measure it, write the shipped model dir.

    python scripts/package_bundled.py --pretrained RUN --work WORK --name ernie-tiny --out DIR --sft-steps 300

Reads RUN/final (the pre-trained fp32 model) and RUN/log.jsonl, instruction-tunes on WORK/sft.jsonl with
`ernie45.train.sft.sft_train`, saves the model in bf16 with its tokenizer, a sampling `generation_config.json`
and a model card (README.md) holding the measured numbers: pre-training steps, wall time, eval loss, and the
held-out perplexity of the shipped (bf16) weights against the uniform baseline (the vocabulary size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

PROMPTS = ["写一首题为《静夜思》的诗", "写一首关于秋的诗", "Write a poem about the moon"]
GENERATION = {
    "do_sample": True,
    "temperature": 0.8,
    "top_p": 0.9,
    "top_k": 50,
    "repetition_penalty": 1.1,
    "max_new_tokens": 128,
}


def heldout_ppl(model, data_dirs: list[str]) -> dict[str, float]:
    """Perplexity (exp of the mean next-token loss) of every sample of each directory's train split."""
    from ernie45.data.shards import PackedDataset
    from ernie45.train.distributed import Dist
    from ernie45.train.pretrain import evaluate

    out = {}
    for d in data_dirs:
        ds = PackedDataset(d, "train")
        loss = evaluate(model, [ds], 8, 10**9, model.device, False, Dist())
        out[os.path.basename(d.rstrip("/"))] = math.exp(loss)
    return out


@torch.no_grad()
def sample_reply(model, tokenizer, prompt: str, seed: int = 0) -> str:
    """One sampled chat reply with the shipped generation settings (top-p, repetition penalty, KV cache)."""
    from ernie45.generation.sampling import (
        apply_repetition_penalty,
        apply_temperature,
        apply_top_k,
        apply_top_p,
    )

    g = torch.Generator().manual_seed(seed)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    seq = torch.tensor([ids])
    cache = model.new_cache(1, len(ids) + GENERATION["max_new_tokens"])
    logits = model(seq, cache=cache, logits_to_keep=1).logits[:, -1].float()
    out: list[int] = []
    stops = set(tokenizer.stop_token_ids)
    for _ in range(GENERATION["max_new_tokens"]):
        scores = apply_repetition_penalty(logits, seq, GENERATION["repetition_penalty"])
        scores = apply_top_p(
            apply_top_k(apply_temperature(scores, GENERATION["temperature"]), GENERATION["top_k"]),
            GENERATION["top_p"],
        )
        nxt = torch.multinomial(scores.softmax(-1), 1, generator=g)  # (1, 1)
        if int(nxt) in stops:
            break
        out.append(int(nxt))
        seq = torch.cat([seq, nxt], 1)
        logits = model(nxt, cache=cache).logits[:, -1].float()
    return tokenizer.decode(out, skip_special_tokens=True)


def model_card(
    name: str,
    cfg,
    pre: dict,
    sft: dict,
    ppl: dict,
    pre_ppl: dict,
    sources: dict,
    samples: dict,
    size_mb: float,
) -> str:
    kind = "MoE" if cfg.is_moe else "dense"
    moe = (
        f", {cfg.moe_num_experts} routed experts (top-{cfg.moe_k}) + {cfg.moe_num_shared_experts} shared expert"
        f" in layers {cfg.moe_layer_start_index}-{cfg.moe_layer_end_index}"
        if cfg.is_moe
        else ""
    )
    pkgs = "\n".join(
        f"- Debian `{p['package']}` {p['version']} — licence: {', '.join(p['licence'])} "
        f"({sum(p['files'].values())} documents from {', '.join(p['files'])})"
        for p in sources["packages"]
    )
    rows = "\n".join(f"| {k} | {v:.2f} | {cfg.vocab_size} | {pre_ppl[k]:.2f} |" for k, v in ppl.items())
    demo = "\n\n".join(f"**User:** {p}\n\n```text\n{r}\n```" for p, r in samples.items())
    return f"""# {name}

A tiny ERNIE 4.5-architecture {kind} model ({pre["num_parameters"] / 1e6:.2f} M parameters, {size_mb:.1f} MB in
bf16{moe}) shipped inside ernie45 so that `ernie45 chat`, `generate`, `serve` and the demos work with no
download. It writes classical-Chinese-style poems; it knows nothing else. It was built from scratch by
`scripts/build_bundled_models.sh` with ernie45's own pipeline: `ernie45 preprocess` → tokenizer training →
`ernie45 pretrain` → `ernie45.train.sft.sft_train`.

## Data

{pkgs}

Poems (Tang poems `tang300`, Song poems `song100`) are rewritten as `《title》\\n作者：author\\n<body>` and
oversampled {pre["poem_weight"]}x against the other fortunes-zh text (quotes, proverbs, Debian notes). About
8% of the poems (chosen by a hash of the title) are held out: never pre-trained or fine-tuned on.
The raw corpus is not included in ernie45; the build script fetches it with `apt-get download`.
The model weights are derived from this GPL-3.0+ packaged corpus.

## Training

| | |
|---|---|
| architecture | {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads (head_dim {cfg.head_dim}, {cfg.num_key_value_heads} KV heads), vocab {cfg.vocab_size} (SentencePiece BPE, byte fallback){moe} |
| pre-training | {pre["steps"]} steps × {pre["tokens_per_step"]} tokens (seq {pre["seq_len"]}), AdamW, {pre["schedule"]} LR schedule {pre["lr"]} → {pre["min_lr"]}, {pre["wall_time_s"] / 60:.1f} min on {pre["threads"]} CPU thread(s) |
| pre-training loss | train {pre["final_loss"]:.3f}, eval (held-out poems + val split) {pre["eval_loss"]:.3f} |
| SFT | {sft["steps"]} steps, batch {sft["batch_size"]}, lr {sft["lr"]}, {sft["examples"]} instruction examples ("写一首题为《X》的诗", "Write a poem about X" → a poem), loss {sft["first_loss"]:.3f} → {sft["last_loss"]:.3f}, {sft["wall_time_s"] / 60:.1f} min |

## Held-out perplexity (shipped bf16 weights)

| held-out set | perplexity | uniform baseline (vocab size) | after pre-training, before SFT (fp32) |
|---|---|---|---|
{rows}

SFT trades some perplexity on raw held-out poems for following the chat format.

## Samples (sampling with the shipped generation_config.json, seed 0)

{demo}

## Use

```bash
ernie45 chat --model {name}
```
"""


def main(argv: list[str] | None = None) -> int:
    from ernie45 import load
    from ernie45.checkpoint import load_checkpoint, save_checkpoint
    from ernie45.tokenizer import Tokenizer
    from ernie45.train.sft import sft_train
    from ernie45.utils import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", required=True, help="pretrain run directory (final/, log.jsonl)")
    p.add_argument(
        "--work", required=True, help="build work directory (sft.jsonl, data-*/, corpus SOURCES.json)"
    )
    p.add_argument("--sources", required=True, help="SOURCES.json written by scripts/fetch_corpus.py")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--poem-weight", type=int, required=True, help="the --data-weights of the poems (for the card)"
    )
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--sft-lr", type=float, default=5e-4)
    p.add_argument("--sft-batch-size", type=int, default=16)
    a = p.parse_args(argv)

    final = os.path.join(a.pretrained, "final")
    model = load_checkpoint(final, dtype="float32", device="cpu")
    tokenizer = Tokenizer.from_pretrained(final)
    with open(os.path.join(final, "training_summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    with open(
        os.path.join(
            a.pretrained,
            "checkpoints",
            sorted(os.listdir(os.path.join(a.pretrained, "checkpoints")))[-1],
            "trainer_state.json",
        ),
        encoding="utf-8",
    ) as f:
        args = json.load(f)["args"]
    with open(os.path.join(a.work, "sft.jsonl"), encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    pre_ppl = heldout_ppl(model, [os.path.join(a.work, "data-poems_heldout")])
    t0 = time.perf_counter()
    losses = sft_train(
        model,
        tokenizer,
        examples,
        steps=a.sft_steps,
        lr=a.sft_lr,
        batch_size=a.sft_batch_size,
        max_length=256,
        warmup=20,
        seed=0,
    )
    sft_time = time.perf_counter() - t0
    model = model.to(torch.bfloat16)
    sep = tokenizer.convert_tokens_to_ids("<|end_of_sentence|>")
    gen = {
        **GENERATION,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [tokenizer.eos_token_id, sep],
        "pad_token_id": tokenizer.pad_token_id,
    }
    save_checkpoint(
        model,
        a.out,
        tokenizer=tokenizer,
        overwrite=True,
        extra_files={"generation_config.json": json.dumps(gen, indent=2) + "\n"},
    )

    shipped, tok = load(a.out, dtype="float32", device="cpu")  # measure exactly what ships (bf16-rounded)
    ppl = heldout_ppl(shipped, [os.path.join(a.work, "data-poems_heldout")])
    samples = {q: sample_reply(shipped, tok, q) for q in PROMPTS}
    with open(a.sources, encoding="utf-8") as f:
        sources = json.load(f)
    ds_seq = int(
        json.load(open(os.path.join(a.work, "data-other", "index.json"), encoding="utf-8"))["seq_len"]
    )
    pre = {
        **summary,
        "poem_weight": a.poem_weight,
        "tokens_per_step": args["batch_size"] * args["grad_accum"] * ds_seq,
        "seq_len": ds_seq,
        "lr": args["lr"],
        "schedule": args["schedule"],
        "min_lr": args["lr"] * 0.1 if args["min_lr"] is None else args["min_lr"],
        "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
    }
    sft = {
        "steps": a.sft_steps,
        "batch_size": a.sft_batch_size,
        "lr": a.sft_lr,
        "examples": len(examples),
        "first_loss": sum(losses[:10]) / len(losses[:10]),
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "wall_time_s": sft_time,
    }
    size_mb = os.path.getsize(os.path.join(a.out, "model.safetensors")) / 1e6
    card = model_card(a.name, shipped.config, pre, sft, ppl, pre_ppl, sources, samples, size_mb)
    atomic_write_text(os.path.join(a.out, "README.md"), card)
    metrics = {
        "name": a.name,
        "pretrain": pre,
        "sft": sft,
        "heldout_ppl": ppl,
        "heldout_ppl_before_sft": pre_ppl,
        "uniform_ppl": shipped.config.vocab_size,
        "size_mb": size_mb,
    }
    atomic_write_text(
        os.path.join(a.out, "metrics.json"), json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
    )
    print(
        json.dumps(
            {"heldout_ppl": ppl, "vocab": shipped.config.vocab_size, "size_mb": size_mb}, ensure_ascii=False
        )
    )
    for q, r in samples.items():
        print(f"--- {q}\n{r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
