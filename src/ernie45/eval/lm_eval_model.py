"""lm-eval integration: the `ernie45` model for the harness and the offline datasets of our task YAMLs.

Importing this module registers the model, so `lm_eval.simple_evaluate(model="ernie45", ...)` works in-process;
on the command line use `python -m ernie45.eval.lm_eval_run`, which imports it first. The YAMLs in
`ernie45/eval_tasks` read the user's local benchmark copies through `ceval_dataset`, `cmmlu_dataset` and
`clue_dataset`, given `--metadata '{"ceval_dir": DIR}'` (or `cmmlu_dir`, `clue_dir`, or `data_dir`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import datasets
import lm_eval.models  # noqa: F401  (registers the built-in models: get_model() skips that once ours is in)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ernie45.errors import ErnieError
from ernie45.eval import tasks
from ernie45.eval.scoring import loglikelihoods

TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval_tasks")
log = logging.getLogger(__name__)


@register_model("ernie45")
class Ernie45LM(TemplateLM):
    """An ernie45 checkpoint as an lm-eval model (log-likelihood tasks: multiple choice and perplexity).

    Args:
        pretrained: checkpoint directory; or pass an already loaded `model` and `tokenizer`.
        dtype, device: as for `ernie45.load`.
        batch_size: model inputs per forward pass.
        max_length: longest model input (default: the model's max_position_embeddings).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int | str = 8,
        max_length: int | None = None,
        model=None,
        tokenizer=None,
        **ignored: Any,
    ):
        super().__init__()
        if ignored:
            log.info("ernie45 model ignores harness options %s", sorted(ignored))
        if model is None:
            if pretrained is None:
                raise ErnieError("the ernie45 lm-eval model needs pretrained=DIR")
            import torch

            import ernie45

            if device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line always passes --device (default cuda:0); HFLM falls back the same way.
                log.warning("no CUDA device: running on the CPU")
                device = "cpu"
            model, tokenizer = ernie45.load(pretrained, dtype=dtype, device=device)
        if str(batch_size).startswith("auto"):
            raise ErnieError("batch_size=auto is not supported by the ernie45 model; pass a number")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_position_embeddings)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM's choice: BOS conditions empty contexts and rolling windows.
        return self.tokenizer.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        with tqdm(total=len(requests), desc="ernie45 loglikelihood", disable=disable_tqdm) as bar:
            return loglikelihoods(
                self.model,
                [(ctx, cont) for _, ctx, cont in requests],
                self.batch_size,
                self.max_length,
                self.tokenizer.pad_token_id or 0,
                bar,
            )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint max_length windows, BOS first (HFLM's scheme)."""
        out = []
        for req in tqdm(requests, desc="ernie45 rolling loglikelihood", disable=disable_tqdm):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            lls = loglikelihoods(
                self.model, windows, self.batch_size, self.max_length, self.tokenizer.pad_token_id or 0
            )
            out.append(sum(ll for ll, _ in lls))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise ErnieError(
            "the ernie45 lm-eval model scores log-likelihood tasks (multiple choice, perplexity); "
            "for generation tasks serve the model (`ernie45 serve`) and use lm-eval's "
            "local-completions model"
        )


def _data_dir(kind: str, metadata: dict[str, Any]) -> str:
    path = metadata.get(f"{kind}_dir") or metadata.get("data_dir")
    if not path:
        raise ErnieError(
            f'no data directory for {kind}: pass --metadata \'{{"{kind}_dir": "DIR"}}\' '
            f"(or metadata={{'{kind}_dir': DIR}} to simple_evaluate)"
        )
    return os.fspath(path)


def _splits(**splits: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def ceval_dataset(subject: str, **metadata: Any) -> datasets.DatasetDict:
    """C-Eval `val` and `dev` splits of one subject from the user's copy (same reader as `ernie45 eval`)."""
    d = _data_dir("ceval", metadata)
    return _splits(val=tasks.ceval_docs(d, subject, "val"), dev=tasks.ceval_docs(d, subject, "dev"))


def cmmlu_dataset(subject: str, **metadata: Any) -> datasets.DatasetDict:
    """CMMLU `test` and `dev` splits of one subject from the user's copy."""
    d = _data_dir("cmmlu", metadata)
    return _splits(test=tasks.cmmlu_docs(d, subject, "test"), dev=tasks.cmmlu_docs(d, subject, "dev"))


def clue_dataset(name: str, **metadata: Any) -> datasets.DatasetDict:
    """CLUE `dev` (scored) and `train` (few-shot) records with `gold`; IFLYTEK's also carry their `choices`."""
    folder = tasks.clue_task_dir(_data_dir("clue", metadata), name)
    labels, words = tasks.clue_labels(name, folder)
    splits = {"dev": tasks.clue_docs(name, os.path.join(folder, "dev.json"), labels)}
    if any(os.path.isfile(os.path.join(folder, f)) for f in tasks.CLUE_TASKS[name].train_files):
        splits["train"] = tasks.clue_docs(name, tasks.clue_train_file(name, folder), labels)
    if not tasks.CLUE_TASKS[name].labels:
        splits = {k: [{**d, "choices": list(words)} for d in v] for k, v in splits.items()}
    return _splits(**splits)
