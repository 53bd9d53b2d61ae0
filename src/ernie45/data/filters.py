"""Unicode normalisation and document quality filters for pre-training corpora.

Normalisation rule (docs/preprocess.md):
  1. line breaks become `\\n`; each line loses trailing whitespace; the document is stripped;
  2. NFKC, which also maps full-width ASCII (`ＡＢＣ１２３`, `＃`, the ideographic space) to half-width;
  3. except that in a line containing a Han character the Chinese punctuation `，！？：；（）～…` is kept
     full-width (NFKC would turn `你好，世界` into `你好,世界` and `……` into `......`);
  4. optionally traditional → simplified Chinese with OpenCC (`t2s`).

Filters (a document is removed by the first one that fails, in this order):
  control      any control character other than tab and newline (binary junk, terminal colour codes);
  min_chars    fewer than `min_chars` non-whitespace characters;
  symbol_ratio more than `max_symbol_ratio` of the non-whitespace characters are neither letters,
               digits nor combining marks (Unicode categories L*, N*, M*);
  dup_lines    more than `max_dup_line_ratio` of the non-empty lines repeat an earlier line of the document.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Han ideographs: CJK Unified (+ Ext. A..H) and the compatibility block.
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
# Full-width punctuation that reads as Chinese punctuation in a Chinese line; NFKC would make it ASCII.
CHINESE_PUNCTUATION = "，！？：；（）～…"
_KEEP_SPLIT = re.compile(f"([{re.escape(CHINESE_PUNCTUATION)}])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x85]")

FILTER_NAMES = ("control", "min_chars", "symbol_ratio", "dup_lines")


@lru_cache(maxsize=1)
def _t2s():
    from opencc import OpenCC

    return OpenCC("t2s")


def _normalize_line(line: str) -> str:
    if not _HAN.search(line):
        return unicodedata.normalize("NFKC", line).rstrip()
    # re.split with a capture group puts the kept punctuation at odd indices.
    parts = _KEEP_SPLIT.split(line)
    return "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts)).rstrip()


def normalize(text: str, t2s: bool = False) -> str:
    """Apply the normalisation rule above; the result is what gets filtered, deduplicated and tokenised."""
    text = _LINE_BREAKS.sub("\n", text)
    text = "\n".join(_normalize_line(line) for line in text.split("\n")).strip()
    return _t2s().convert(text) if t2s else text


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the quality filters (see the module docstring for their meaning)."""

    min_chars: int = 20
    max_symbol_ratio: float = 0.3
    max_dup_line_ratio: float = 0.3


def symbol_ratio(text: str) -> float:
    """Fraction of non-whitespace characters that are punctuation, symbols or other non-word characters."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    symbols = sum(1 for c in chars if unicodedata.category(c)[0] not in "LNM")
    return symbols / len(chars)


def dup_line_ratio(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line of the same document."""
    lines = [s for s in (line.strip() for line in text.split("\n")) if s]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def check(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first filter `text` fails (one of FILTER_NAMES), or None when it passes all."""
    if _CONTROL.search(text):
        return "control"
    if sum(1 for c in text if not c.isspace()) < cfg.min_chars:
        return "min_chars"
    if symbol_ratio(text) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if dup_line_ratio(text) > cfg.max_dup_line_ratio:
        return "dup_lines"
    return None
