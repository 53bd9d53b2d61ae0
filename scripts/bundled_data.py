"""Data steps of scripts/build_bundled_models.sh: split the corpus, train the tokenizer, build SFT data.

    python scripts/bundled_data.py split CORPUS.jsonl WORK        # poems (train / held-out) and other text
    python scripts/bundled_data.py tokenizer WORK --vocab-size 4096
    python scripts/bundled_data.py sft WORK                       # WORK/sft.jsonl (chat `messages`)

Poems (documents of fortunes-zh that carry a title and an author) are rewritten in one format,
`《title》\\n作者：author\\n<body>`, the same format the instruction data asks the model to produce.
A fixed hash of the title picks ~8% of the poems as held-out: they are never pre-trained or fine-tuned on,
and the model cards report perplexity on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys

HELDOUT_PERCENT = 8
# (Chinese topic character, English topic) for "write a poem about X" instructions.
TOPICS = [
    ("月", "the moon"),
    ("春", "spring"),
    ("秋", "autumn"),
    ("山", "mountains"),
    ("雨", "rain"),
    ("花", "flowers"),
    ("酒", "wine"),
    ("风", "the wind"),
    ("雪", "snow"),
    ("江", "the river"),
    ("夜", "the night"),
    ("归", "going home"),
    ("柳", "willows"),
    ("云", "clouds"),
]
ZH_TITLE = [
    "写一首题为《{t}》的诗",
    "请写一首诗，题目是《{t}》",
    "以《{t}》为题写一首诗。",
    "作诗一首：《{t}》",
]
EN_TITLE = ["Write a poem titled {t}", 'Write a poem titled "{t}".', "Please write a poem called {t}."]
ZH_TOPIC = ["写一首关于{z}的诗", "写一首描写{z}的诗。", "请以{z}为主题写一首诗"]
EN_TOPIC = ["Write a poem about {e}", "Write a poem about {e}.", "Please write a short poem about {e}."]


def _heldout(title: str) -> bool:
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def _poem(doc: dict) -> dict | None:
    """{"title", "author", "body", "text"} for a titled poem, else None."""
    if "title" not in doc or "author" not in doc:
        return None
    lines = doc["text"].split("\n")
    body = "\n".join(ln.strip() for ln in lines[2:] if ln.strip())
    if not body:
        return None
    author = re.sub(r"[（(].*$", "", doc["author"]).strip()
    text = f"《{doc['title']}》\n作者：{author}\n{body}"
    return {"title": doc["title"], "author": author, "body": body, "text": text}


def split(corpus: str, work: str) -> None:
    """WORK/poems_train.jsonl, WORK/poems_heldout.jsonl, WORK/other.jsonl (all {"text": ...})."""
    out = {name: [] for name in ("poems_train", "poems_heldout", "other")}
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            poem = _poem(doc)
            if poem is None:
                out["other"].append({"text": doc["text"]})
            else:
                out["poems_heldout" if _heldout(poem["title"]) else "poems_train"].append(poem)
    os.makedirs(work, exist_ok=True)
    for name, docs in out.items():
        with open(os.path.join(work, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        print(f"{name}: {len(docs)} documents")


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenizer(work: str, vocab_size: int) -> None:
    """Train the ERNIE-format tokenizer on all text (poems repeated so that their rare characters are kept)."""
    from ernie45.data.train_tokenizer import train_tokenizer

    poems = [d["text"] for d in _read(os.path.join(work, "poems_train.jsonl"))]
    other = [d["text"] for d in _read(os.path.join(work, "other.jsonl"))]
    prompts = [
        p.format(t="X", z=z, e=e) for p in ZH_TITLE + EN_TITLE + ZH_TOPIC + EN_TOPIC for z, e in TOPICS
    ]
    train_tokenizer(
        poems * 4 + other + prompts * 4,
        os.path.join(work, "tokenizer"),
        vocab_size=vocab_size,
        character_coverage=0.99,
    )


def sft(work: str, seed: int = 0) -> None:
    """WORK/sft.jsonl: instruction → poem pairs from the training poems, in Chinese and English."""
    rng = random.Random(seed)
    poems = _read(os.path.join(work, "poems_train.jsonl"))
    rows = []
    for p in poems:
        answer = p["text"]
        for tpl in rng.sample(ZH_TITLE, 2) + rng.sample(EN_TITLE, 1):
            rows.append(
                [
                    {"role": "user", "content": tpl.format(t=p["title"])},
                    {"role": "assistant", "content": answer},
                ]
            )
    for z, e in TOPICS:
        hits = [p for p in poems if z in p["title"] or z in p["body"][:12]]
        for p in rng.sample(hits, min(len(hits), 12)):
            rows.append(
                [
                    {"role": "user", "content": rng.choice(ZH_TOPIC).format(z=z)},
                    {"role": "assistant", "content": p["text"]},
                ]
            )
            rows.append(
                [
                    {"role": "user", "content": rng.choice(EN_TOPIC).format(e=e)},
                    {"role": "assistant", "content": p["text"]},
                ]
            )
    rng.shuffle(rows)
    with open(os.path.join(work, "sft.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in rows)
    print(f"sft: {len(rows)} conversations")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("corpus")
    s.add_argument("work")
    t = sub.add_parser("tokenizer")
    t.add_argument("work")
    t.add_argument("--vocab-size", type=int, default=4096)
    f = sub.add_parser("sft")
    f.add_argument("work")
    f.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "split":
        split(a.corpus, a.work)
    elif a.cmd == "tokenizer":
        tokenizer(a.work, a.vocab_size)
    else:
        sft(a.work, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
