"""`ernie45 preprocess`: clean, deduplicate, tokenise and pack a text corpus into memory-mapped shards.

Pipeline per document: read (.txt / .jsonl / .parquet) → normalise → quality filters → exact dedup →
near-dup dedup (MinHash LSH) → train/val split → tokenise + EOS → packed into `seq_len` samples
(format: `ernie45.data.shards`). Input is processed in chunks of `chunk_docs` documents; after each chunk the
shards, the dedup state and the counters are committed to `.<out>.partial/`, so a rerun after an
interruption resumes from the last chunk and produces byte-identical output. The finished directory is
renamed into place at the end, so `out` is never half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ernie45.data import dedup, filters, shards
from ernie45.errors import ErnieError
from ernie45.utils import atomic_write_text

INPUT_EXTENSIONS = (".txt", ".jsonl", ".parquet")
TXT_MODES = ("paragraph", "line")
STATE_VERSION = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Every setting that changes the output (a resumed run must use the same ones)."""

    seq_len: int = 1024
    min_chars: int = 20
    max_symbol_ratio: float = 0.3
    max_dup_line_ratio: float = 0.3
    t2s: bool = False
    near_dup_threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    text_key: str = "text"
    txt_mode: str = "paragraph"
    shard_size: int = 16384
    val_fraction: float = 0.01
    seed: int = 0
    chunk_docs: int = 1000

    def validate(self) -> None:
        checks = [
            (self.seq_len >= 2, "--seq-len must be at least 2"),
            (self.min_chars >= 0, "--min-chars must be >= 0"),
            (0.0 <= self.max_symbol_ratio <= 1.0, "--max-symbol-ratio must be in [0, 1]"),
            (0.0 <= self.max_dup_line_ratio <= 1.0, "--max-dup-line-ratio must be in [0, 1]"),
            (0.0 < self.near_dup_threshold <= 1.0, "--near-dup-threshold must be in (0, 1]"),
            (2 <= self.num_perm <= 4096, "--num-perm must be in [2, 4096]"),
            (self.ngram >= 1, "--ngram must be at least 1"),
            (self.txt_mode in TXT_MODES, f"--txt-mode must be one of {', '.join(TXT_MODES)}"),
            (self.shard_size >= 1, "--shard-size must be at least 1"),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1)"),
            (self.chunk_docs >= 1, "--chunk-docs must be at least 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ErnieError(msg)

    @property
    def filter_config(self) -> filters.FilterConfig:
        return filters.FilterConfig(self.min_chars, self.max_symbol_ratio, self.max_dup_line_ratio)


# ---- reading -------------------------------------------------------------------------------------------
def list_input_files(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Expand directories (recursively, sorted, only .txt/.jsonl/.parquet) into a list of files."""
    if not inputs:
        raise ErnieError("no input given (--input FILE_OR_DIR ...)")
    files: list[str] = []
    for inp in map(os.fspath, inputs):
        if os.path.isdir(inp):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(inp)
                for name in names
                if name.endswith(INPUT_EXTENSIONS) and not name.startswith(".")
            )
            if not found:
                raise ErnieError(f"no {'/'.join(INPUT_EXTENSIONS)} files in directory {inp}")
            files += found
        elif os.path.isfile(inp):
            if not inp.endswith(INPUT_EXTENSIONS):
                raise ErnieError(f"unsupported input {inp}: expected {', '.join(INPUT_EXTENSIONS)}")
            files.append(inp)
        else:
            raise ErnieError(f"input not found: {inp}")
    return [os.path.abspath(f) for f in files]


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _valid(text: str) -> str | None:
    """`text` if it is encodable UTF-8 (JSON may smuggle in lone surrogates), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def _iter_txt(path: str, mode: str) -> Iterator[str | None]:
    with open(path, "rb") as f:
        block: list[bytes] = []
        first = True
        for line in f:
            if first:
                line, first = line.removeprefix(b"\xef\xbb\xbf"), False
            if mode == "line":
                if line.strip():
                    yield _decode(line)
            elif line.strip():
                block.append(line)
            elif block:
                yield _decode(b"".join(block))
                block = []
        if block:
            yield _decode(b"".join(block))


def _iter_jsonl(path: str, key: str) -> Iterator[str | None]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw)
            if line is None:
                yield None
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ErnieError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or key not in obj:
                raise ErnieError(f"{path}:{lineno}: no {key!r} field (choose the field with --text-key)")
            value = obj[key]
            if value is not None and not isinstance(value, str):
                raise ErnieError(f"{path}:{lineno}: field {key!r} is {type(value).__name__}, not a string")
            yield _valid(value or "")


def _iter_parquet(path: str, key: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ErnieError(f"cannot read parquet file {path}: {e}") from None
    field = pf.schema_arrow.field(key) if key in pf.schema_arrow.names else None
    if field is None:
        raise ErnieError(f"{path}: no column {key!r} (choose the column with --text-key)")
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise ErnieError(f"{path}: column {key!r} has type {field.type}, not string")
    for batch in pf.iter_batches(batch_size=1024, columns=[key]):
        for value in batch.column(0).to_pylist():
            yield value or ""


def iter_records(
    files: Sequence[str], text_key: str = "text", txt_mode: str = "paragraph"
) -> Iterator[str | None]:
    """Every document of `files` in order; None stands for one that is not valid UTF-8 (skipped, counted).

    .txt: a document per blank-line separated block (`paragraph`) or per non-empty line (`line`);
    .jsonl: the `text_key` field of each line; .parquet: the `text_key` column.
    """
    for path in files:
        if path.endswith(".txt"):
            yield from _iter_txt(path, txt_mode)
        elif path.endswith(".jsonl"):
            yield from _iter_jsonl(path, text_key)
        else:
            yield from _iter_parquet(path, text_key)


# ---- state ---------------------------------------------------------------------------------------------
def _new_counters() -> dict[str, int]:
    return {
        "read": 0,
        "non_utf8": 0,
        "empty": 0,
        **{f: 0 for f in filters.FILTER_NAMES},
        "exact_dup": 0,
        "near_dup": 0,
        "kept": 0,
        "train_docs": 0,
        "val_docs": 0,
    }


def _fingerprint(cfg: PreprocessConfig, files: list[str], tokenizer_dir: str) -> str:
    """Identifies a run: a partial output is resumed only by a run with the same inputs and settings."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    for name in ("tokenizer.model", "tokenizer_config.json"):
        p = os.path.join(tokenizer_dir, name)
        if os.path.isfile(p):
            h.update(shards.file_sha256(p).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _append(path: str, data: bytes, keep: int | None = None) -> None:
    """Append `data` to `path` durably; with `keep`, first truncate the file to `keep` bytes."""
    with open(path, "ab") as f:
        if keep is not None:
            f.truncate(keep)
        if data:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _Run:
    """The resumable state of one preprocessing run, living in the `.partial` directory."""

    def __init__(self, work: str, cfg: PreprocessConfig, fingerprint: str):
        self.work, self.cfg = work, cfg
        self.state_file = os.path.join(work, "state.json")
        self.exact_file = os.path.join(work, "exact.bin")
        self.near_file = os.path.join(work, "near.bin")
        state = self._load(fingerprint)
        self.state = state
        self.counters: dict[str, int] = state["counters"]
        n_exact, n_near = state["exact_count"], state["near_count"]
        _append(self.exact_file, b"", keep=n_exact * dedup.ExactDedup.DIGEST_BYTES)
        _append(self.near_file, b"", keep=n_near * cfg.num_perm * 4)
        with open(self.exact_file, "rb") as f:
            self.exact = dedup.ExactDedup(f.read())
        sigs = np.fromfile(self.near_file, dtype="<u4").reshape(-1, cfg.num_perm)
        self.near = dedup.NearDedup(cfg.near_dup_threshold, cfg.num_perm, cfg.ngram, signatures=sigs)
        self.writers = {
            s: shards.ShardWriter(os.path.join(work, s), cfg.seq_len, cfg.shard_size) for s in shards.SPLITS
        }
        for s, w in self.writers.items():
            w.restore(state["tokens"][s])

    def _load(self, fingerprint: str) -> dict[str, Any]:
        if os.path.isfile(self.state_file):
            try:
                with open(self.state_file, encoding="utf-8") as f:
                    state = json.load(f)
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                state = {}
            if state.get("version") == STATE_VERSION and state.get("fingerprint") == fingerprint:
                if state["docs_done"]:
                    print(f"resuming after {state['docs_done']} documents from {self.work}", file=sys.stderr)
                return state
            print(f"discarding {self.work}: it was made with other inputs or settings", file=sys.stderr)
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        return {
            "version": STATE_VERSION,
            "fingerprint": fingerprint,
            "docs_done": 0,
            "exact_count": 0,
            "near_count": 0,
            "tokens": {s: 0 for s in shards.SPLITS},
            "counters": _new_counters(),
        }

    def process(self, chunk: list[str | None], tok, eos: int) -> None:
        """Run the pipeline on one chunk of documents and commit the result."""
        cfg, c = self.cfg, self.counters
        fcfg = cfg.filter_config
        n_exact, n_near = len(self.exact), len(self.near)
        out: dict[str, list[int]] = {s: [] for s in shards.SPLITS}
        for raw in chunk:
            c["read"] += 1
            if raw is None:
                c["non_utf8"] += 1
                continue
            text = filters.normalize(raw, t2s=cfg.t2s)
            if not text:
                c["empty"] += 1
                continue
            reason = filters.check(text, fcfg)
            if reason:
                c[reason] += 1
                continue
            if self.exact.seen(text):
                c["exact_dup"] += 1
                continue
            if self.near.is_near_duplicate(text):
                c["near_dup"] += 1
                continue
            split = "val" if _split_draw(text, cfg.seed) < cfg.val_fraction else "train"
            out[split] += tok.encode(text)
            out[split].append(eos)
            c["kept"] += 1
            c[f"{split}_docs"] += 1
        for s, ids in out.items():
            self.writers[s].append(np.asarray(ids, dtype=shards.DTYPE))
        _append(self.exact_file, self.exact.state(n_exact))
        _append(self.near_file, self.near.state(n_near))
        # The commit point: state.json names how much of every file above belongs to the run.
        self.state.update(
            docs_done=self.state["docs_done"] + len(chunk),
            exact_count=len(self.exact),
            near_count=len(self.near),
            tokens={s: w.total for s, w in self.writers.items()},
        )
        atomic_write_text(self.state_file, json.dumps(self.state, indent=1) + "\n")


def _split_draw(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document's content and the seed: its train/val assignment."""
    import xxhash

    return xxhash.xxh64_intdigest(text.encode("utf-8"), seed=seed) / 2.0**64


# ---- report --------------------------------------------------------------------------------------------
def build_report(
    c: dict[str, int], splits: dict[str, dict[str, Any]], files: list[str], cfg: PreprocessConfig
) -> dict[str, Any]:
    """What each stage removed, and what went into each split."""
    stages = [
        ("read", {"non_utf8": c["non_utf8"]}),
        ("normalise", {"empty": c["empty"]}),
        ("filter", {f: c[f] for f in filters.FILTER_NAMES}),
        ("exact_dedup", {"exact_dup": c["exact_dup"]}),
        ("near_dedup", {"near_dup": c["near_dup"]}),
    ]
    rows, n = [], c["read"]
    for name, detail in stages:
        removed = sum(detail.values())
        rows.append({"stage": name, "in": n, "removed": removed, "out": n - removed, "detail": detail})
        n -= removed
    return {
        "documents_read": c["read"],
        "documents_kept": c["kept"],
        "stages": rows,
        "splits": splits,
        "inputs": files,
        "config": dataclasses.asdict(cfg),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'stage':<12} {'docs in':>9} {'removed':>9} {'docs out':>9}  detail"]
    for r in report["stages"]:
        detail = " ".join(f"{k}={v}" for k, v in r["detail"].items() if v)
        lines.append(f"{r['stage']:<12} {r['in']:>9} {r['removed']:>9} {r['out']:>9}  {detail}")
    for name, s in report["splits"].items():
        lines.append(
            f"{name:<12} {s['num_documents']:>9} docs {s['num_tokens']:>11} tokens "
            f"{s['num_samples']:>8} samples of {report['config']['seq_len']}"
        )
    return "\n".join(lines)


# ---- driver --------------------------------------------------------------------------------------------
def preprocess(
    inputs: Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PreprocessConfig = PreprocessConfig(),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole pipeline; returns the report (also written to `out_dir/report.json`).

    Resumes from `.<out_dir>.partial` when an earlier run with the same inputs and settings was interrupted.
    """
    from tqdm import tqdm

    from ernie45.tokenizer import Tokenizer

    cfg.validate()
    files = list_input_files(inputs)
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise ErnieError(f"output exists and is not empty: {out} (pass --overwrite to replace it)")
    tokenizer_dir = os.fspath(tokenizer_dir)
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    if eos is None:
        raise ErnieError(f"the tokenizer in {tokenizer_dir} has no EOS token")
    pad = eos if pad is None else pad

    work = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
    run = _Run(work, cfg, _fingerprint(cfg, files, tokenizer_dir))
    records = itertools.islice(iter_records(files, cfg.text_key, cfg.txt_mode), run.state["docs_done"], None)
    with tqdm(
        desc="preprocess", unit="doc", initial=run.state["docs_done"], file=sys.stderr, disable=not progress
    ) as bar:
        while chunk := list(itertools.islice(records, cfg.chunk_docs)):
            run.process(chunk, tok, eos)
            bar.update(len(chunk))

    c = run.counters
    if c["read"] == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise ErnieError(f"empty corpus: no documents in {', '.join(files)}")
    if c["train_docs"] == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise ErnieError(
            f"no training documents left: all {c['read']} documents were removed or went to val "
            f"(non_utf8={c['non_utf8']} empty={c['empty']} "
            + " ".join(f"{f}={c[f]}" for f in filters.FILTER_NAMES)
            + f" exact_dup={c['exact_dup']} near_dup={c['near_dup']} val={c['val_docs']})"
        )

    splits = shards.finalize_splits(work, run.writers, {s: c[f"{s}_docs"] for s in run.writers}, eos, pad,
                                    tok.vocab_size, tokenizer_dir)
    report = build_report(c, splits, files, cfg)
    atomic_write_text(
        os.path.join(work, "report.json"), json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    )
    for name in ("state.json", "exact.bin", "near.bin"):
        os.unlink(os.path.join(work, name))
    _move_into_place(work, out)
    print(format_report(report))
    return report


def _move_into_place(src: str, dst: str) -> None:
    """Rename the finished directory onto `dst` (replacing an old one only after the new one is complete)."""
    if os.path.isdir(dst):
        old = f"{src}.old"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.exists(dst):
            os.unlink(dst)
        os.replace(src, dst)


def build_parser() -> argparse.ArgumentParser:
    d = PreprocessConfig()
    p = argparse.ArgumentParser(
        prog="ernie45 preprocess",
        description="Clean, deduplicate, tokenise and pack a text corpus into memory-mapped shards "
        "(see docs/preprocess.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help=".txt, .jsonl or .parquet files, or directories searched recursively for them",
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="directory with tokenizer.model")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (shards + index + report)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per packed sample")
    p.add_argument(
        "--min-chars",
        type=int,
        default=d.min_chars,
        help="drop documents with fewer non-whitespace characters",
    )
    p.add_argument(
        "--max-symbol-ratio",
        type=float,
        default=d.max_symbol_ratio,
        help="drop documents where a larger fraction of characters are punctuation/symbols",
    )
    p.add_argument(
        "--max-dup-line-ratio",
        type=float,
        default=d.max_dup_line_ratio,
        help="drop documents where a larger fraction of lines repeat an earlier line",
    )
    p.add_argument("--t2s", action="store_true", help="convert traditional to simplified Chinese (OpenCC)")
    p.add_argument(
        "--near-dup-threshold",
        type=float,
        default=d.near_dup_threshold,
        help="estimated Jaccard similarity at which a document is a near-duplicate",
    )
    p.add_argument("--num-perm", type=int, default=d.num_perm, help="MinHash permutations")
    p.add_argument("--ngram", type=int, default=d.ngram, help="character shingle size for near-dup detection")
    p.add_argument("--text-key", default=d.text_key, help="text field of .jsonl / column of .parquet")
    p.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default=d.txt_mode,
        help=".txt documents: blank-line separated blocks (paragraph) or single lines (line)",
    )
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per shard file")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="fraction of documents (chosen by content hash) held out for validation",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the train/val assignment")
    p.add_argument(
        "--chunk-docs",
        type=int,
        default=d.chunk_docs,
        help="documents per checkpoint (an interrupted run resumes from the last one)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
    cfg = PreprocessConfig(**{k: v for k, v in vars(args).items() if k in fields})
    preprocess(args.input, args.tokenizer, args.out, cfg, overwrite=args.overwrite)
    return 0
