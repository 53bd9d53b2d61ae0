"""Benchmark readers for the official C-Eval / CMMLU CSV and CLUE jsonl layouts, and the prompts scored on them.

C-Eval and CMMLU prompts are lm-eval 0.4's `ceval-valid` and `cmmlu` prompts character for character: the
description, few-shot examples each followed by a blank line, then the question ending in `答案：`; the
continuations are ` A` ... ` D`. CLUE has no lm-eval task, so its prompts are ours (label words scored right
after `回答：`); `ernie45/eval_tasks/clue` holds the same prompts as lm-eval YAMLs.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ernie45.errors import ErnieError
from ernie45.eval.subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS

LETTERS = ("A", "B", "C", "D")
FEWSHOT_DELIMITER = "\n\n"
CEVAL_DESCRIPTION = "以下是中国关于{}的单项选择题，请选出其中的正确答案。\n\n"
CMMLU_DESCRIPTION = "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n"


@dataclass
class Example:
    """One scored item: the prompt, the answer texts whose log-likelihoods are compared, and the gold index."""

    context: str
    choices: list[str]
    gold: int
    delimiter: str = " "

    @property
    def continuations(self) -> list[str]:
        """What is scored after `context` (lm-eval prepends its `target_delimiter` the same way)."""
        return [self.delimiter + c for c in self.choices]


@dataclass
class Subset:
    """A subject (C-Eval, CMMLU) or a whole CLUE task: the unit reported and averaged."""

    name: str
    examples: list[Example]
    files: list[str] = field(default_factory=list)


# ---- file readers --------------------------------------------------------------------------------------------


def read_csv(path: str, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line, row) pairs of a benchmark CSV, every value a string (so `3.50` stays `3.50`).

    Raises ErnieError naming the file and row for a missing column, a short or long row, or no rows at all.
    """
    if not os.path.isfile(path):
        raise ErnieError(f"missing file: {path}")
    rows: list[tuple[int, dict[str, str]]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise ErnieError(f"{path}: empty file (expected the header {','.join(required)})")
            missing = [c for c in required if c not in header]
            if missing:
                raise ErnieError(
                    f"{path}: missing column(s) {', '.join(missing)} "
                    f"(header is {','.join(header)}; expected {','.join(required)})"
                )
            start = reader.line_num + 1
            for row in reader:
                if row:
                    if len(row) != len(header):
                        raise ErnieError(
                            f"{path}, row {len(rows) + 1} (line {start}): {len(row)} fields, "
                            f"expected {len(header)} ({','.join(header)})"
                        )
                    rows.append((start, dict(zip(header, row))))
                start = reader.line_num + 1
        except csv.Error as e:
            raise ErnieError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError:
            raise ErnieError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise ErnieError(f"{path}: no rows (empty split)")
    return rows


def read_jsonl(path: str, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) pairs of a JSON-lines file (CLUE names them `*.json`); errors name the file and line."""
    if not os.path.isfile(path):
        raise ErnieError(f"missing file: {path}")
    out: list[tuple[int, dict[str, Any]]] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ErnieError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ErnieError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
                missing = [k for k in required if k not in rec]
                if missing:
                    raise ErnieError(f"{path}, line {n}: missing field(s) {', '.join(missing)}")
                out.append((n, rec))
    except UnicodeDecodeError:
        raise ErnieError(f"{path}: not UTF-8 text") from None
    if not out:
        raise ErnieError(f"{path}: no records (empty split)")
    return out


def _check_answer(path: str, line: int, value: str) -> None:
    if value not in LETTERS:
        raise ErnieError(f"{path}, line {line}: answer must be one of A, B, C, D, got {value!r}")


def _require_dir(data_dir: str | os.PathLike, what: str) -> str:
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise ErnieError(f"{what} data directory not found: {data_dir}")
    return data_dir


# ---- C-Eval and CMMLU -------------------------------------------------------------------------------------------


def mc_query(question: str, options: Sequence[str]) -> str:
    """The lm-eval C-Eval/CMMLU question block: `{question.strip()}\\nA. ..\\nD. ..\\n答案：`."""
    lines = [question.strip()] + [f"{letter}. {text}" for letter, text in zip(LETTERS, options)]
    return "\n".join(lines) + "\n答案："


def fewshot_context(description: str, shots: Sequence[tuple[str, str]], query: str, delimiter: str) -> str:
    """lm-eval's plain-text prompt: description, then `query + delimiter + answer + "\\n\\n"` per shot, then query."""
    return description + "".join(q + delimiter + a + FEWSHOT_DELIMITER for q, a in shots) + query


def ceval_path(data_dir: str, subject: str, split: str) -> str:
    return os.path.join(data_dir, split, f"{subject}_{split}.csv")


def cmmlu_path(data_dir: str, subject: str, split: str) -> str:
    return os.path.join(data_dir, split, f"{subject}.csv")


def ceval_docs(data_dir: str, subject: str, split: str) -> list[dict[str, str]]:
    """The rows of `<split>/<subject>_<split>.csv` with the official columns; `answer` checked to be A-D."""
    path = ceval_path(data_dir, subject, split)
    docs = []
    for line, row in read_csv(path, ("question", *LETTERS, "answer")):
        _check_answer(path, line, row["answer"])
        docs.append(
            {
                "id": row.get("id", ""),
                "question": row["question"],
                **{k: row[k] for k in LETTERS},
                "answer": row["answer"],
                "explanation": row.get("explanation", ""),
            }
        )
    return docs


def cmmlu_docs(data_dir: str, subject: str, split: str) -> list[dict[str, str]]:
    """The rows of `<split>/<subject>.csv` (`,Question,A,B,C,D,Answer`; the leading index column is optional)."""
    path = cmmlu_path(data_dir, subject, split)
    docs = []
    for line, row in read_csv(path, ("Question", *LETTERS, "Answer")):
        _check_answer(path, line, row["Answer"])
        docs.append({"Question": row["Question"], **{k: row[k] for k in LETTERS}, "Answer": row["Answer"]})
    return docs


@dataclass(frozen=True)
class _Bench:
    what: str
    subjects: dict[str, str]
    description: str
    eval_split: str
    question: str  # column names differ: C-Eval is lower case, CMMLU capitalised
    answer: str
    path: Callable[[str, str, str], str]
    docs: Callable[[str, str, str], list[dict[str, str]]]


_BENCHES = {
    "ceval": _Bench(
        "C-Eval", CEVAL_SUBJECTS, CEVAL_DESCRIPTION, "val", "question", "answer", ceval_path, ceval_docs
    ),
    "cmmlu": _Bench(
        "CMMLU", CMMLU_SUBJECTS, CMMLU_DESCRIPTION, "test", "Question", "Answer", cmmlu_path, cmmlu_docs
    ),
}


def _subjects(data_dir: str, bench: _Bench) -> list[str]:
    folder = os.path.join(data_dir, bench.eval_split)
    if not os.path.isdir(folder):
        raise ErnieError(
            f"{data_dir} has no {bench.eval_split}/ folder; expected the official {bench.what} "
            f"layout (dev/ and {bench.eval_split}/ with one CSV per subject)"
        )
    suffix = os.path.basename(bench.path("", "", bench.eval_split))
    found = {f[: -len(suffix)] for f in os.listdir(folder) if f.endswith(suffix)}
    if not found:
        raise ErnieError(f"{folder}: no *{suffix} files")
    unknown = sorted(found - set(bench.subjects))
    if unknown:
        raise ErnieError(f"{folder}: unknown {bench.what} subject(s) {', '.join(unknown)}")
    return [s for s in bench.subjects if s in found]


def _mc_subsets(data_dir: str, kind: str, shots: int, limit: int | None) -> list[Subset]:
    b = _BENCHES[kind]

    def query(d: dict[str, str]) -> str:
        return mc_query(d[b.question], [d[k] for k in LETTERS])

    subsets = []
    for subject in _subjects(data_dir, b):
        docs = b.docs(data_dir, subject, b.eval_split)[:limit]
        files = [b.path(data_dir, subject, b.eval_split)]
        shot_pairs = []
        if shots:
            shot_docs = b.docs(data_dir, subject, "dev")
            if shots > len(shot_docs):
                raise ErnieError(
                    f"{b.what} subject {subject} has {len(shot_docs)} dev examples; "
                    f"--shots must be at most that"
                )
            shot_pairs = [(query(d), d[b.answer]) for d in shot_docs[:shots]]
            files.append(b.path(data_dir, subject, "dev"))
        header = b.description.format(b.subjects[subject])
        examples = [
            Example(
                fewshot_context(header, shot_pairs, query(d), " "), list(LETTERS), LETTERS.index(d[b.answer])
            )
            for d in docs
        ]
        subsets.append(Subset(subject, examples, files))
    return subsets


# ---- CLUE ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClueTask:
    """A CLUE classification task: official fields, our prompt, and label values with the words scored for them."""

    fields: tuple[str, ...]
    template: Callable[[dict[str, Any]], str]
    labels: tuple[str, ...] = ()  # official label values in choice order; empty: read from labels.json
    words: tuple[str, ...] = ()
    train_files: tuple[str, ...] = ("train.json",)
    skip_label: str | None = None  # NLI dev rows without a majority label ("-") are skipped, as CLUE does


_NLI_LABELS = ("entailment", "neutral", "contradiction")
_NLI_WORDS = ("蕴含", "中立", "矛盾")


def _nli(d: dict[str, Any]) -> str:
    return f"前提：{d['sentence1']}\n假设：{d['sentence2']}\n问题：两句话的关系是蕴含、中立还是矛盾？\n回答："


CLUE_TASKS: dict[str, ClueTask] = {
    "afqmc": ClueTask(
        ("sentence1", "sentence2"),
        lambda d: (
            f"句子一：{d['sentence1']}\n句子二：{d['sentence2']}\n问题：这两个句子的意思相同吗？\n回答："
        ),
        ("0", "1"),
        ("不同", "相同"),
    ),
    "tnews": ClueTask(
        ("sentence",),
        lambda d: f"新闻标题：{d['sentence']}\n问题：这条新闻属于哪个类别？\n回答：",
        (
            "100",
            "101",
            "102",
            "103",
            "104",
            "106",
            "107",
            "108",
            "109",
            "110",
            "112",
            "113",
            "114",
            "115",
            "116",
        ),
        (
            "故事",
            "文化",
            "娱乐",
            "体育",
            "财经",
            "房产",
            "汽车",
            "教育",
            "科技",
            "军事",
            "旅游",
            "国际",
            "股票",
            "农业",
            "电竞",
        ),
    ),
    "iflytek": ClueTask(
        ("sentence",), lambda d: f"应用描述：{d['sentence']}\n问题：这个应用属于哪个类别？\n回答："
    ),
    "cmnli": ClueTask(("sentence1", "sentence2"), _nli, _NLI_LABELS, _NLI_WORDS, skip_label="-"),
    "ocnli": ClueTask(
        ("sentence1", "sentence2"),
        _nli,
        _NLI_LABELS,
        _NLI_WORDS,
        ("train.50k.json", "train.json"),
        skip_label="-",
    ),
    "cluewsc2020": ClueTask(
        ("text", "target"),
        lambda d: (
            f"{d['text']}\n问题：句中的“{d['target']['span2_text']}”指的是“{d['target']['span1_text']}”吗？\n回答："
        ),
        ("false", "true"),
        ("否", "是"),
    ),
    "csl": ClueTask(
        ("abst", "keyword"),
        lambda d: (
            f"摘要：{d['abst']}\n关键词：{'，'.join(d['keyword'])}\n问题：这些关键词都是这篇摘要的关键词吗？\n回答："
        ),
        ("0", "1"),
        ("否", "是"),
    ),
}


def clue_task_dir(data_dir: str | os.PathLike, name: str) -> str:
    """The folder holding `dev.json`: `data_dir` itself, or its official `<name>_public/` (or `<name>/`) child."""
    data_dir = _require_dir(data_dir, f"CLUE {name}")
    for d in (data_dir, os.path.join(data_dir, f"{name}_public"), os.path.join(data_dir, name)):
        if os.path.isfile(os.path.join(d, "dev.json")):
            return d
    raise ErnieError(
        f"no dev.json for CLUE {name} in {data_dir} "
        f"(expected the official {name}_public folder: train.json, dev.json)"
    )


def clue_labels(name: str, folder: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(label values, label words); IFLYTEK's 119 classes come from its official labels.json."""
    task = CLUE_TASKS[name]
    if task.labels:
        return task.labels, task.words
    path = os.path.join(folder, "labels.json")
    if not os.path.isfile(path):
        raise ErnieError(f"{folder}: CLUE {name} needs the official labels.json next to dev.json")
    recs = read_jsonl(path, ("label", "label_des"))
    return tuple(str(r["label"]) for _, r in recs), tuple(str(r["label_des"]) for _, r in recs)


def clue_train_file(name: str, folder: str) -> str:
    task = CLUE_TASKS[name]
    for f in task.train_files:
        if os.path.isfile(os.path.join(folder, f)):
            return os.path.join(folder, f)
    raise ErnieError(f"{folder}: few-shot examples need the training file ({' or '.join(task.train_files)})")


def clue_docs(name: str, path: str, labels: Sequence[str]) -> list[dict[str, Any]]:
    """The prompt fields of each record plus `gold` (index into `labels`); unlabelled NLI rows skipped."""
    task = CLUE_TASKS[name]
    docs = []
    for line, rec in read_jsonl(path, (*task.fields, "label")):
        label = str(rec["label"])
        if task.skip_label is not None and label == task.skip_label:
            continue
        if label not in labels:
            raise ErnieError(f"{path}, line {line}: label {label!r} is not one of {', '.join(labels)}")
        if name == "cluewsc2020" and not {"span1_text", "span2_text"} <= set(rec["target"]):
            raise ErnieError(f"{path}, line {line}: target needs span1_text and span2_text")
        docs.append({**{k: rec[k] for k in task.fields}, "gold": labels.index(label)})
    if not docs:
        raise ErnieError(f"{path}: no labelled records (empty split)")
    return docs


def _clue_subsets(name: str, data_dir: str, shots: int, limit: int | None) -> list[Subset]:
    task = CLUE_TASKS[name]
    folder = clue_task_dir(data_dir, name)
    labels, words = clue_labels(name, folder)
    dev = os.path.join(folder, "dev.json")
    docs = clue_docs(name, dev, labels)[:limit]
    files = [dev]
    shot_pairs: list[tuple[str, str]] = []
    if shots:
        train = clue_train_file(name, folder)
        shot_docs = clue_docs(name, train, labels)
        if shots > len(shot_docs):
            raise ErnieError(f"{train} has {len(shot_docs)} labelled examples; --shots must be at most that")
        shot_pairs = [(task.template(d), words[d["gold"]]) for d in shot_docs[:shots]]
        files.append(train)
    examples = [
        Example(fewshot_context("", shot_pairs, task.template(d), ""), list(words), d["gold"], "")
        for d in docs
    ]
    return [Subset(name, examples, files)]


# ---- dispatch --------------------------------------------------------------------------------------------------

TASKS = ("ceval", "cmmlu", *(f"clue-{n}" for n in CLUE_TASKS), "ppl")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ErnieError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def load_subsets(
    task: str, data_dir: str | os.PathLike, shots: int = 0, limit: int | None = None
) -> list[Subset]:
    """The prompts of a multiple-choice task (everything but `ppl`), read from the official files in `data_dir`."""
    check_task(task)
    if task == "ppl":
        raise ErnieError("ppl is not a multiple-choice task")
    if task.startswith("clue-"):
        return _clue_subsets(task[5:], os.fspath(data_dir), shots, limit)
    return _mc_subsets(_require_dir(data_dir, "C-Eval" if task == "ceval" else "CMMLU"), task, shots, limit)
