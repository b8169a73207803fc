"""Preference optimisation on pairs with media: DPO and its variants (IPO, hinge, conservative DPO, SimPO).

Data: a prompt (the messages, ending with a user turn, media by placeholder) plus a ``chosen`` and a
``rejected`` answer (strings, or one assistant message each as in TRL's conversational format), in
JSON / JSONL or webdataset shards. A pair whose answers are identical is skipped and counted.

Each step runs one forward over ``2N`` rows, chosen and rejected of each pair side by side, and the
pair's media are encoded and connected once for both rows (``media_repeat=2``). The loss of a step is
the mean over its pairs (``mmpost.losses.dpo``). The reference is the starting policy (a frozen copy,
or the policy with its LoRA adapters off; see ``mmpost.training.reference``); its log-probs can be
computed once for the whole training set before the first step (``precompute_reference``), after which
a copy is dropped from memory. SimPO needs no reference.

Logged per step: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``
(chosen reward above rejected), ``logps/chosen``, ``logps/rejected`` (summed log-probs of the answers)
and ``kl`` (mean log-ratio of policy to reference over both answers, a proxy for their KL). Held-out
pairs (``data.eval``) give the same figures under ``eval/``, with ``eval/preference_accuracy``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from mmpost.config import RunConfig
from mmpost.config.schema import DataSourceConfig
from mmpost.data.loader import make_loader, read_source
from mmpost.data.sample import DataError, Sample
from mmpost.losses.dpo import LOSS_TYPES, preference_loss
from mmpost.model.lmm import LMM, LossOutput
from mmpost.train import fit, held_out_loader, read_held_out
from mmpost.training.evaluate import to_device
from mmpost.training.parts import set_train_mode
from mmpost.training.reference import Reference, make_reference
from mmpost.training.run import RunContext, build_model, start_run

log = logging.getLogger("mmpost")

RefLogps = Callable[[LMM, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def pairs(batch: dict[str, Any]) -> int:
    """The units a preference loss is normalised by: the batch's pairs."""
    return len(batch["ids"])


class DPO:
    """Direct preference optimisation of connectors and LLM (or LoRA adapters) on preference pairs.

    Args:
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge`` or ``simpo`` (no reference, length-normalised).
        beta: inverse temperature of the implicit reward (DPO's β; SimPO's β, typically 2-10).
        label_smoothing: assumed fraction of flipped labels ε: with ``sigmoid`` this is conservative DPO.
        simpo_gamma: SimPO's target reward margin γ.
        precompute_reference: compute the reference log-probs of every training pair once before training
            (JSON / JSONL data only); the reference copy, if any, is then freed.
    """

    def __init__(
        self,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        precompute_reference: bool = False,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"stage.loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
        if not beta > 0:
            raise ValueError(f"stage.beta must be positive; got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"stage.label_smoothing must lie in [0, 0.5); got {label_smoothing}")
        if label_smoothing > 0 and loss_type in ("ipo", "hinge"):
            raise ValueError(f"stage.label_smoothing applies to sigmoid and simpo, not {loss_type}")
        self.options = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
        self.precompute = precompute_reference

    def default_trainable(self, model: LMM) -> list[str]:
        return ["llm.lora" if model.has_lora else "llm"]

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        samples = read_source(cfg.data.train, "data.train")
        if samples is not None:
            check_pairs(samples)
        if self.precompute and samples is None:
            raise DataError("stage.precompute_reference needs data.train as a .json / .jsonl file, not shards")
        ctx = start_run(cfg, resume, allow_changes)
        model = build_model(ctx)
        parts = cfg.train.trainable or self.default_trainable(model)
        train_ref = eval_ref = None
        if self.options["loss_type"] != "simpo":
            reference = make_reference(ctx, model, parts)
            train_ref = eval_ref = live_reference(ctx, reference)
            if self.precompute:
                train_ref = precompute(ctx, model, samples, cfg.data.train, train_ref)
                if cfg.data.eval is not None:
                    eval_ref = precompute(ctx, model, read_held_out(ctx), cfg.data.eval, eval_ref)
                reference.copy = None if reference.copy is None else reference.copy.to("meta")  # frees its memory
        loss = PairLoss(self.options, train_ref, ctx.accelerator)
        evaluator = PairEvaluator(ctx, model, PairLoss(self.options, eval_ref, ctx.accelerator))
        return fit(ctx, model, parts, loss, units=pairs, mode="pair", evaluator=evaluator, samples=samples)


def live_reference(ctx: RunContext, reference: Reference) -> RefLogps:
    """Reference log-probs of a batch's chosen and rejected answers, computed when asked."""

    def compute(policy: LMM, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with ctx.accelerator.autocast():
            logps = reference.token_logprobs(
                policy, batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"], 2
            ).sum(-1)
        return logps[0::2], logps[1::2]

    return compute


def check_pairs(samples: list[Sample]) -> None:
    """Fails before any model loads when a JSON sample has no ``chosen`` / ``rejected`` (identical ones are
    skipped and counted later, like corrupt media)."""
    ids = set()
    for sample in samples:
        for key in ("chosen", "rejected"):
            if key not in sample.meta:
                raise DataError(f"{sample.where()}: a preference pair needs a {key!r} answer")
        if sample.id in ids:
            raise DataError(f"{sample.where()}: the id {sample.id!r} appears twice; preference pairs need unique ids")
        ids.add(sample.id)


@torch.no_grad()
def precompute(
    ctx: RunContext, model: LMM, samples: list[Sample], source: DataSourceConfig, compute: RefLogps
) -> RefLogps:
    """Computes the reference log-probs of every pair of ``samples`` once; returns their look-up by sample id."""
    from tqdm.auto import tqdm

    cfg, acc = ctx.cfg, ctx.accelerator
    loader, _ = make_loader(samples, source, model, cfg.data, cfg.eval.batch_size, "pair", 0, 1, cfg.seed,
                            shuffle=False)  # fmt: skip
    table: dict[str, list[float]] = {}
    model.to(acc.device).eval()
    for batch in tqdm(loader, desc="reference log-probs", disable=not acc.is_main_process):
        if batch["ids"]:
            chosen, rejected = compute(model, to_device(batch, acc.device))
            table.update(zip(batch["ids"], torch.stack([chosen, rejected], -1).tolist(), strict=True))
    set_train_mode(model)

    def look_up(policy: LMM, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.tensor([table[i] for i in batch["ids"]], device=batch["input_ids"].device)
        return values[:, 0], values[:, 1]

    return look_up


STAT_KEYS = ("kl", "logps/chosen", "logps/rejected", "rewards/accuracy", "rewards/chosen", "rewards/margin",
             "rewards/rejected")  # fmt: skip


class PairLoss:
    """The stage's loss on a batch of pairs (rows alternate chosen, rejected), summed over pairs."""

    def __init__(self, options: dict[str, Any], reference_logps: RefLogps | None, accelerator) -> None:
        self.options = options
        self.reference_logps = reference_logps
        self.accelerator = accelerator

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        logps = model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"], media_repeat=2,
                      logprobs=True).sum(-1)  # fmt: skip  # [2N]
        tokens = (batch["labels"][:, 1:] != -100).sum(-1)  # [2N]
        chosen, rejected = logps[0::2], logps[1::2]
        ref_chosen = ref_rejected = None
        if self.reference_logps is not None:
            ref_chosen, ref_rejected = self.reference_logps(self.accelerator.unwrap_model(model), batch)
        out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, tokens[0::2], tokens[1::2], **self.options)
        stats = {
            "rewards/chosen": out.chosen_rewards.sum(),
            "rewards/rejected": out.rejected_rewards.sum(),
            "rewards/margin": (out.chosen_rewards - out.rejected_rewards).sum(),
            "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float().sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        if ref_chosen is not None:
            stats["kl"] = ((chosen.detach() - ref_chosen) + (rejected.detach() - ref_rejected)).sum() / 2
        return LossOutput(loss_sum=out.losses.sum(), num_tokens=len(batch["ids"]), stats=stats)


class PairEvaluator:
    """Held-out preference figures on ``data.eval`` pairs: loss, preference accuracy, rewards, log-probs."""

    def __init__(self, ctx: RunContext, model: LMM, loss: PairLoss) -> None:
        self.ctx, self.loss = ctx, loss
        samples = read_held_out(ctx)
        self.enabled = samples is not None
        if self.enabled:
            self.loader = held_out_loader(ctx, model, samples, "pair")

    @torch.no_grad()
    def __call__(self, model: LMM, step: int) -> dict[str, Any]:
        if not self.enabled:
            return {}
        acc = self.ctx.accelerator
        model.eval()
        totals = eval_pairs(model, self.loader, self.loss, acc)
        set_train_mode(model)
        n = max(totals.pop("pairs"), 1.0)
        record = {"step": step, "eval/loss": totals.pop("loss") / n}
        record |= {f"eval/{k}": v / n for k, v in totals.items()}
        record["eval/preference_accuracy"] = record.pop("eval/rewards/accuracy")
        log.info("step %d held-out pairs: %s", step, {k: round(v, 4) for k, v in record.items() if k != "step"})
        return record


def eval_pairs(model: LMM, batches: Iterable[dict[str, Any]], loss: PairLoss, acc) -> dict[str, float]:
    """Summed loss and stats over held-out pairs, reduced across processes (a process whose share has no usable
    pair adds zeros: it must still join the reduction the others wait in)."""
    keys = ["pairs", "loss", *STAT_KEYS]
    totals = torch.zeros(len(keys), dtype=torch.float64)
    for batch in batches:
        if not batch["ids"]:
            continue
        with acc.autocast():
            out = loss(model, to_device(batch, acc.device))
        stats = [out.stats.get(k, torch.zeros(())).detach().cpu().double() for k in STAT_KEYS]
        totals += torch.stack([torch.tensor(float(out.num_tokens)).double(), out.loss_sum.detach().cpu().double(),
                               *stats])  # fmt: skip
    totals = acc.reduce(totals.to(acc.device), reduction="sum")
    if float(totals[0]) == 0:
        raise DataError("data.eval gave no usable preference pair")
    result = dict(zip(keys, totals.tolist(), strict=True))
    if loss.reference_logps is None:
        result.pop("kl")
    return result
