"""Everything mmpost knows about LoRA adapters, which peft provides: adding them, finding their weights,
turning them off, merging them into the base weights, and saving and loading them.

The LLM of an ``LMM`` is either a transformers causal LM or a peft ``PeftModel`` around one; code elsewhere
asks this module instead of matching peft's parameter names (``lora_A`` / ``lora_B``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mmpost.config.schema import LoraConfig

ADAPTER_MARK = "lora_"  # peft's prefix of adapter weights: lora_A, lora_B, lora_embedding_A ...


def add_lora(model: PreTrainedModel, cfg: LoraConfig) -> nn.Module:
    """Wraps ``model`` in peft LoRA adapters (trainable) and returns the PeftModel."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: list[str] | str = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)


def base_causal_lm(llm: nn.Module) -> PreTrainedModel:
    """The transformers CausalLM inside ``llm`` (itself, or the model a peft wrapper adapts)."""
    get_base = getattr(llm, "get_base_model", None)
    return get_base() if callable(get_base) else llm


def has_lora(llm: nn.Module) -> bool:
    return base_causal_lm(llm) is not llm


def adapter_parameters(llm: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The adapters' own weights, by name (empty without LoRA)."""
    for name, p in llm.named_parameters():
        if ADAPTER_MARK in name:
            yield name, p


def adapters_are_fresh(llm: nn.Module) -> bool:
    """True when ``llm`` has LoRA adapters that do not change it yet (every ``lora_B`` is zero)."""
    if not has_lora(llm):
        return False
    b_weights = [p for name, p in adapter_parameters(llm) if "lora_B" in name]
    return bool(b_weights) and all(not p.detach().any() for p in b_weights)


def adapters_off(llm: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which ``llm`` computes without its adapters (the base model); nothing without LoRA."""
    return llm.disable_adapter() if has_lora(llm) else contextlib.nullcontext()


def merged_base_state_dict(llm: nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    """The base LLM's weights under transformers' own names, with the adapters' deltas added when ``merge``.

    Computed without touching the live model (peft's ``merge_and_unload`` would change it in place).
    """
    base = base_causal_lm(llm)
    state = base.state_dict()
    clean = {k.replace(".base_layer.", "."): v for k, v in state.items() if ADAPTER_MARK not in k}
    if merge and has_lora(llm):
        from peft.tuners.lora import LoraLayer

        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    key = f"{name}.weight"
                    clean[key] = clean[key] + module.get_delta_weight(adapter).to(clean[key].dtype)
    return clean


def merge_adapters(llm: nn.Module) -> nn.Module:
    """The base model with the adapters merged into its weights (in place, as peft does); ``llm`` without LoRA."""
    return llm.merge_and_unload() if has_lora(llm) else llm


def save_adapter(llm: nn.Module, folder: Path) -> None:
    llm.save_pretrained(folder)


def load_adapter(base: PreTrainedModel, folder: Path) -> nn.Module:
    """``base`` wrapped in the trainable adapter saved in ``folder``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder, is_trainable=True)
