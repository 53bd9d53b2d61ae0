"""Train an ERNIE-format SentencePiece tokenizer (byte fallback, ERNIE special tokens, chat template)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

from ernie45.tokenizer import SPECIAL_PIECES, write_tokenizer_files


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000,
                    character_coverage: float = 0.9995, seed: int = 0) -> None:
    """Train a BPE SentencePiece model on `texts` and write the ERNIE tokenizer files into `out_dir`.

    Ids 0/1/2 are `<unk>`/`<s>`/`</s>` as in ERNIE 4.5; the special pieces follow; no dummy prefix
    (ERNIE adds no prefix space) and byte fallback so that any text round-trips.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
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
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=SPECIAL_PIECES,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    write_tokenizer_files(proto.getvalue(), out_dir)
