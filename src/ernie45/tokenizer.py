"""The ERNIE 4.5 tokenizer: SentencePiece (byte fallback) + `tokenizer_config.json` + the chat template.

Behaves like transformers' `AutoTokenizer` on an ERNIE checkpoint: no BOS added, no prefix space, special
tokens in the text are matched whole, and `apply_chat_template` renders the same string (ARCHITECTURE.md §6).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ernie45.errors import ErnieError

# transformers' convert_ernie4_5_tokenizer.py default template (identical to the hub tokenizer_config.json).
DEFAULT_CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}\n"
    "    {%- set add_generation_prompt = true -%}\n"
    "{%- endif -%}\n"
    "{%- if not cls_token is defined -%}\n"
    '    {%- set cls_token = "<|begin_of_sentence|>" -%}\n'
    "{%- endif -%}\n"
    "{%- if not sep_token is defined -%}\n"
    '    {%- set sep_token = "<|end_of_sentence|>" -%}\n'
    "{%- endif -%}\n"
    "{{- cls_token -}}\n"
    "{%- for message in messages -%}\n"
    '    {%- if message["role"] == "user" -%}\n'
    '        {{- "User: " + message["content"] + "\\n" -}}\n'
    '    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n'
    '    {%- elif message["role"] == "system" -%}\n'
    '        {{- message["content"] + "\\n" -}}\n'
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    '    {{- "Assistant: " -}}\n'
    "{%- endif -%}"
)

# The special pieces an ERNIE-format SentencePiece model carries right after <unk>, <s>, </s>.
SPECIAL_PIECES = [
    "<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:0>", "<mask:1>",
    "<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>", "<|IMAGE_PLACEHOLDER|>", "<|AUDIO_PLACEHOLDER|>",
]
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
SPECIAL_TOKENS_MAP = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
    "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "mask_token": "<mask:1>",
}


class Tokenizer:
    """SentencePiece tokenizer with ERNIE's special tokens and chat template.

    Args:
        model_file: path to `tokenizer.model` (None with `model_proto`).
        config: the parsed `tokenizer_config.json` (may be empty).
        model_proto: a serialized SentencePiece ModelProto instead of a file (a vocabulary rebuilt from a GGUF).
    """

    def __init__(self, model_file: str | None, config: dict[str, Any] | None = None, *,
                 model_proto: bytes | None = None):
        import sentencepiece as spm

        self.config = dict(config or {})
        self.sp = spm.SentencePieceProcessor()
        try:
            if model_proto is None:
                self.sp.Load(model_file)
            else:
                self.sp.LoadFromSerializedProto(model_proto)
        except (OSError, RuntimeError) as e:
            raise ErnieError(f"cannot read SentencePiece model {model_file or 'rebuilt from GGUF'}: {e}") from None
        self._pieces = self.sp.GetPieceSize()  # read per id by `decode`, which streaming calls every token
        cfg = self.config
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.add_eos_token = bool(cfg.get("add_eos_token", False))
        self.special_tokens_map = {k: _content(cfg[k]) for k in SPECIAL_TOKENS_MAP if cfg.get(k)}
        for k, v in SPECIAL_TOKENS_MAP.items():
            self.special_tokens_map.setdefault(k, v)
        self.chat_template = cfg.get("chat_template") or DEFAULT_CHAT_TEMPLATE
        # Tokens matched whole before SentencePiece sees the text: every added/special token.
        self.added_tokens: dict[str, int] = {}
        for sid, tok in (cfg.get("added_tokens_decoder") or {}).items():
            self.added_tokens[_content(tok)] = int(sid)
        for tok in list(self.special_tokens_map.values()) + [
            _content(t) for t in cfg.get("additional_special_tokens") or []
        ]:
            pid = self.sp.PieceToId(tok)
            if tok not in self.added_tokens and (pid != self.sp.unk_id() or tok == "<unk>"):
                self.added_tokens[tok] = pid
        self.special_ids = set(self.added_tokens.values()) | {self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()}
        self.special_ids.discard(-1)
        self._id_to_added = {v: k for k, v in self.added_tokens.items()}
        pattern = "|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True))
        self._split_re = re.compile(f"({pattern})") if pattern else None
        self._templates: dict[str, Any] = {}  # chat template source -> compiled Jinja template

    # ---- properties ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self.sp.GetPieceSize(), max(self.added_tokens.values(), default=-1) + 1)

    def __len__(self) -> int:
        return self.vocab_size

    def _tok_id(self, key: str) -> int | None:
        tok = self.special_tokens_map.get(key)
        return None if tok is None else self.convert_tokens_to_ids(tok)

    @property
    def bos_token_id(self) -> int | None:
        return self._tok_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._tok_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._tok_id("pad_token")

    @property
    def cls_token_id(self) -> int | None:
        return self._tok_id("cls_token")

    @property
    def sep_token_id(self) -> int | None:
        return self._tok_id("sep_token")

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a chat turn: `</s>`, `<|end_of_sentence|>` and (Thinking vocabularies) `<|im_end|>`."""
        im_end = self.added_tokens.get("<|im_end|>")
        return [t for t in (self.eos_token_id, self.sep_token_id, im_end) if t is not None]

    def convert_tokens_to_ids(self, token: str) -> int:
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self.sp.PieceToId(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._id_to_added.get(i) or self.sp.IdToPiece(i) for i in ids]

    # ---- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text to ids. Special tokens written in the text map to their ids (as transformers does).

        `add_special_tokens` adds BOS/EOS only when `tokenizer_config.json` asks for them (ERNIE does not).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = []
        parts = self._split_re.split(text) if self._split_re else [text]
        for part in parts:
            if not part:
                continue
            if part in self.added_tokens:
                ids.append(self.added_tokens[part])
            else:
                ids.extend(self.sp.EncodeAsIds(part))
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    __call__ = encode

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if i in self._id_to_added or i in self.special_ids:
                if run:
                    out.append(self.sp.DecodeIds(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._id_to_added.get(i) or self.sp.IdToPiece(i))
            elif 0 <= i < self._pieces:
                run.append(i)
        if run:
            out.append(self.sp.DecodeIds(run))
        return "".join(out)

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` exactly as transformers' `apply_chat_template` does.

        `tools` (OpenAI function definitions), `role: "tool"` results and assistant `tool_calls` go to the
        checkpoint's template; a template that cannot show them (it never mentions tools) is replaced, for that
        conversation, by the ERNIE 4.5 Thinking format (`chat_template.THINKING_CHAT_TEMPLATE`).
        Returns the string, or its ids (`tokenize=True`, encoded without adding special tokens).
        """
        from jinja2 import TemplateError

        from ernie45.chat_template import THINKING_CHAT_TEMPLATE, compile_template

        uses_tools = bool(tools)
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
                raise ErnieError("each chat message must be a dict with 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:
                raise ErnieError(f"unknown chat role {m['role']!r} (expected one of {', '.join(CHAT_ROLES)})")
            uses_tools = uses_tools or m["role"] == "tool" or bool(m.get("tool_calls"))
        source = self.chat_template
        if uses_tools and "tool" not in source:
            source = THINKING_CHAT_TEMPLATE
        if source not in self._templates:
            self._templates[source] = compile_template(source)
        try:
            text = self._templates[source].render(
                messages=list(messages), tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs},
            )
        except TemplateError as e:
            raise ErnieError(f"chat template: {e}") from None
        return self.encode(text) if tokenize else text

    # ---- files -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """From a checkpoint directory (`tokenizer.model`, `tokenizer_config.json`), or a GGUF file's vocabulary."""
        from ernie45.gguf_file import is_gguf

        path = os.fspath(path)
        if is_gguf(path):
            return cls.from_gguf(path)
        model_file = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(model_file):
            raise ErnieError(f"no tokenizer.model in {path}")
        cfg: dict[str, Any] = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ErnieError(f"{cfg_file} is not valid JSON: {e}") from None
        tmpl = os.path.join(path, "chat_template.jinja")
        if not cfg.get("chat_template") and os.path.isfile(tmpl):
            with open(tmpl, encoding="utf-8") as f:
                cfg["chat_template"] = f.read()
        return cls(model_file, cfg)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer a GGUF file embeds (llama.cpp's "llama" SentencePiece vocabulary, `ernie45.gguf_tokenizer`)."""
        from ernie45.gguf_file import GGUFFile
        from ernie45.gguf_tokenizer import sentencepiece_from_gguf

        proto, cfg = sentencepiece_from_gguf(GGUFFile(path))
        return cls(None, cfg, model_proto=proto)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        write_tokenizer_files(self.sp.serialized_model_proto(), directory, chat_template=self.chat_template)


def _content(tok: Any) -> str:
    return tok["content"] if isinstance(tok, dict) else str(tok)


def tokenizer_config(sp_model_proto: bytes, chat_template: str = DEFAULT_CHAT_TEMPLATE) -> dict[str, Any]:
    """The `tokenizer_config.json` of an ERNIE checkpoint for the given SentencePiece model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_model_proto)
    decoder = {}
    for piece in ["<unk>", "<s>", "</s>", *SPECIAL_PIECES]:
        pid = sp.PieceToId(piece)
        if pid != sp.unk_id() or piece == "<unk>":
            decoder[str(pid)] = {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
    additional = [p for p in SPECIAL_PIECES if p not in SPECIAL_TOKENS_MAP.values()
                  and sp.PieceToId(p) != sp.unk_id()]
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "padding_side": "left",
        **SPECIAL_TOKENS_MAP,
        "additional_special_tokens": additional,
        "added_tokens_decoder": decoder,
        "chat_template": chat_template,
    }


def write_tokenizer_files(sp_model_proto: bytes, directory: str | os.PathLike,
                          chat_template: str = DEFAULT_CHAT_TEMPLATE) -> None:
    """Write `tokenizer.model`, `tokenizer_config.json` and `special_tokens_map.json` (atomically)."""
    from ernie45.utils import atomic_write_bytes, atomic_write_text

    directory = os.fspath(directory)
    cfg = tokenizer_config(sp_model_proto, chat_template)
    atomic_write_bytes(os.path.join(directory, "tokenizer.model"), sp_model_proto)
    atomic_write_text(os.path.join(directory, "tokenizer_config.json"),
                      json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    stm = {**SPECIAL_TOKENS_MAP, "additional_special_tokens": cfg["additional_special_tokens"]}
    atomic_write_text(os.path.join(directory, "special_tokens_map.json"),
                      json.dumps(stm, indent=2, ensure_ascii=False) + "\n")
