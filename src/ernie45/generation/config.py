"""`GenerationConfig`: the decoding parameters, read from a checkpoint's `generation_config.json`.

Field names and defaults follow transformers 5.x `GenerationConfig`: every field is `None` until set, and the
defaults (`_DEFAULTS`, including `top_k=50` when sampling) are applied at generate time, so a checkpoint's file
overrides them and explicit arguments override the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ernie45.errors import ErnieError

# transformers' `GenerationConfig._get_default_generation_params` (the subset ernie45 implements).
_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "num_return_sequences": 1,
}
# New tokens generated when neither max_new_tokens nor max_length is set (transformers: max_length=20 + prompt).
DEFAULT_MAX_NEW_TOKENS = 20
# Keys transformers writes that carry no decoding parameter.
_BOOKKEEPING = {
    "_from_model_config",
    "transformers_version",
    "output_attentions",
    "output_hidden_states",
    "use_cache",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
}


@dataclass
class GenerationConfig:
    """Decoding parameters (transformers names). `None` means "not set": the next layer down decides.

    Layers, lowest first: transformers' defaults, the checkpoint's `generation_config.json` (or its
    `config.json` special tokens), a `generation_config=` argument, explicit keyword arguments.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    num_return_sequences: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    # keys of generation_config.json that ernie45 does not use, kept so that saving loses nothing
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        names = set(cls.field_names())
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """Special tokens from an `ErnieConfig` (what transformers writes as `_from_model_config`)."""
        return cls(
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            bos_token_id=config.bos_token_id,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GenerationConfig:
        """Read `generation_config.json` from a checkpoint directory, else the special tokens of `config.json`."""
        path = os.fspath(path)
        file = os.path.join(path, "generation_config.json")
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ErnieError(f"{file} is not valid JSON: {e}") from None
            if not isinstance(d, dict):
                raise ErnieError(f"{file} must hold a JSON object")
            return cls.from_dict(d)
        from ernie45.config import ErnieConfig

        return cls.from_model_config(ErnieConfig.from_pretrained(path))

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.field_names() if getattr(self, k) is not None}
        return {**self.extra, **d}

    def save(self, directory: str | os.PathLike) -> None:
        from ernie45.utils import atomic_write_text

        atomic_write_text(
            os.path.join(os.fspath(directory), "generation_config.json"),
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n",
        )

    def update(self, **kwargs: Any) -> GenerationConfig:
        """A copy with every non-None keyword applied; an unknown name is an error (typos must not pass)."""
        names = set(self.field_names())
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise ErnieError(f"unknown generation parameter(s): {', '.join(unknown)}")
        return dataclasses.replace(
            self, **{k: v for k, v in kwargs.items() if v is not None}, extra=dict(self.extra)
        )

    def merge(self, other: GenerationConfig | None) -> GenerationConfig:
        """A copy with `other`'s set fields on top."""
        if other is None:
            return self.update()
        return self.update(**{k: getattr(other, k) for k in self.field_names()})

    def with_defaults(self) -> GenerationConfig:
        """Fill unset fields with transformers' defaults; `temperature=0` means greedy (see docs/generate.md)."""
        cfg = dataclasses.replace(self, extra=dict(self.extra))
        for k, v in _DEFAULTS.items():
            if getattr(cfg, k) is None:
                setattr(cfg, k, v)
        if cfg.temperature == 0:
            cfg.do_sample = False
        return cfg

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(x) for x in e] if isinstance(e, (list, tuple)) else [int(e)]

    @property
    def stop_string_list(self) -> list[str]:
        s = self.stop_strings
        if s is None:
            return []
        return [s] if isinstance(s, str) else list(s)

    def validate(self) -> None:
        """Raise ErnieError for any out-of-range value (call after `with_defaults`)."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ErnieError(msg)

        need(
            self.max_new_tokens is None or _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}",
        )
        need(
            self.max_length is None or _is_int(self.max_length) and self.max_length >= 1,
            f"max_length must be an integer >= 1, got {self.max_length}",
        )
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size", "top_k"):
            v = getattr(self, name)
            need(v is None or _is_int(v) and v >= 0, f"{name} must be an integer >= 0, got {v}")
        need(
            self.temperature is None or _is_num(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0, got {self.temperature}",
        )
        need(
            self.top_p is None or _is_num(self.top_p) and 0 < self.top_p <= 1,
            f"top_p must be in (0, 1], got {self.top_p}",
        )
        need(
            self.min_p is None or _is_num(self.min_p) and 0 <= self.min_p <= 1,
            f"min_p must be in [0, 1], got {self.min_p}",
        )
        need(
            self.repetition_penalty is None
            or _is_num(self.repetition_penalty)
            and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            need(v is None or _is_num(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v}")
        need(
            self.num_beams is None or _is_int(self.num_beams) and self.num_beams >= 1,
            f"num_beams must be an integer >= 1, got {self.num_beams}",
        )
        need(
            self.num_return_sequences is None
            or _is_int(self.num_return_sequences)
            and self.num_return_sequences >= 1,
            f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences}",
        )
        need(
            self.length_penalty is None or _is_num(self.length_penalty),
            f"length_penalty must be a number, got {self.length_penalty}",
        )
        need(
            self.early_stopping in (None, True, False, "never"),
            f"early_stopping must be True, False or 'never', got {self.early_stopping!r}",
        )
        need(
            all(_is_int(t) and t >= 0 for t in self.eos_token_ids),
            f"eos_token_id must be a non-negative integer or a list of them, got {self.eos_token_id}",
        )
        need(
            self.pad_token_id is None or _is_int(self.pad_token_id) and self.pad_token_id >= 0,
            f"pad_token_id must be a non-negative integer, got {self.pad_token_id}",
        )
        need(
            all(isinstance(s, str) and s for s in self.stop_string_list),
            "stop_strings must be a non-empty string or a list of them",
        )
        beams, n = self.num_beams or 1, self.num_return_sequences or 1
        if beams > 1:
            need(n <= beams, f"num_return_sequences ({n}) must be <= num_beams ({beams})")
        elif n > 1:
            need(
                bool(self.do_sample),
                "num_return_sequences > 1 needs sampling (do_sample=True) or beam search",
            )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
