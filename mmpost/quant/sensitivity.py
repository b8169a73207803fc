"""How much the answer depends on each decoder block's output at each calibration token.

The calibrated searches (AWQ's scales, SmoothQuant's α search) keep what reproduces a block's float outputs (its
attention or its MLP) best on the calibration tokens. Counting every token alike lets the tokens that are many, or
large, decide: media tokens are often most of a multimodal sequence, and a first token that attention uses as a
sink carries activations far larger than the rest, although the answer depends on either much less than on the
text. MBQ (Li et al., "Modality-Balanced Quantization for Large Vision-Language Models", CVPR 2025) measured a gap
of ten times and more between text and vision tokens on LLaVA-class models and weighs each modality's
reconstruction error by its sensitivity; later work (token-level calibration) weighs each token by its own.

mmpost measures sensitivity with one backward pass of the float model's answer cross-entropy over the calibration
batches. To first order an output error ``Δy`` at a token moves the loss by ``g·Δy``, whose square is
``||g||² ||Δy||² / D`` on average for an error spread over the ``D`` channels; so a token's weight is the squared
norm of the loss's gradient at the block's output there:

- ``modality``: each token gets its modality's mean (over media tokens, over text tokens). With no media in the
  calibration (text calibration) every weight is 1 and the search is the plain one.
- ``token``: each token keeps its own.

The weights are scaled to average 1 over a block's calibration tokens (0 on padding). AWQ's mean input magnitude,
which sets its candidate scales, is taken with the same weights, so that the channels it protects are those the
answer uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class BlockWeights:
    """One block's weights of its tokens' output errors.

    Attributes:
        rows: per calibration batch, ``[B, T]`` the weight of each token (0 on padding).
        media: the mean weight of a media token (0 with none).
        text: the mean weight of a text token.
    """

    rows: list[torch.Tensor]
    media: float
    text: float


def _output(value):
    return value[0] if isinstance(value, tuple) else value


def token_weights(
    model, batches: list, blocks: list[nn.Module], by: Literal["modality", "token"] = "modality"
) -> dict[int, BlockWeights]:
    """Each of ``blocks``' (modules inside the LLM's decoder) weights, keyed by ``id(block)``, from the answer
    cross-entropy of ``model`` (an ``LMM``) on ``batches`` (collated conversations with labels).

    The model's parameters are frozen for the pass (only the activations get gradients) and restored after.
    """
    device = next(model.parameters()).device
    placeholder_ids = torch.tensor(list(model.placeholder_ids.values()), device=device)
    squared: dict[int, list[torch.Tensor]] = {id(b): [] for b in blocks}  # per batch [B, T]
    masks: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch (real tokens, media tokens)

    def watch(block: nn.Module):
        key = id(block)

        def hook(module: nn.Module, args, output) -> None:
            out = _output(output)
            if out.requires_grad:
                out.register_hook(lambda grad: squared[key].append(grad.float().pow(2).sum(-1).cpu()))

        return hook

    def track(module: nn.Module, args, output):
        return output.requires_grad_() if not output.requires_grad else output

    trainable = [p for p in model.parameters() if p.requires_grad]
    handles = [b.register_forward_hook(watch(b)) for b in blocks]
    handles.append(model.llm.get_input_embeddings().register_forward_hook(track))
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in batches:
                batch = batch.to(device)
                real = batch.attention_mask.bool()
                masks.append((real.cpu(), (torch.isin(batch.input_ids, placeholder_ids) & real).cpu()))
                out = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels, cross_entropy=True)
                count = len(masks)
                if out.cross_entropy.requires_grad:
                    out.cross_entropy.backward()
                for per_batch in squared.values():  # a batch with no answer token, or a block it never reached
                    if len(per_batch) < count:
                        per_batch.append(torch.zeros(real.shape))
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return {key: _weights(values, masks, by) for key, values in squared.items()}


def _weights(squared: list[torch.Tensor], masks: list, by: str) -> BlockWeights:
    """Per-token weights from the squared gradient norms, averaging 1 over the real tokens; all 1 where the
    gradients are all zero (or not finite), or, by modality, where one of the two modalities is absent."""
    real = torch.cat([m[0].flatten() for m in masks])
    media = torch.cat([m[1].flatten() for m in masks])
    values = torch.cat([s.flatten() for s in squared]).double()
    text = real & ~media
    overall = values[real].mean() if real.any() else torch.tensor(0.0)
    if overall <= 0 or not torch.isfinite(values[real]).all():
        values = real.double()
    elif by == "modality":
        if media.any() and text.any():
            values = torch.where(media, values[media].mean(), values[text].mean()) * real / overall
        else:
            values = real.double()
    else:
        values = values * real / overall
    rows, start = [], 0
    for m in masks:
        rows.append(values[start : start + m[0].numel()].view(m[0].shape).float())
        start += m[0].numel()
    mean_media = float(values[media].mean()) if media.any() else 0.0
    mean_text = float(values[text].mean()) if text.any() else 0.0
    return BlockWeights(rows, mean_media, mean_text)
