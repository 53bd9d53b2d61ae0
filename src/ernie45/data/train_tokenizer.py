"""Train an ERNIE-format SentencePiece tokenizer (byte fallback, ERNIE special tokens, chat template).

`ernie45 train-tokenizer --input FILE... --out DIR --vocab-size N` reads the same inputs as `ernie45
preprocess` (.txt / .jsonl / .parquet) and applies the same normalisation, so the vocabulary fits the text
that preprocessing will tokenise. The result loads with `ernie45.tokenizer.Tokenizer` and with transformers'
`AutoTokenizer.from_pretrained(DIR)`, which encode identically.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from collections.abc import Iterable, Iterator

from ernie45.errors import ErnieError
from ernie45.tokenizer import SPECIAL_PIECES, write_tokenizer_files

# SentencePiece silently skips training sentences longer than this many bytes (its max_sentence_length).
MAX_SENTENCE_BYTES = 4192


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1000,
    character_coverage: float = 0.9995,
    seed: int = 0,
) -> None:
    """Train a BPE SentencePiece model on `texts` and write the ERNIE tokenizer files into `out_dir`.

    Ids 0/1/2 are `<unk>`/`<s>`/`</s>` as in ERNIE 4.5; the special pieces follow; no dummy prefix
    (ERNIE adds no prefix space) and byte fallback so that any text round-trips.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(texts),
            model_writer=proto,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            max_sentence_length=MAX_SENTENCE_BYTES,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=SPECIAL_PIECES,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        need = re.search(r"required_chars\. \d+ vs (\d+)", msg)
        if need:
            raise ErnieError(
                f"--vocab-size {vocab_size} is too small: the corpus needs at least {need.group(1)} "
                "pieces for its characters; raise --vocab-size or lower --character-coverage"
            ) from None
        raise ErnieError(f"SentencePiece training failed: {msg}") from None
    write_tokenizer_files(proto.getvalue(), out_dir)


def training_pieces(doc: str, limit: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Split a document at line breaks into pieces SentencePiece will not skip (at most `limit` UTF-8 bytes).

    Whole documents are kept where they fit, so newlines are learned as part of pieces (`。\\n`); a single
    line longer than the limit is cut at character boundaries.
    """
    if len(doc.encode("utf-8")) <= limit:
        yield doc
        return
    buf, size = [], 0
    for line in doc.split("\n"):
        n = len(line.encode("utf-8")) + 1
        if buf and size + n > limit:
            yield "\n".join(buf)
            buf, size = [], 0
        while n > limit:
            cut = len(line.encode("utf-8")[: limit - 1].decode("utf-8", "ignore"))
            yield line[:cut]
            line = line[cut:]
            n = len(line.encode("utf-8")) + 1
        buf.append(line)
        size += n
    if buf:
        yield "\n".join(buf)


def train_tokenizer_from_files(
    inputs: list[str],
    out_dir: str | os.PathLike,
    vocab_size: int,
    character_coverage: float = 0.9995,
    seed: int = 0,
    normalize: bool = True,
    t2s: bool = False,
    text_key: str = "text",
    txt_mode: str = "paragraph",
    overwrite: bool = False,
) -> dict[str, int]:
    """Read corpus files like `ernie45 preprocess`, normalise them the same way and train a tokenizer.

    Returns the vocabulary size reached and counts of the documents used and skipped (not UTF-8 / empty).
    """
    from ernie45.data import filters
    from ernie45.data.preprocess import iter_records, list_input_files
    from ernie45.tokenizer import Tokenizer
    from ernie45.utils import atomic_directory

    if vocab_size < len(SPECIAL_PIECES) + 4:
        raise ErnieError(f"--vocab-size must be at least {len(SPECIAL_PIECES) + 4}")
    if not 0.0 < character_coverage <= 1.0:
        raise ErnieError("--character-coverage must be in (0, 1]")
    files = list_input_files(inputs)
    counts = {"documents": 0, "non_utf8": 0, "empty": 0}

    def texts() -> Iterator[str]:
        for raw in iter_records(files, text_key, txt_mode):
            if raw is None:
                counts["non_utf8"] += 1
                continue
            text = filters.normalize(raw, t2s=t2s) if normalize else raw
            if not text.strip():
                counts["empty"] += 1
                continue
            counts["documents"] += 1
            yield from training_pieces(text)

    pieces = list(texts())  # read fully first, so an empty corpus is reported before training starts
    if not pieces:
        raise ErnieError(f"empty corpus: no text in {', '.join(files)}")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        train_tokenizer(pieces, tmp, vocab_size=vocab_size, character_coverage=character_coverage, seed=seed)
        counts["vocab_size"] = Tokenizer.from_pretrained(tmp).vocab_size
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45 train-tokenizer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help=".txt, .jsonl or .parquet files, or directories searched recursively for them",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the tokenizer files")
    p.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help="number of pieces (must exceed the distinct characters of the corpus)",
    )
    p.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="fraction of characters covered by pieces; the rarest fall back to bytes",
    )
    p.add_argument(
        "--no-normalize",
        action="store_true",
        help="train on the raw text instead of the `ernie45 preprocess` normalisation",
    )
    p.add_argument("--t2s", action="store_true", help="convert traditional to simplified Chinese (OpenCC)")
    p.add_argument("--text-key", default="text", help="text field of .jsonl / column of .parquet")
    p.add_argument(
        "--txt-mode",
        choices=("paragraph", "line"),
        default="paragraph",
        help=".txt documents: blank-line separated blocks (paragraph) or single lines (line)",
    )
    p.add_argument("--seed", type=int, default=0, help="SentencePiece random seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = train_tokenizer_from_files(
        args.input,
        args.out,
        args.vocab_size,
        character_coverage=args.character_coverage,
        seed=args.seed,
        normalize=not args.no_normalize,
        t2s=args.t2s,
        text_key=args.text_key,
        txt_mode=args.txt_mode,
        overwrite=args.overwrite,
    )
    print(
        f"trained a {counts['vocab_size']}-token tokenizer on {counts['documents']} documents "
        f"(skipped: {counts['non_utf8']} not UTF-8, {counts['empty']} empty) -> {args.out}"
    )
    if counts["non_utf8"]:
        print(f"warning: skipped {counts['non_utf8']} documents that are not valid UTF-8", file=sys.stderr)
    return 0
