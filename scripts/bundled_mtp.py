"""The MTP head of the bundled ernie-tiny-moe (`scripts/build_bundled_models.sh`, last step).

  bundled_mtp.py prepare MODEL_DIR WORK_DIR [--variant pre_norm]
      copy the packaged model to WORK_DIR/moe-mtp with `mtp_hidden_state` set: `ernie45 pretrain --mtp distill
      --model WORK_DIR/moe-mtp` then trains the head on the frozen model
  bundled_mtp.py selfgen MODEL_DIR WORK_DIR
      write WORK_DIR/data-selfgen: the model's own continuations (greedy and sampled) of training-poem openings,
      other training text and the SFT chat prompts, as packed token shards for `pretrain --data`
  bundled_mtp.py ship RUN_FINAL MODEL_DIR HELDOUT_JSONL
      write the trained head into MODEL_DIR (bf16; the model's own tensors checked bit-identical), measure its
      acceptance on the held-out poems (greedy and sampled, k = 1..3) and add it to the model card and metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

from ernie45.utils import atomic_write_text


def prepare(model_dir: str, work: str, variant: str) -> None:
    out = os.path.join(work, "moe-mtp")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model_dir, out)
    path = os.path.join(out, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["mtp_hidden_state"] = variant
    cfg.pop("num_nextn_predict_layers", None)  # a head MODEL_DIR already ships is ignored: training starts afresh
    atomic_write_text(path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    print(out)


def opening(text: str, least: int = 12) -> str:
    """A prompt made of a document's opening quarter (at least `least` characters)."""
    return text[: max(least, len(text) // 4)]


def selfgen(model_dir: str, work: str, new_tokens: int = 160, n_other: int = 600, seed: int = 0) -> None:
    """The model's own text for the MTP head to learn on (self-distillation, as Medusa-2 and EAGLE train theirs).

    A draft is accepted when it equals what the model says next; the teacher's distribution is the target
    (`--mtp distill`) on any text, but the contexts the head sees at decode time are the model's own
    continuations -- greedy ones settle into repeated lines no corpus holds. The token ids are written as
    generated (decoding and re-encoding would change them). Held-out poems are never used.
    """
    import random

    import numpy as np

    import ernie45
    from ernie45.data import shards
    from ernie45.fast import optimize_for_inference
    from ernie45.generation import generate

    rng = random.Random(seed)
    model, tok = ernie45.load(model_dir, dtype="float32", device="cpu")
    optimize_for_inference(model)

    def read(name: str) -> list[dict]:
        with open(os.path.join(work, name), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    prompts = [tok.encode(opening(d["text"])) for d in read("poems_train.jsonl")]
    other = read("other.jsonl")
    other = rng.sample(other, min(n_other, len(other)))
    prompts += [tok.encode(opening(d["text"], 8)) for d in other]
    chats = read("sft.jsonl")
    chats = rng.sample(chats, min(len(prompts) // 2, len(chats)))
    prompts += [tok.apply_chat_template(c["messages"][:1], tokenize=True) for c in chats]
    greedy = dict(do_sample=False, repetition_penalty=1.0)
    sampled = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1)
    out = os.path.join(work, "data-selfgen")
    shutil.rmtree(out, ignore_errors=True)
    eos, pad = tok.eos_token_id, tok.pad_token_id or 0
    writer = shards.ShardWriter(os.path.join(out, "train"), 256, 1024)
    docs = 0
    for i, ids in enumerate(prompts):
        for kw in (greedy, dict(sampled, seed=seed + i)):
            seq = generate(model, [ids], max_new_tokens=new_tokens, eos_token_id=[], **kw)[0]
            writer.append(np.asarray(list(seq) + [eos]))
            docs += 1
        if i % 100 == 0:
            print(f"selfgen: {i}/{len(prompts)} prompts", flush=True)
    splits = shards.finalize_splits(out, {"train": writer}, {"train": docs}, eos, pad, tok.vocab_size, model_dir)
    print(f"selfgen: {docs} continuations, {splits['train']['num_tokens']} tokens in {out}")


def acceptance(model_dir: str, heldout: str, n_docs: int = 12, gen_len: int = 64) -> list[dict]:
    """Accepted drafts of the shipped head on held-out poem openings (a quarter of each poem as the prompt)."""
    import ernie45
    from ernie45.fast import optimize_for_inference
    from ernie45.generation import Speculative, generate

    with open(heldout, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()][:n_docs]
    model, tok = ernie45.load(model_dir, dtype="float32", device="cpu")
    optimize_for_inference(model)
    rows = []
    for k in (1, 2, 3):
        for sample in (False, True):
            sp = Speculative("mtp", k)
            for i, doc in enumerate(docs):
                ids = [tok.encode(opening(doc))]
                kw = dict(do_sample=True, temperature=0.8, top_p=0.9, seed=i) if sample else dict(do_sample=False)
                generate(model, ids, max_new_tokens=gen_len, eos_token_id=[], repetition_penalty=1.0, speculative=sp,
                         **kw)
            rows.append(dict(k=k, decoding="sampled (T 0.8, top-p 0.9)" if sample else "greedy",
                             accepted=sp.accepted, drafted=sp.drafted, passes=sp.steps,
                             per_pass=sp.accepted / max(sp.steps, 1)))
    return rows


def ship(final: str, model_dir: str, heldout: str) -> None:
    from ernie45.checkpoint import load_checkpoint, save_checkpoint
    from ernie45.checkpoint_read import read_state_dict

    model = load_checkpoint(final, dtype="float32", device="cpu").to(torch.bfloat16)
    before = read_state_dict(model_dir)
    tmp = tempfile.mkdtemp()
    try:
        save_checkpoint(model, os.path.join(tmp, "out"))
        after = read_state_dict(os.path.join(tmp, "out"))
        for name, t in before.items():
            if not name.startswith("model.mtp") and not torch.equal(after[name], t):
                sys.exit(f"{name} changed: the head must be trained on the frozen model")
        with open(os.path.join(tmp, "out", "config.json"), encoding="utf-8") as f:
            new_cfg = json.load(f)
        shutil.copy(os.path.join(tmp, "out", "model.safetensors"), os.path.join(model_dir, "model.safetensors"))
    finally:
        shutil.rmtree(tmp)
    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update({k: new_cfg[k] for k in ("num_nextn_predict_layers", "mtp_hidden_state") if k in new_cfg})
    atomic_write_text(path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    n = sum(t.numel() for name, t in after.items() if name.startswith("model.mtp"))
    rows = acceptance(model_dir, heldout)
    with open(os.path.join(final, "..", "log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f if line.strip()]
    metrics_path = os.path.join(model_dir, "metrics.json")
    with open(metrics_path, encoding="utf-8") as f:
        metrics = json.load(f)
    metrics["mtp"] = dict(parameters=n, hidden_state=cfg.get("mtp_hidden_state", "post_norm"), steps=len(log),
                          first_loss=log[0]["loss"], last_loss=log[-1]["loss"], acceptance=rows)
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    card_path = os.path.join(model_dir, "README.md")
    with open(card_path, encoding="utf-8") as f:
        card = f.read().split("\n## MTP head")[0].rstrip("\n")
    lines = ["", "", "## MTP head (speculative decoding)", "",
             f"One multi-token-prediction layer ({n:,} parameters, `mtp_hidden_state: "
             f"{metrics['mtp']['hidden_state']}`) drafts tokens for `--speculative mtp` (docs/speculative.md). It was "
             f"trained on the frozen model by `ernie45 pretrain --mtp distill` ({len(log)} steps, soft cross entropy "
             f"against the model's own next-token distribution: {log[0]['loss']:.3f} → {log[-1]['loss']:.3f}), so "
             "its guesses are what the model would say, which is what verification accepts. Its text is mostly the "
             "model's own: greedy and sampled continuations of training-poem openings, other training text and the "
             "SFT prompts (`scripts/bundled_mtp.py selfgen`, weight 4), beside the pre-training poems (2) and other "
             "text (1) -- the contexts a draft meets while the model decodes.", "",
             "Acceptance on the opening quarter of 12 held-out poems, 64 new tokens each (`scripts/bundled_mtp.py`):",
             "", "| drafts per pass (k) | decoding | accepted / drafted | accepted per pass |", "|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['decoding']} | {r['accepted']} / {r['drafted']} ({r['accepted'] / r['drafted']:.0%}) "
              f"| {r['per_pass']:.2f} |" for r in rows]
    atomic_write_text(card_path, card + "\n".join(lines) + "\n")
    print(json.dumps(metrics["mtp"], indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("model_dir")
    a.add_argument("work")
    a.add_argument("--variant", default="pre_norm", choices=("post_norm", "pre_norm"))
    g = sub.add_parser("selfgen")
    g.add_argument("model_dir")
    g.add_argument("work")
    b = sub.add_parser("ship")
    b.add_argument("final")
    b.add_argument("model_dir")
    b.add_argument("heldout")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.model_dir, args.work, args.variant)
    elif args.cmd == "selfgen":
        selfgen(args.model_dir, args.work)
    else:
        ship(args.final, args.model_dir, args.heldout)


if __name__ == "__main__":
    main()
