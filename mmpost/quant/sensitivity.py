"""How much the answer depends on each decoder block's output at media tokens and at text tokens.

The calibrated searches (AWQ's scales, SmoothQuant's α search) keep what reproduces a block's float outputs (its
attention or its MLP) best on the calibration tokens. Counting every token alike lets the media tokens decide, since
they are often most of a multimodal sequence, although the answer may depend on them far less than on the text: MBQ
(Li et al., "Modality-Balanced Quantization for Large Vision-Language Models", CVPR 2025) measured a gap of ten
times and more on LLaVA-class models, and weighs each modality's reconstruction error by its sensitivity.

mmpost measures that sensitivity with one backward pass of the float model's answer cross-entropy over the
calibration batches: for each block, the mean over media-token rows, and over text-token rows, of the squared norm of
the loss's gradient at the block's output. To first order an output error ``Δy`` at a row moves the loss by
``g·Δy``, whose square is ``||g||² ||Δy||² / D`` on average for an error spread over the ``D`` channels, so these are
the weights that turn the rows' squared errors into the loss's. They are scaled to average 1 over the calibration
rows; with no media rows (text calibration) every weight is 1, and the search is the plain one. AWQ's mean input
magnitude, which sets its candidate scales, is taken with the same weights, so that the channels it protects are
those the answer's tokens use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModalityWeights:
    """What one block's output error weighs per row, at media-token rows and at text-token rows."""

    media: float = 1.0
    text: float = 1.0

    def of_rows(self, media: torch.Tensor) -> torch.Tensor:
        """Per-row weights for a boolean mask of media-token rows."""
        return torch.where(media, self.media, self.text).float()


def _output(value):
    return value[0] if isinstance(value, tuple) else value


def modality_weights(model, batches: list, blocks: list[nn.Module]) -> dict[int, ModalityWeights]:
    """Each of ``blocks``' (modules inside the LLM's decoder) weights, keyed by ``id(block)``, from the answer
    cross-entropy of ``model`` (an ``LMM``) on ``batches`` (collated conversations with labels).

    The model's parameters are frozen for the pass (only the activations get gradients) and restored after.
    """
    device = next(model.parameters()).device
    placeholder_ids = torch.tensor(list(model.placeholder_ids.values()), device=device)
    sums = {id(b): torch.zeros(2, dtype=torch.float64) for b in blocks}  # squared gradient norms: media, text
    rows = {id(b): torch.zeros(2, dtype=torch.float64) for b in blocks}
    current: dict[str, torch.Tensor] = {}

    def watch(block: nn.Module):
        key = id(block)

        def hook(module: nn.Module, args, output) -> None:
            out = _output(output)
            if not out.requires_grad:
                return
            media, text = current["media"], current["text"]

            def gather(grad: torch.Tensor) -> None:
                squared = grad.float().pow(2).sum(-1)  # [B, T]
                sums[key] += torch.stack([squared[media].sum(), squared[text].sum()]).double().cpu()

            out.register_hook(gather)
            rows[key] += torch.tensor([float(media.sum()), float(text.sum())], dtype=torch.float64)

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
                current["media"] = torch.isin(batch.input_ids, placeholder_ids) & real
                current["text"] = real & ~current["media"]
                out = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels, cross_entropy=True)
                if out.cross_entropy.requires_grad:
                    out.cross_entropy.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return {key: _normalised(sums[key], rows[key]) for key in sums}


def _normalised(sums: torch.Tensor, rows: torch.Tensor) -> ModalityWeights:
    """Mean squared gradient per modality, scaled to average 1 over the rows; 1 and 1 unless both are present and
    the gradients are not all zero."""
    if (rows == 0).any():
        return ModalityWeights()
    mean = sums / rows
    overall = float(sums.sum() / rows.sum())
    if overall <= 0 or not torch.isfinite(mean).all():
        return ModalityWeights()
    return ModalityWeights(media=float(mean[0]) / overall, text=float(mean[1]) / overall)
