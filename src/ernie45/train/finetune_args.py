"""The settings of a fine-tuning run (`ernie45 finetune`): saved in each checkpoint; `--resume` checks the ones
that matter. Their own module, so that the pieces of the run (model setup, objectives) can name them without
importing the loop."""

from __future__ import annotations

from dataclasses import dataclass

from ernie45.train import core

DEFAULT_LR = {("full", False): 1e-5, ("lora", False): 2e-4, ("full", True): 1e-6, ("lora", True): 5e-5}


@dataclass
class FinetuneArgs(core.RunArgs):
    """Everything a run depends on (saved in each checkpoint; `--resume` checks the ones that matter)."""

    model: str
    data: str
    out: str
    eval_data: str | None = None
    eval_split: float = 0.0
    format: str = "auto"
    dpo: bool = False
    beta: float = 0.1
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    rslora: bool = False
    lora_experts: bool = False
    qlora: bool = False
    train_router: bool = False
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    min_lr: float = 0.0
    warmup: int = 0
    weight_decay: float = 0.0
    batch_size: int = 8
    max_length: int = 2048
    pack: bool = False
    too_long: str = "skip"
    skip_bad_lines: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0

    @property
    def method(self) -> str:
        return "qlora" if self.qlora else "lora" if self.lora_rank else "full"

    @property
    def learning_rate(self) -> float:
        return (
            self.lr
            if self.lr is not None
            else DEFAULT_LR[("full" if self.method == "full" else "lora", self.dpo)]
        )
