"""Evaluation: C-Eval, CMMLU, CLUE and perplexity from local copies of the official files.

`ernie45 eval` (cli.py) scores natively; lm_eval_model.py runs the same tasks inside lm-eval, with the YAMLs in
`ernie45/eval_tasks`. Prompts and readers live in tasks.py, log-likelihood scoring in scoring.py.
"""
