"""LoRA / rsLoRA / QLoRA adapters on the plain ernie45 model, built on PEFT's functional API.

Module names equal the Hugging Face checkpoint names, so an adapter saved here (PEFT layout:
`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`) loads with
`peft.PeftModel.from_pretrained` onto transformers' `Ernie4_5ForCausalLM` and back. Adapters on routed experts
stay per-expert (transformers fuses experts, so only attention, dense MLP and shared-expert adapters cross over).
The MoE router `mlp.gate` is never a target. Reference: peft 0.21 `peft.functional`, ECOSYSTEM.md §5.5-5.6, §6.3.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from ernie45.errors import ErnieError

ADAPTER = "default"
PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION + MLP


def _peft():
    # bitsandbytes (imported by peft) logs a hub-kernel warning on CPU-only machines; it is harmless.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import peft
    import peft.functional  # noqa: F401 - the public API for models that are not PeftModels

    return peft


class _Plain(nn.Module):
    """The model's children without its `config`.

    PEFT treats any module whose `config` has a `model_type` as a transformers model and, for "ernie4_5_moe",
    rewrites expert targets to transformers' fused expert parameters, which ernie45 (per-expert Linears) lacks.
    Injecting and loading through this view keeps module paths identical and skips that rewrite.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for attr in ("peft_config", "is_loaded_in_4bit"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))


def lora_config(
    model,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: list[str] | None = None,
    rslora: bool = False,
    experts: bool = False,
    base_model_name_or_path: str | None = None,
):
    """A `peft.LoraConfig` with explicit target modules (ERNIE is not in PEFT's default map).

    Args:
        rank: LoRA rank r (>= 1).
        alpha: scaling numerator; default 2*r. Scale = alpha/r, or alpha/sqrt(r) with `rslora`.
        targets: projection names among q/k/v/o_proj and gate/up/down_proj, or ["all-linear"] (default: all).
        experts: also adapt the routed experts of MoE layers (per-expert adapters; off by default because
            transformers' fused experts cannot load them and they multiply the adapter size).
    """
    peft = _peft()
    if rank < 1:
        raise ErnieError(f"--lora-rank must be >= 1, got {rank}")
    if dropout < 0 or dropout >= 1:
        raise ErnieError(f"--lora-dropout must be in [0, 1), got {dropout}")
    alpha = 2.0 * rank if alpha is None else alpha
    if alpha <= 0:
        raise ErnieError(f"--lora-alpha must be positive, got {alpha}")
    names = list(ALL_TARGETS) if not targets or targets == ["all-linear"] else list(dict.fromkeys(targets))
    bad = [t for t in names if t not in ALL_TARGETS]
    if bad:
        hint = " (the MoE router mlp.gate is never adapted)" if "gate" in bad else ""
        raise ErnieError(
            f"unknown --target-modules {', '.join(bad)}{hint}; choose from "
            f"{', '.join(ALL_TARGETS)} or all-linear"
        )
    target: list[str] | str = names
    if model.config.is_moe and not experts and any(n in MLP for n in names):
        # A regex (fullmatch) keeps dense-layer and shared-expert MLPs but skips mlp.experts.<i>.*.
        target = rf"^(?!.*\.mlp\.experts\.).*\.({'|'.join(names)})$"
    return peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target,
        use_rslora=rslora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def add_lora(model: nn.Module, config, trainable: bool = True) -> nn.Module:
    """Inject LoRA layers in place; freeze everything else. Trainable adapters are kept in fp32."""
    peft = _peft()
    if getattr(model, "peft_config", None):
        raise ErnieError("the model already carries a LoRA adapter")
    targets = config.target_modules
    if getattr(config, "target_parameters", None):
        raise ErnieError(
            "this adapter targets parameters (transformers' fused MoE experts); ernie45 keeps "
            "per-expert layers and cannot apply it"
        )
    if getattr(config, "modules_to_save", None):
        raise ErnieError(f"adapters with modules_to_save ({config.modules_to_save}) are not supported")
    model.requires_grad_(False)
    try:
        view = peft.functional.inject_adapter_in_model(config, _Plain(model), adapter_name=ADAPTER)
        model.peft_config = view.peft_config
    except ValueError as e:
        raise ErnieError(f"cannot apply LoRA to target modules {targets}: {e}") from None
    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            raise ErnieError("the MoE router mlp.gate must not be a LoRA target")
    if trainable:
        peft.functional.cast_adapter_dtype(model, ADAPTER)
        peft.functional.set_requires_grad(model, ADAPTER, requires_grad=True)
    else:
        model.requires_grad_(False)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's file keys (`base_model.model.<module>.lora_A.weight`)."""
    peft = _peft()
    sd = peft.functional.get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {PREFIX + k: v.detach().contiguous().cpu() for k, v in sd.items()}


def write_adapter(model: nn.Module, directory: str, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors into an existing directory."""
    from safetensors.torch import save_file

    config = copy.copy(model.peft_config[ADAPTER])  # the live config stays as it is
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True
    save_file(adapter_state_dict(model), os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(directory)


def save_adapter(
    model: nn.Module,
    out_dir: str,
    base_model_name_or_path: str | None = None,
    tokenizer=None,
    overwrite: bool = True,
) -> None:
    """Save the adapter (and optionally the tokenizer) as a PEFT directory, atomically."""
    from ernie45.utils import atomic_directory

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_adapter(model, tmp, base_model_name_or_path)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def resolve_adapter_dir(path: str) -> str:
    """An adapter directory, or a `finetune` run directory whose `final/` holds one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ErnieError(f"adapter directory not found: {path}")
    for d in (path, os.path.join(path, "final")):
        if os.path.isfile(os.path.join(d, CONFIG_FILE)):
            return d
    raise ErnieError(f"{path} has no {CONFIG_FILE} (is it a LoRA adapter directory?)")


def read_adapter_config(adapter_dir: str):
    peft = _peft()
    cfg_file = os.path.join(adapter_dir, CONFIG_FILE)
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ErnieError(f"cannot read {cfg_file}: {e}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else None
        raise ErnieError(f"{cfg_file}: only LoRA adapters are supported (peft_type is {kind!r})")
    try:
        return peft.LoraConfig.from_pretrained(adapter_dir)
    except (TypeError, ValueError) as e:
        raise ErnieError(f"{cfg_file}: invalid LoRA config: {e}") from None


def load_adapter(
    model: nn.Module, adapter_dir: str, trainable: bool = False, merge: bool = False
) -> nn.Module:
    """Apply a saved LoRA adapter to an ernie45 model (in place) and return the model.

    `generate`, `chat` and `serve` call this for `--adapter DIR`: the base weights stay untouched and the
    adapter runs beside them. `merge=True` folds it into the weights instead (faster decoding, same outputs).
    Raises ErnieError when the adapter does not fit the model (missing, unexpected or mis-shaped tensors).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    peft = _peft()
    adapter_dir = resolve_adapter_dir(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        hint = (
            " (pickle adapter_model.bin files are not loaded; convert to safetensors)"
            if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin"))
            else ""
        )
        raise ErnieError(f"no {WEIGHTS_FILE} in {adapter_dir}{hint}")
    try:
        raw = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ErnieError(f"cannot read {weights}: {e}") from None
    sd = {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    add_lora(model, config, trainable=trainable)
    expected = {k for k, _ in _adapter_params(model)}
    named = {k.replace(f".{ADAPTER}.", "."): k for k in expected}
    unexpected = sorted(k for k in sd if k not in named)
    missing = sorted(k for k in named if k not in sd)
    params = dict(model.named_parameters())
    bad = [
        f"{k} {tuple(v.shape)} (expected {tuple(params[named[k]].shape)})"
        for k, v in sd.items()
        if k in named and v.shape != params[named[k]].shape
    ]
    problems = [
        f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        for what, keys in (
            ("unexpected tensors", unexpected),
            ("missing tensors", missing),
            ("wrong shapes", bad),
        )
        if keys
    ]
    if problems:
        raise ErnieError(f"adapter {adapter_dir} does not fit this model — " + "; ".join(problems))
    peft.functional.set_peft_model_state_dict(_Plain(model), sd, adapter_name=ADAPTER)
    model.adapter_path = adapter_dir
    if merge:
        merge_lora(model)
    return model


def _adapter_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if ".lora_" in name:
            yield name, p


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B @ A, summed in fp32) and unwrap the layers.

    The sum is done in fp32 and rounded once to the weight dtype, so a bf16 merge rounds like a bf16 save of
    an fp32 merge.
    """
    if any(not isinstance(m.get_base_layer(), nn.Linear) for _, m in lora_layers(model)):
        raise ErnieError(
            "cannot merge into a 4-bit (QLoRA) base; load the full-precision model and merge there"
        )
    for name, module in list(lora_layers(model)):
        base = module.get_base_layer()
        with torch.no_grad():
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter).float()
                    base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (the DPO reference), restoring the adapters and their trainability after."""
    layers = [m for _, m in lora_layers(model)]
    grads = {n: p.requires_grad for n, p in _adapter_params(model)}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for n, p in _adapter_params(model):
            p.requires_grad_(grads[n])


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """QLoRA base: swap every Linear except the router and lm_head for ernie45.quant's NF4 layer (a bitsandbytes
    `Linear4bit`, double quantization, blocks of 64) on `device`; the remaining weights go to fp32.

    Layers move to `device` and are quantized one at a time, so peak memory stays near the 4-bit model plus one
    full-precision layer.
    """
    from ernie45.quant import quantizable_linears
    from ernie45.quant.nf4 import nf4_linear_class

    nf4 = nf4_linear_class()
    with torch.no_grad():
        for name, lin in quantizable_linears(model, ["lm_head"]).items():
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model,
                child,
                nf4.from_float(lin.to(device), compute_dtype),
            )
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    model.to(device)
    model.is_loaded_in_4bit = True  # tells PEFT to wrap Linear4bit with its 4-bit LoRA layer
    model.requires_grad_(False)
    return model
