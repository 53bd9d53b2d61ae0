"""The tokenizer of a GGUF file, rebuilt from its vocabulary: a GGUF carries no `tokenizer.model`, only llama.cpp's
token list, scores and token types.

llama.cpp's "llama" vocabulary is SentencePiece's: the pieces become a SentencePiece `ModelProto` again (BPE, which
merges by piece score exactly as llama.cpp's SPM tokenizer does), with byte-fallback pieces `<0xNN>`, the unknown
token as UNKNOWN and the other types as written. CONTROL tokens become the special added tokens that
`ernie45.tokenizer.Tokenizer` matches whole in text; the special-token ids, BOS/EOS flags and the chat template come
from the `tokenizer.*` keys. The `[PAD{id}]` rows that pad the vocabulary to the embedding's size are dropped.
"""

from __future__ import annotations

from typing import Any

from ernie45.errors import ErnieError
from ernie45.gguf_file import GGUFFile

# gguf.TokenType and SentencePiece's ModelProto.SentencePiece.Type share their numbers
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL_KEYS = {  # tokenizer_config.json key -> GGUF id key
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",
    "mask_token": "tokenizer.ggml.mask_token_id",
}


def sentencepiece_from_gguf(f: GGUFFile) -> tuple[bytes, dict[str, Any]]:
    """(serialized SentencePiece ModelProto, tokenizer_config.json-style dict) of the GGUF's vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = f.get("tokenizer.ggml.model")
    if model != "llama":
        raise ErnieError(f"{f.path}: tokenizer model {model!r} is not SentencePiece ('llama'); pass "
                         "tokenizer=DIR (a directory with the model's tokenizer.model)")
    tokens = f.get("tokenizer.ggml.tokens")
    n = len(tokens)
    scores = f.get("tokenizer.ggml.scores", [0.0] * n)
    types = f.get("tokenizer.ggml.token_type", [NORMAL] * n)
    if not (len(scores) == len(types) == n):
        raise ErnieError(f"{f.path}: the GGUF has {n} tokens but {len(scores)} scores and {len(types)} token types")
    while n and types[n - 1] == UNUSED and tokens[n - 1] == f"[PAD{n - 1}]":
        n -= 1
    ids = {k: f.get(key, None) for k, key in _SPECIAL_KEYS.items()}
    ids = {k: int(v) for k, v in ids.items() if v is not None and 0 <= int(v) < n}
    unk = ids.get("unk_token", 0)
    proto = pb.ModelProto()
    for i in range(n):
        p = proto.pieces.add()
        typ = UNKNOWN if i == unk else int(types[i])
        # user-defined pieces are matched on raw text, written with spaces; SentencePiece matches them escaped
        p.piece = tokens[i].replace(" ", "\u2581") if typ == USER_DEFINED else tokens[i]
        p.score, p.type = float(scores[i]), typ
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = BYTE in types[:n]
    ts.unk_id, ts.unk_piece = unk, tokens[unk]
    ts.bos_id, ts.eos_id, ts.pad_id = -1, -1, -1  # bos/eos are looked up by piece, and must be CONTROL there
    for key, field in (("bos_token", "bos"), ("eos_token", "eos")):
        if key in ids and types[ids[key]] == CONTROL:
            setattr(ts, f"{field}_id", ids[key])
            setattr(ts, f"{field}_piece", tokens[ids[key]])
    ns = proto.normalizer_spec
    ns.name = "identity"  # llama.cpp applies no normalisation
    ns.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's SPM default
    ns.remove_extra_whitespaces = bool(f.get("tokenizer.ggml.remove_extra_whitespaces", False))
    ns.escape_whitespaces = True
    config: dict[str, Any] = {
        "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", True)),  # llama.cpp's SPM default
        "add_eos_token": bool(f.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": ns.add_dummy_prefix,
        **{k: tokens[i] for k, i in ids.items()},
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i in range(n) if types[i] in (CONTROL, UNKNOWN) or i == unk
        },
    }
    template = f.get("tokenizer.chat_template", None)
    if template:
        config["chat_template"] = template
    return proto.SerializeToString(), config
