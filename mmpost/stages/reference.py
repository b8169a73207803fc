"""The reference model of preference and RL stages: the policy as it was when the stage started.

Two ways to hold it:

- **adapters off**: when the policy trains only LoRA adapters that are new in this stage (their ``B``
  matrices still zero at the start, so the adapted model equals the starting one), the reference is the
  same model with its adapters disabled: no second copy in memory;
- **copy**: otherwise a frozen copy of the starting policy. A resumed run rebuilds the starting model
  (from ``from:`` or the model config, with the run's seed) instead of copying the checkpoint, which has
  moved away from it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch

from mmpost.interfaces import MediaBatch
from mmpost.losses.ce import label_logprobs
from mmpost.model.lmm import LMM
from mmpost.model.lora import adapters_are_fresh, adapters_off
from mmpost.training.context import RunContext, build_model
from mmpost.training.trainable import trains_only_adapters

log = logging.getLogger("mmpost")


class Reference:
    """Log-probabilities under the starting policy.

    Args:
        copy: a frozen copy of the starting policy, or None to use the policy with its adapters disabled.
    """

    def __init__(self, copy: LMM | None) -> None:
        self.copy = copy
        self.kind = "adapters off" if copy is None else "frozen copy"

    @torch.no_grad()
    def token_logprobs(
        self,
        policy: LMM,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch] | None,
        labels: torch.Tensor,
        media_repeat: int = 1,
        temperature: float = 1.0,
        share_prompt: bool = False,
    ) -> torch.Tensor:
        """``[B, T-1]`` label-token log-probs under the reference (``policy`` is the unwrapped policy;
        ``media_repeat`` and ``share_prompt`` as in ``LMM.forward``)."""
        model = policy if self.copy is None else self.copy
        off = adapters_off(policy.llm) if self.copy is None else contextlib.nullcontext()
        with off:
            out = model(input_ids, attention_mask, media, labels, media_repeat, share_prompt)
        return label_logprobs(out.logits, out.targets, out.kept, temperature)


def make_reference(ctx: RunContext, model: LMM, parts: Sequence[str]) -> Reference:
    """The reference for a stage training ``parts`` of ``model`` (before ``accelerator.prepare``)."""
    if trains_only_adapters(parts, model):
        start = model if ctx.checkpoint is None else _starting_model(ctx)
        if adapters_are_fresh(start.llm):
            log.info("reference: the policy with its LoRA adapters disabled (no copy)")
            return Reference(None)
        log.info("reference: a frozen copy (the LoRA adapters were trained before this stage)")
    else:
        log.info("reference: a frozen copy of the starting policy (it trains %s)", ", ".join(parts))
    reference = copy.deepcopy(model) if ctx.checkpoint is None else _starting_model(ctx)
    reference.requires_grad_(False).eval()
    return Reference(ctx.sharding.frozen(reference.to(ctx.accelerator.device)))


def _starting_model(ctx: RunContext) -> LMM:
    """The model the run started from (a resumed run's checkpoint has moved away from it)."""
    from accelerate.utils import set_seed

    state = torch.get_rng_state()
    set_seed(ctx.cfg.seed)  # a model built from config draws the weights it drew at the start
    start = build_model(dataclasses.replace(ctx, checkpoint=None))
    torch.set_rng_state(state)
    return start
