"""Reading what ``LMM.generate`` returns: where each completion ends, by the model's end-of-sequence tokens."""

from __future__ import annotations

import torch

from mmpost.model.lmm import LMM


def completion_mask(completions: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """``[N, L]`` True on each completion's tokens up to and including its first end-of-sequence token."""
    is_eos = torch.zeros_like(completions, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= completions == eos
    length = completions.shape[1]
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(completions[:, 0], length))
    return torch.arange(length, device=completions.device) <= first.unsqueeze(-1)  # [N, L]


def eos_token_ids(model: LMM) -> set[int]:
    configured = model.base_llm.generation_config.eos_token_id
    if configured is None:
        configured = model.tokenizer.eos_token_id
    return set(configured) if isinstance(configured, list) else {int(configured)}
