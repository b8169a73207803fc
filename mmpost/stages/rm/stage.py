"""Reward modelling on preference pairs with media: a Bradley–Terry reward model, as TRL 1.16's ``RewardTrainer``.

The model is the LMM with a scalar ``reward`` head on its LLM's last hidden state (``mmpost.model.heads``), added
here when the starting model has none; the reward of a prompt and an answer is the head's value at the answer's
end-of-sequence token (the end-of-turn token of a chat template; the answer's last token when it has none). That is
where a sampled completion ends, so a reward function reading a policy's rollouts at their last token
(``mmpost.reward_model``) reads this model at the token it was trained on. What trains by default is the LLM (its
LoRA adapters when the model has them) and the head.

Data: pairs as the dpo stage reads them, a prompt (messages ending with a user turn, media by placeholder) with a
``chosen`` and a ``rejected`` answer, in JSON / JSONL or webdataset shards; with ``margin: true`` each pair also
carries a number ``margin`` (JSON / JSONL only). Unpaired examples (kto's) are refused before any model loads, and
so is a pair without its margin when margins are on.

Each step runs one forward over ``2N`` rows, chosen and rejected side by side, with each pair's media encoded and
connected once for both (``media_repeat=2``), and takes the rewards at each answer's end. The loss is
``mmpost.losses.rm``, ``-log σ(r_c - r_r - m)`` plus ``η (r_c + r_r)²`` with ``center_rewards_coefficient`` η, summed
over the pairs of the step's micro-batches and processes and divided by their number.

Logged per step (means over pairs): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (``r_c - r_r``) and
``rewards/accuracy`` (``r_c > r_r``). On held-out pairs (``data.eval``), reduced across processes: ``eval/loss``,
``eval/accuracy`` (the held-out pair accuracy), ``eval/margin``, ``eval/rewards/chosen`` and
``eval/rewards/rejected``. The final model is saved with its head; ``mmpost.load`` reloads it.

Where this departs from TRL:

- TRL reads the reward at the last token of the rendered row; for a chat template that writes a newline after its
  end-of-turn token, that is the newline, a token that generation never reaches. Here it is the end-of-turn token.
- TRL averages the loss per micro-batch; here every pair of the step weighs the same however the step is split (the
  same for equal micro-batches).
- TRL applies a ``margin`` column whenever the data has one; here only with ``margin: true``, and then a pair
  without one is an error rather than a silent zero.
- TRL's reward model is a sequence classifier without the LM head; the LMM keeps its LM head (this loss leaves it
  untrained), so the saved model still generates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate.utils import DistributedDataParallelKwargs

from mmpost.config import RunConfig
from mmpost.config.fields import check_values, ranged
from mmpost.data.batches import PairBatch
from mmpost.data.loader import read_source
from mmpost.data.pipeline import PairPipeline
from mmpost.data.sample import DataError, Sample
from mmpost.losses.rm import bradley_terry_loss
from mmpost.model.completions import eos_token_ids
from mmpost.model.heads import add_head, answer_end_scores
from mmpost.model.lmm import LMM
from mmpost.stages.dpo.stage import check_pairs
from mmpost.training.context import RunContext, build_model, start_run
from mmpost.training.evaluate import held_out_loader, read_held_out
from mmpost.training.loop import start_training, train, training_loader
from mmpost.training.step import BatchLoss, supervised_step
from mmpost.training.trainable import resolve_parts, set_train_mode

log = logging.getLogger("mmpost")

EVAL_KEYS = ("pairs", "loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")


@dataclass
class RewardModelOptions:
    """``stage: {name: rm, ...}``.

    Attributes:
        margin: subtract each pair's ``margin`` (a number in its record) from the reward difference,
            ``-log σ(r_c - r_r - m)``, as Llama 2's reward models and TRL's ``margin`` column; every training and
            held-out pair must have one, and the data must be JSON / JSONL.
        center_rewards_coefficient: η of the centring term ``η (r_c + r_r)²`` that keeps the rewards near zero
            mean (TRL's option of the same name; 0.01 in its docs); null adds none.
    """

    name: Literal["rm"] = "rm"
    margin: bool = False
    center_rewards_coefficient: float | None = ranged(None, ge=0)

    def __post_init__(self) -> None:
        check_values(self, "stage")


class RewardModel:
    """A Bradley–Terry reward model: a scalar head and the LLM (or its LoRA adapters) trained on preference pairs."""

    Options = RewardModelOptions
    trains = ("llm", "heads")  # the LoRA adapters when the model has them, and the reward head

    def __init__(self, options: RewardModelOptions) -> None:
        self.options = options

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        o = self.options
        samples = read_source(cfg.data.train, "data.train")
        if samples is None and o.margin:
            raise DataError("stage.margin needs data.train as a .json / .jsonl file, not shards")
        if samples is not None:
            check_reward_pairs(samples, o.margin)
        ctx = start_run(cfg, resume, allow_changes)
        held_out = read_held_out(ctx)
        if held_out is not None:
            check_reward_pairs(held_out, o.margin)
        model = build_model(ctx)
        add_head(model, "reward")  # a resumed checkpoint, or a reward model to start from, has it already
        parts = resolve_parts(cfg.train.trainable, self.trains, model)
        eos = eos_token_ids(model)
        loss = RewardLoss(eos, pair_margins(samples) if o.margin else None, o.center_rewards_coefficient)
        eval_loss = RewardLoss(eos, pair_margins(held_out) if o.margin else None, o.center_rewards_coefficient)
        evaluator = RewardEvaluator(ctx, model, held_out, eval_loss)
        if "llm" in parts and unused_lm_head(model) and ctx.sharding.kind == "ddp":
            # the loss never reads an untied LM head: DDP must expect a trained weight without a gradient
            ctx.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        loader = training_loader(ctx, samples, PairPipeline.for_model(model, cfg.data.max_length))
        return train(start_training(ctx, model, parts, loader, evaluator), supervised_step(loss))


def check_reward_pairs(samples: list[Sample], margin: bool) -> None:
    """Fails before any model loads on data the rm stage cannot train on: unpaired examples, pairs without both
    answers or with a repeated id (``check_pairs``), and with ``margin`` a pair without a numeric ``margin``."""
    for sample in samples:
        if "completion" in sample.meta and "chosen" not in sample.meta:
            raise DataError(
                f"{sample.where()}: an unpaired example ('completion' and 'label', kto's format); the rm stage "
                "trains a Bradley–Terry reward model on preference pairs, each a prompt with a 'chosen' and a "
                "'rejected' answer; write each prompt's preferred and dispreferred answers as one pair"
            )
    check_pairs(samples)
    if not margin:
        if any("margin" in s.meta for s in samples):
            log.info("the pairs have 'margin' fields; stage.margin is off, so the loss does not use them")
        return
    for sample in samples:
        value = sample.meta.get("margin")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataError(
                f"{sample.where()}: stage.margin is on, so every pair needs a finite number 'margin' "
                f"(got {value!r}); add one, or set stage.margin: false"
            )


def unused_lm_head(model: LMM) -> bool:
    """Whether the LLM's output embedding is a weight of its own (untied), which the reward's forward never uses."""
    llm = model.base_llm
    output = llm.get_output_embeddings()
    return output is not None and output.weight is not llm.get_input_embeddings().weight


def pair_margins(samples: list[Sample] | None) -> dict[str, float]:
    """Each pair's margin by id (checked by ``check_reward_pairs``)."""
    return {s.id: float(s.meta["margin"]) for s in samples or []}


def pair_rewards(model: torch.nn.Module, batch: PairBatch, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N], [N])`` rewards of each pair's chosen and rejected answer, from one forward of the ``2N`` rows (each
    pair's media encoded once) read at each answer's first end-of-sequence token (one of ``eos_ids``)."""
    out = model(batch.input_ids, batch.attention_mask, batch.media, media_repeat=2, head="reward")
    rewards = answer_end_scores(out.values, batch.labels, batch.input_ids, eos_ids)  # [2N]
    return rewards[0::2], rewards[1::2]


class RewardLoss:
    """The Bradley–Terry loss of a batch of pairs, summed over pairs and normalised by the pairs of the step.

    Args:
        eos_ids: the model's end-of-sequence token ids, where each answer's reward is read.
        margins: each pair's margin by id, or None to train without margins.
        center_coefficient: η of the centring term, or None.
    """

    def __init__(self, eos_ids: set[int], margins: dict[str, float] | None, center_coefficient: float | None) -> None:
        self.eos_ids, self.margins, self.center_coefficient = eos_ids, margins, center_coefficient

    def units(self, batch: PairBatch) -> int:
        return batch.pairs

    def __call__(self, model: torch.nn.Module, batch: PairBatch) -> BatchLoss:
        chosen, rejected = pair_rewards(model, batch, self.eos_ids)
        margin = None
        if self.margins is not None:
            margin = torch.tensor([self.margins[i] for i in batch.ids], dtype=chosen.dtype, device=chosen.device)
        losses = bradley_terry_loss(chosen, rejected, margin, self.center_coefficient)  # [N]
        chosen, rejected = chosen.detach(), rejected.detach()
        stats = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/margin": (chosen - rejected).sum(),
            "rewards/accuracy": (chosen > rejected).float().sum(),
        }
        return BatchLoss(loss_sum=losses.sum(), units=batch.pairs, stats=stats)


class RewardEvaluator:
    """Held-out figures on ``data.eval`` pairs: the loss, the pair accuracy (chosen reward above rejected), the mean
    reward margin and rewards; each process scores its share and the sums are reduced across processes."""

    def __init__(self, ctx: RunContext, model: LMM, samples: list[Sample] | None, loss: RewardLoss) -> None:
        self.ctx, self.loss = ctx, loss
        self.enabled = samples is not None
        if self.enabled:
            self.loader = held_out_loader(ctx, samples, PairPipeline.for_model(model, ctx.cfg.data.max_length))

    @torch.no_grad()
    def __call__(self, model: LMM, step: int) -> dict[str, Any]:
        if not self.enabled:
            return {}
        acc = self.ctx.accelerator
        model.eval()
        totals = torch.zeros(len(EVAL_KEYS), dtype=torch.float64)
        for batch in self.loader:
            if batch.empty:  # this process must still join the reduction the others wait in
                continue
            with acc.autocast():
                out = self.loss(model, batch.to(acc.device))
            stats = [out.stats[k] for k in ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")]
            values = [torch.tensor(float(out.units)), out.loss_sum.detach(), *stats]
            totals += torch.stack([v.cpu().double() for v in values])
        set_train_mode(model)
        totals = acc.reduce(totals.to(acc.device), reduction="sum").tolist()
        if totals[0] == 0:
            raise DataError("data.eval gave no usable preference pair")
        n = totals[0]
        record = {"step": step} | {f"eval/{k}": v / n for k, v in zip(EVAL_KEYS[1:], totals[1:], strict=True)}
        log.info("step %d held-out pairs: %s", step, {k: round(v, 4) for k, v in record.items() if k != "step"})
        return record
