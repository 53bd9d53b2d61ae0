"""ErnieConfig: one dataclass whose field names are the `config.json` keys.

Reads both the legacy Baidu remote-code spelling (`Ernie4_5_ForCausalLM`, top-level `rope_theta`,
`torch_dtype`, `auto_map`) and the transformers 5 spelling (`rope_parameters`, `dtype`). Reference:
transformers 5.x `configuration_ernie4_5{,_moe}.py` and ../shared/docs/ARCHITECTURE.md §1.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ernie45.errors import ErnieError

DENSE, MOE = "ernie4_5", "ernie4_5_moe"
ARCHITECTURES = {DENSE: "Ernie4_5ForCausalLM", MOE: "Ernie4_5_MoeForCausalLM"}
_ARCH_TO_TYPE = {
    "Ernie4_5ForCausalLM": DENSE,
    "Ernie4_5_ForCausalLM": DENSE,
    "Ernie4_5_MoeForCausalLM": MOE,
}
# transformers' Ernie4_5_MoeConfig defaults (the 21B-A3B shape); used for keys a MoE config.json omits.
_MOE_DEFAULTS = dict(
    hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
    num_key_value_heads=4, head_dim=None, moe_num_experts=64, moe_k=6, moe_intermediate_size=1536,
    moe_num_shared_experts=2, moe_layer_start_index=1,
)


@dataclass
class ErnieConfig:
    model_type: str = DENSE
    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    hidden_act: str = "silu"
    use_bias: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    torch_dtype: str = "bfloat16"
    # MoE (ignored when model_type is dense)
    moe_num_experts: int = 0
    moe_k: int = 2
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    router_aux_loss_coef: float = 0.001
    # written by `ernie45 quantize`; loaders swap modules before reading weights
    quantization_config: dict[str, Any] | None = None
    # keys we do not use, kept so that a load/save round trip loses nothing
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_layer_end_index == -1 or self.moe_layer_end_index is None:
            self.moe_layer_end_index = self.num_hidden_layers - 1
        self.validate()

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.model_type == MOE and self.moe_num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule: every `moe_layer_interval`-th layer within [start, end] is MoE."""
        return (
            self.is_moe
            and (i + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= i <= self.moe_layer_end_index
        )

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]

    def validate(self) -> None:
        if self.model_type not in (DENSE, MOE):
            raise ErnieError(f"unsupported model_type {self.model_type!r}; expected {DENSE!r} or {MOE!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ErnieError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ErnieError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ErnieError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ErnieError(f"config: hidden_act {self.hidden_act!r} is not supported (ERNIE 4.5 uses silu)")
        if self.model_type == MOE:
            if self.moe_num_experts <= 0:
                raise ErnieError("config: moe_num_experts must be positive for an ernie4_5_moe model")
            if not 1 <= self.moe_k <= self.moe_num_experts:
                raise ErnieError(f"config: moe_k ({self.moe_k}) must be in [1, moe_num_experts="
                                 f"{self.moe_num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise ErnieError("config: moe_intermediate_size must be positive")
            if self.moe_layer_interval < 1:
                raise ErnieError("config: moe_layer_interval must be >= 1")
        elif self.intermediate_size <= 0:
            raise ErnieError("config: intermediate_size must be positive")

    # ---- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErnieConfig:
        d = dict(d)
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type is None:
            model_type = next((_ARCH_TO_TYPE[a] for a in archs if a in _ARCH_TO_TYPE), None)
        if model_type in ("ernie4_5_vl", "ernie4_5_vl_moe") or any("VL" in a or "Vision" in a for a in archs):
            raise ErnieError("ERNIE 4.5 VL (vision-language) models are not supported; ernie45 handles the text "
                             "models (0.3B, 21B-A3B, 300B-A47B)")
        if model_type is None:
            raise ErnieError("config.json has no model_type and no known architectures entry")
        if model_type not in (DENSE, MOE):
            raise ErnieError(f"unsupported model_type {model_type!r}; expected {DENSE!r} or {MOE!r}")
        d["model_type"] = model_type
        if "rope_parameters" in d and isinstance(d["rope_parameters"], dict):
            rp = d.pop("rope_parameters")
            if rp.get("rope_type", "default") != "default":
                raise ErnieError(f"rope_type {rp.get('rope_type')!r} is not supported")
            d.setdefault("rope_theta", rp.get("rope_theta", 500000.0))
        if d.get("rope_scaling"):
            raise ErnieError("rope_scaling is not supported (no released ERNIE 4.5 model uses it)")
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        for k in ("moe_layer_start_index", "moe_layer_end_index"):
            if isinstance(d.get(k), list):  # some configs give per-modality lists; mlx-lm takes min/max
                d[k] = (min if k.endswith("start_index") else max)(d[k])
        if "num_experts" in d and "moe_num_experts" not in d:
            d["moe_num_experts"] = d.pop("num_experts")
        if "num_experts_per_tok" in d and "moe_k" not in d:
            d["moe_k"] = d.pop("num_experts_per_tok")
        if model_type == MOE:
            for k, v in _MOE_DEFAULTS.items():
                d.setdefault(k, v)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if isinstance(known.get("torch_dtype"), str):
            known["torch_dtype"] = known["torch_dtype"].replace("torch.", "")
        try:
            return cls(**known, extra=extra)
        except TypeError as e:
            raise ErnieError(f"config.json: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ErnieConfig:
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(path):
            raise ErnieError(f"model path not found: {path}")
        if not os.path.isfile(file):
            raise ErnieError(f"no config.json in {path}")
        from ernie45.gguf_file import is_gguf

        if is_gguf(file):  # never read a multi-GB file as JSON
            raise ErnieError(f"{path} is a GGUF file; this needs a checkpoint directory (config.json)")
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ErnieError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ErnieError(f"{file} must hold a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The transformers 5 spelling, so that `AutoModelForCausalLM.from_pretrained` reads it."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        # auto_map would point transformers at Baidu's remote code; the native classes need none.
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in ("auto_map", "rope_theta")}
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        theta = d.pop("rope_theta")
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        out["dtype"] = d.pop("torch_dtype")
        if self.model_type == DENSE:
            for k in list(d):
                if k.startswith("moe_") or k == "router_aux_loss_coef":
                    d.pop(k)
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        out.update(d)
        return out

    def save(self, directory: str | os.PathLike) -> None:
        from ernie45.utils import atomic_write_text

        atomic_write_text(os.path.join(directory, "config.json"),
                          json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    def replace(self, **changes: Any) -> ErnieConfig:
        return dataclasses.replace(self, **changes)


# Named shapes: the published models and a tiny one for tests and the bundled models.
PRESETS: dict[str, dict[str, Any]] = {
    "0.3b": dict(model_type=DENSE),
    "21b-a3b": dict(model_type=MOE, **{k: v for k, v in _MOE_DEFAULTS.items() if k != "head_dim"},
                    head_dim=128, tie_word_embeddings=True),
    "300b-a47b": dict(model_type=MOE, hidden_size=8192, intermediate_size=28672, num_hidden_layers=54,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=128, moe_num_experts=64, moe_k=8,
                      moe_intermediate_size=3584, moe_num_shared_experts=0, moe_layer_start_index=3,
                      moe_layer_end_index=53, tie_word_embeddings=False),
    "tiny": dict(model_type=DENSE, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048),
    "tiny-moe": dict(model_type=MOE, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                     moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                     moe_layer_start_index=1),
}


def preset(name: str, **overrides: Any) -> ErnieConfig:
    if name not in PRESETS:
        raise ErnieError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ErnieConfig(**{**PRESETS[name], **overrides})
