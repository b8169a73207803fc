"""Preference optimisation on pairs with media: DPO and its variants (IPO, hinge, conservative DPO, SimPO, ORPO).

Data: a prompt (the messages, ending with a user turn, media by placeholder) plus a ``chosen`` and a
``rejected`` answer (strings, or one assistant message each as in TRL's conversational format), in
JSON / JSONL or webdataset shards. A pair whose answers are identical is skipped and counted.

Each step runs one forward over ``2N`` rows, chosen and rejected of each pair side by side, and the
pair's media are encoded and connected once for both rows (``media_repeat=2``). The loss of a step is
the mean over its pairs (``mmpost.losses.dpo``). The reference is the starting policy (a frozen copy,
or the policy with its LoRA adapters off; see ``mmpost.stages.reference``); its log-probs can be
computed once for the whole training set before the first step (``precompute_reference``), after which
a copy is dropped from memory. SimPO needs no reference.

Logged per step: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``
(chosen reward above rejected), ``logps/chosen``, ``logps/rejected`` (summed log-probs of the answers)
and ``kl`` (mean log-ratio of policy to reference over both answers, a proxy for their KL). Held-out
pairs (``data.eval``) give the same figures under ``eval/``, with ``eval/preference_accuracy``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from mmpost.config import RunConfig
from mmpost.config.fields import check_values, ranged
from mmpost.data.loader import read_source
from mmpost.data.pipeline import PairPipeline, UnpairedPipeline
from mmpost.data.sample import DataError, Sample
from mmpost.stages.dpo.pairs import PairEvaluator, PairLoss, ReferenceLogps
from mmpost.stages.dpo.unpaired import UnpairedLoss, check_unpaired, example_labels, with_kl_completions
from mmpost.stages.reference import make_reference
from mmpost.training.context import build_model, start_run
from mmpost.training.evaluate import read_held_out
from mmpost.training.loop import start_training, train, training_loader
from mmpost.training.step import supervised_step
from mmpost.training.trainable import resolve_parts

log = logging.getLogger("mmpost")


@dataclass
class DPOOptions:
    """``stage: {name: dpo, ...}``.

    Attributes:
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``simpo`` (no reference, length-normalised), ``orpo``
            (no reference: the chosen answer's NLL per token plus β times the odds-ratio term,
            ``mmpost.losses.orpo``; logs ``nll`` and ``log_odds``) or ``kto`` (unpaired examples: a prompt, a
            ``completion`` and a boolean ``label``; ``mmpost.stages.dpo.unpaired``; logs ``kl``,
            ``rewards/desirable`` and ``rewards/undesirable``; held-out data are pairs, scored as dpo scores them).
        beta: inverse temperature of the implicit reward (DPO's β; SimPO's β, typically 2-10; ORPO's weight λ of
            the odds-ratio term, 0.1 in the paper and TRL).
        label_smoothing: assumed fraction of flipped labels ε: with ``sigmoid`` this is conservative DPO.
        simpo_gamma: SimPO's target reward margin γ.
        desirable_weight: KTO's λ_D, the weight of desirable examples' losses (the paper keeps
            λ_D n_D / (λ_U n_U) within [1, 4/3]).
        undesirable_weight: KTO's λ_U.
        precompute_reference: compute the reference log-probs of every training pair once before training
            (JSON / JSONL data only); the reference copy, if any, is then freed. null (the default) decides: on
            when the data is a JSON / JSONL file and the run reads every pair at least once (``epochs`` >= 1, or
            ``max_steps`` x batch x accumulation x processes >= the pairs), as then it costs no more forwards
            and takes the reference out of every step (3.12 s -> 2.26 s per step measured on a LLaVA-shaped
            model); off for shards and for runs that read a part of the data.
        share_prompt: compute each pair's prompt (media and text) once for both answers, which attend to it
            through an attention mask (``mmpost.model.shared_prompt``; same log-probs, fewer tokens). Applies
            with the LLM's ``sdpa`` or ``eager`` attention; off, or with another attention, every row is
            computed whole.
    """

    name: Literal["dpo"] = "dpo"
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"] = "sigmoid"
    beta: float = ranged(0.1, gt=0)
    label_smoothing: float = ranged(0.0, ge=0, lt=0.5)
    simpo_gamma: float = 0.5
    desirable_weight: float = ranged(1.0, ge=0)
    undesirable_weight: float = ranged(1.0, ge=0)
    precompute_reference: bool | None = None
    share_prompt: bool = True

    def __post_init__(self) -> None:
        check_values(self, "stage")
        if self.label_smoothing > 0 and self.loss_type in ("ipo", "hinge", "orpo", "kto"):
            raise ValueError(f"stage.label_smoothing applies to sigmoid and simpo, not {self.loss_type}")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in ("simpo", "orpo")

    def loss_options(self, held_out: bool = False) -> dict[str, Any]:
        """The pair loss's options; ``held_out``: those that score held-out pairs (kto's with dpo's loss)."""
        loss_type = "sigmoid" if self.loss_type == "kto" and held_out else self.loss_type
        options = dict(beta=self.beta, label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        return options | {"loss_type": loss_type}

    def kto_options(self) -> dict[str, Any]:
        return dict(beta=self.beta, desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)


class DPO:
    """Direct preference optimisation of connectors and LLM (or LoRA adapters) on preference pairs."""

    Options = DPOOptions
    trains = ("llm",)  # the LoRA adapters when the model has them

    def __init__(self, options: DPOOptions) -> None:
        self.options = options

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        kto = self.options.loss_type == "kto"
        samples = read_source(cfg.data.train, "data.train")
        if samples is None and kto:
            raise DataError("stage.loss_type kto needs data.train as a .json / .jsonl file, not shards")
        if samples is not None:
            check_unpaired(samples) if kto else check_pairs(samples)
        if self.options.precompute_reference and samples is None:
            raise DataError("stage.precompute_reference needs data.train as a .json / .jsonl file, not shards")
        ctx = start_run(cfg, resume, allow_changes)
        precompute = self.options.precompute_reference
        if precompute is None:
            precompute = samples is not None and reads_every_pair(cfg, len(samples), ctx.accelerator.num_processes)
            if self.options.needs_reference:
                log.info("reference: log-probs %s", "precomputed once for every pair" if precompute else "per step")
        model = build_model(ctx)
        parts = resolve_parts(cfg.train.trainable, self.trains, model)
        pipeline = (UnpairedPipeline if kto else PairPipeline).for_model(model, cfg.data.max_length)
        if kto:
            samples = with_kl_completions(samples)
        train_ref = eval_ref = None
        if self.options.needs_reference:
            reference = make_reference(ctx, model, parts)
            train_ref = eval_ref = ReferenceLogps(reference, ctx.accelerator, share_prompt=self.options.share_prompt)
            if precompute:
                train_ref = train_ref.precomputed(ctx, model, samples, pipeline)
                if cfg.data.eval is not None:
                    eval_ref = eval_ref.precomputed(ctx, model, read_held_out(ctx))
                reference.copy = None if reference.copy is None else reference.copy.to("meta")  # frees its memory
        share = self.options.share_prompt
        if kto:
            loss = UnpairedLoss(self.options.kto_options(), example_labels(samples), train_ref, ctx.accelerator)
        else:
            loss = PairLoss(self.options.loss_options(), train_ref, ctx.accelerator, share)
        eval_loss = PairLoss(self.options.loss_options(held_out=True), eval_ref, ctx.accelerator, share)
        evaluator = PairEvaluator(ctx, model, eval_loss)
        loader = training_loader(ctx, samples, pipeline)
        return train(start_training(ctx, model, parts, loader, evaluator), supervised_step(loss))


def reads_every_pair(cfg: RunConfig, pairs: int, processes: int) -> bool:
    """Whether the run reads each of its ``pairs`` training pairs at least once."""
    train = cfg.train
    if train.max_steps == 0:
        return train.epochs >= 1
    return train.max_steps * train.batch_size * train.grad_accum * processes >= pairs


def check_pairs(samples: list[Sample]) -> None:
    """Fails before any model loads when a JSON sample has no ``chosen`` / ``rejected`` (identical ones are
    skipped and counted later, like corrupt media)."""
    ids = set()
    for sample in samples:
        if "completion" in sample.meta and "label" in sample.meta:
            raise DataError(
                f"{sample.where()}: an unpaired example ('completion' and 'label'); dpo's loss types need "
                "'chosen' / 'rejected' pairs; for unpaired data set stage.loss_type: kto"
            )
        for key in ("chosen", "rejected"):
            if key not in sample.meta:
                raise DataError(f"{sample.where()}: a preference pair needs a {key!r} answer")
        if sample.id in ids:
            raise DataError(f"{sample.where()}: the id {sample.id!r} appears twice; preference pairs need unique ids")
        ids.add(sample.id)
