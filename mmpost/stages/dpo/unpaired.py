"""KTO on unpaired examples (``stage: {name: dpo, loss_type: kto}``): each example is a prompt with one
``completion`` and a boolean ``label`` (desirable or not), as in TRL's unpaired preference format.

Every example is given a second completion, the next example's in file order (the last takes the first's), which
estimates KTO's KL baseline on mismatched (prompt, completion) pairs; TRL shifts completions within each batch
instead. The example's own row and its mismatched row are laid out as a ``PairBatch`` pair: one forward, the
prompt's media encoded once (and the prompt computed once with ``share_prompt``), and reference log-probs that can
be precomputed once per example like dpo's. The baseline is the mean log-ratio of the micro-batch's mismatched rows,
averaged across processes, clamped at 0 and detached (``mmpost.losses.kto``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mmpost.data.batches import PairBatch
from mmpost.data.pipeline import pair_answer
from mmpost.data.sample import DataError, Sample
from mmpost.losses.ce import label_logprobs
from mmpost.losses.kto import kto_loss
from mmpost.stages.dpo.pairs import ReferenceLogps
from mmpost.training.step import BatchLoss


def check_unpaired(samples: list[Sample]) -> None:
    """Fails before any model loads when a JSON sample is not an unpaired example."""
    ids = set()
    for sample in samples:
        if "chosen" in sample.meta or "rejected" in sample.meta:
            raise DataError(
                f"{sample.where()}: loss_type kto reads unpaired examples ('completion' and a boolean 'label'), "
                "not preference pairs; for pairs use a dpo loss_type (sigmoid, ipo, hinge, simpo, orpo), or write "
                "each pair as two examples, the chosen answer with label true and the rejected with label false"
            )
        if pair_answer(sample.meta.get("completion")) is None:
            raise DataError(f"{sample.where()}: a kto example needs a 'completion' (a string or one assistant message)")
        if not isinstance(sample.meta.get("label"), bool):
            raise DataError(f"{sample.where()}: a kto example needs 'label': true (desirable) or false (undesirable)")
        if sample.id in ids:
            raise DataError(f"{sample.where()}: the id {sample.id!r} appears twice; kto examples need unique ids")
        ids.add(sample.id)
    if len(samples) < 2:
        raise DataError("kto needs at least 2 examples: each one's KL baseline row takes another's completion")


def with_kl_completions(samples: list[Sample]) -> list[Sample]:
    """``samples`` with ``kl_completion``: the next example's completion."""
    following = samples[1:] + samples[:1]
    pairs = zip(samples, following, strict=True)
    return [replace(s, meta=s.meta | {"kl_completion": n.meta["completion"]}) for s, n in pairs]


class UnpairedLoss:
    """KTO's loss on a batch of examples (own row, mismatched row), normalised by the examples of the step."""

    def __init__(
        self, options: dict[str, Any], labels: dict[str, bool], reference_logps: ReferenceLogps, accelerator
    ) -> None:
        self.options, self.labels = options, labels
        self.reference_logps, self.accelerator = reference_logps, accelerator

    def units(self, batch: PairBatch) -> int:
        return batch.pairs

    def __call__(self, model: torch.nn.Module, batch: PairBatch) -> BatchLoss:
        share = self.reference_logps.share_prompt
        out = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels, 2, share_prompt=share)
        logps = label_logprobs(out.logits, out.targets, out.kept).sum(-1)  # [2N]: own, mismatched, ...
        own, mismatched = logps[0::2], logps[1::2]
        ref_own, ref_mismatched = self.reference_logps(self.accelerator.unwrap_model(model), batch)
        desirable = torch.tensor([self.labels[i] for i in batch.ids], device=own.device)
        # the baseline is the mean over every process's mismatched rows, as one process holding them all would take
        log_ratio = (mismatched.detach() - ref_mismatched).mean()
        baseline = self.accelerator.reduce(log_ratio, reduction="mean")
        result = kto_loss(
            own,
            ref_own,
            desirable,
            baseline[None],
            torch.zeros(1, dtype=baseline.dtype, device=baseline.device),
            **self.options,
        )
        n = batch.pairs
        stats = {
            "kl": result.kl * n,
            "logps/completion": own.detach().sum(),
            "rewards/desirable": result.rewards[desirable].sum(),
            "rewards/undesirable": result.rewards[~desirable].sum(),
            "desirable": desirable.float().sum(),
        }
        return BatchLoss(loss_sum=result.losses.sum(), units=n, stats=stats)


def example_labels(samples: list[Sample]) -> dict[str, bool]:
    return {s.id: s.meta["label"] for s in samples}
