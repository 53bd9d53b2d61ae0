"""`python -m ernie45.eval.lm_eval_run ...`: lm-eval's own command line with the `ernie45` model and our tasks.

lm-eval 0.4 discovers models only by import (it reads no entry points), so this registers `ernie45` first and
adds `--include_path` for the bundled offline C-Eval / CMMLU / CLUE YAMLs unless one is given. Every other flag
is lm-eval's, e.g.

    python -m ernie45.eval.lm_eval_run --model ernie45 --model_args pretrained=DIR,dtype=float32 \
        --tasks ernie45_ceval --num_fewshot 5 --metadata '{"ceval_dir": "data/ceval"}'
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    from ernie45.eval.lm_eval_model import TASKS_DIR

    args = list(sys.argv[1:] if argv is None else argv)

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in args)

    if given("--tasks") and not given("--include_path"):
        args += ["--include_path", TASKS_DIR]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
