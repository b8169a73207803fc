"""The loss of preference pairs and their held-out figures.

A ``PairBatch`` holds each pair's chosen and rejected rows side by side; the policy's summed log-probs of both
answers come from one forward with the pair's media encoded once (``media_repeat=2``) and, with
``share_prompt``, the prompt computed once for both answers; the reference's from ``ReferenceLogps`` (computed
when asked, or looked up in a table computed once before training).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from mmpost.data.batches import PairBatch
from mmpost.data.loader import make_loader, worker_count
from mmpost.data.pipeline import PairPipeline
from mmpost.data.sample import DataError, Sample
from mmpost.interfaces import IGNORE
from mmpost.losses.ce import label_logprobs
from mmpost.losses.dpo import preference_loss
from mmpost.losses.orpo import odds_ratio_loss
from mmpost.model.lmm import LMM
from mmpost.stages.reference import Reference
from mmpost.training.context import RunContext
from mmpost.training.evaluate import held_out_loader, read_held_out
from mmpost.training.step import BatchLoss
from mmpost.training.trainable import set_train_mode

log = logging.getLogger("mmpost")

STAT_KEYS = (
    "kl",
    "log_odds",
    "nll",
    "logps/chosen",
    "logps/rejected",
    "rewards/accuracy",
    "rewards/chosen",
    "rewards/margin",
    "rewards/rejected",
)


class ReferenceLogps:
    """The reference's summed log-probs of each pair's chosen and rejected answers: computed by the reference
    model when asked, or, once ``precomputed``, looked up by sample id."""

    def __init__(
        self,
        reference: Reference,
        accelerator,
        table: dict[str, list[float]] | None = None,
        share_prompt: bool = False,
    ) -> None:
        self.reference, self.accelerator, self.table = reference, accelerator, table
        self.share_prompt = share_prompt

    def __call__(self, policy: LMM, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is not None:
            values = torch.tensor([self.table[i] for i in batch.ids], device=batch.input_ids.device)
            return values[:, 0], values[:, 1]
        with self.accelerator.autocast():
            logps = self.reference.token_logprobs(
                policy,
                batch.input_ids,
                batch.attention_mask,
                batch.media,
                batch.labels,
                2,
                share_prompt=self.share_prompt,
            ).sum(-1)
        return logps[0::2], logps[1::2]

    @torch.no_grad()
    def precomputed(
        self, ctx: RunContext, model: LMM, samples: list[Sample], pipeline: PairPipeline | None = None
    ) -> ReferenceLogps:
        """The reference log-probs of every pair of ``samples`` (made into rows by ``pipeline``, dpo's pairs by
        default), computed once, as a look-up."""
        from tqdm.auto import tqdm

        cfg, acc = ctx.cfg, ctx.accelerator
        pipeline = pipeline or PairPipeline.for_model(model, cfg.data.max_length)
        loader, _ = make_loader(
            samples,
            pipeline,
            batch_size=cfg.eval.batch_size,
            seed=cfg.seed,
            num_workers=worker_count(cfg.data.num_workers, acc.device),
        )
        table: dict[str, list[float]] = {}
        model.to(acc.device).eval()
        for batch in tqdm(loader, desc="reference log-probs", disable=not acc.is_main_process):
            if not batch.empty:
                chosen, rejected = self(model, batch.to(acc.device))
                table.update(zip(batch.ids, torch.stack([chosen, rejected], -1).tolist(), strict=True))
        set_train_mode(model)
        return ReferenceLogps(self.reference, acc, table, self.share_prompt)


class PairLoss:
    """The stage's loss on a batch of pairs, summed over pairs and normalised by the pairs of the step."""

    def __init__(
        self,
        options: dict[str, Any],
        reference_logps: ReferenceLogps | None,
        accelerator,
        share_prompt: bool = False,
    ) -> None:
        self.options = options
        self.reference_logps = reference_logps
        self.accelerator = accelerator
        self.share_prompt = share_prompt

    def units(self, batch: PairBatch) -> int:
        return batch.pairs

    def __call__(self, model: torch.nn.Module, batch: PairBatch) -> BatchLoss:
        share = self.share_prompt
        out = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels, 2, share_prompt=share)
        logps = label_logprobs(out.logits, out.targets, out.kept).sum(-1)  # [2N]
        tokens = (batch.labels[:, 1:] != IGNORE).sum(-1)  # [2N]
        chosen, rejected = logps[0::2], logps[1::2]
        ref_chosen = ref_rejected = None
        if self.reference_logps is not None:
            ref_chosen, ref_rejected = self.reference_logps(self.accelerator.unwrap_model(model), batch)
        if self.options["loss_type"] == "orpo":
            out, nll = orpo_loss(chosen, rejected, tokens, self.options["beta"])
        else:
            nll = None
            out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, *pair_tokens(tokens), **self.options)
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
        if nll is not None:
            stats["nll"] = nll.detach().sum()
            stats["log_odds"] = out.log_odds.sum()
        return BatchLoss(loss_sum=out.losses.sum() + (0 if nll is None else nll.sum()), units=batch.pairs, stats=stats)


def pair_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2N]`` answer token counts, chosen and rejected side by side, as the two ``[N]`` halves."""
    return tokens[0::2], tokens[1::2]


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, tokens: torch.Tensor, beta: float):
    """ORPO (``mmpost.losses.orpo``) from the summed answer log-probs: the odds-ratio term of each pair and the
    chosen answer's NLL per token. Departs from TRL's ``ORPOTrainer``, whose NLL averages over every attended token
    of the chosen rows, prompt included: here it is the answer's alone, as in the paper (eq. 2), and the mean is
    per pair, as every loss of this stage."""
    chosen_tokens, rejected_tokens = pair_tokens(tokens.clamp(min=1))
    out = odds_ratio_loss(chosen / chosen_tokens, rejected / rejected_tokens, beta=beta)
    return out, -chosen / chosen_tokens


class PairEvaluator:
    """Held-out preference figures on ``data.eval`` pairs: loss, preference accuracy, rewards, log-probs."""

    def __init__(self, ctx: RunContext, model: LMM, loss: PairLoss) -> None:
        self.ctx, self.loss = ctx, loss
        reference = loss.reference_logps.reference if loss.reference_logps is not None else None
        self.also_runs = [reference.copy] if reference is not None and reference.copy is not None else []
        samples = read_held_out(ctx)
        self.enabled = samples is not None
        if self.enabled:
            self.loader = held_out_loader(ctx, samples, PairPipeline.for_model(model, ctx.cfg.data.max_length))

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


def eval_pairs(model: LMM, batches: Iterable[PairBatch], loss: PairLoss, acc) -> dict[str, float]:
    """Summed loss and stats over held-out pairs, reduced across processes (a process whose share has no usable
    pair adds zeros: it must still join the reduction the others wait in)."""
    keys = ["pairs", "loss", *STAT_KEYS]
    totals = torch.zeros(len(keys), dtype=torch.float64)
    for batch in batches:
        if batch.empty:
            continue
        with acc.autocast():
            out = loss(model, batch.to(acc.device))
        stats = [out.stats.get(k, torch.zeros(())).detach().cpu().double() for k in STAT_KEYS]
        totals += torch.stack([torch.tensor(float(out.units)).double(), out.loss_sum.detach().cpu().double(), *stats])
    totals = acc.reduce(totals.to(acc.device), reduction="sum")
    if float(totals[0]) == 0:
        raise DataError("data.eval gave no usable preference pair")
    result = dict(zip(keys, totals.tolist(), strict=True))
    if loss.reference_logps is None:
        result.pop("kl")
    if loss.options["loss_type"] != "orpo":
        result.pop("log_odds"), result.pop("nll")
    return result
