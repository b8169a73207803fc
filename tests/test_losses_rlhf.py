"""KTO, ORPO, RLOO and PPO losses: hand-worked numbers, parity with TRL's trainers, argument checks.

As in test_losses_rl.py, TRL's own code runs on the same numbers: a trainer made with ``object.__new__`` and given
only the attributes its method reads, with forward passes stubbed to return prescribed log-probabilities. TRL 1.16
no longer ships PPO, so PPO is checked on hand-worked numbers and against GAE written as a closed-form sum.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmpost.losses.kto import kto_loss
from mmpost.losses.orpo import odds_ratio_loss
from mmpost.losses.ppo import ppo_loss, ppo_rollout
from mmpost.losses.rloo import rloo_advantages, rloo_loss, sequence_kl

pytest.importorskip("trl")

ATOL = 1e-6
_ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), process_index=0, reduce=lambda t, reduction="sum": t)
_ACCELERATOR.gather = _ACCELERATOR.gather_for_metrics = lambda t: t


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=ATOL, rtol=0)


def _stand_in(trainer_cls, **attributes):
    """A TRL trainer with no model, data or accelerator built: only the attributes its method reads."""
    trainer = object.__new__(trainer_cls)
    trainer.__dict__.update(attributes, _metrics={"train": defaultdict(list)})
    return trainer


def _right_padded(lengths, width: int) -> torch.Tensor:
    return (torch.arange(width) < torch.as_tensor(lengths)[:, None]).long()


def test_kto_hand_worked():
    # KL rows: log-ratios 1 and 0 -> z0 = 0.5. β = 0.5.
    # desirable, r = -10 - (-12) = 2: 1 - σ(0.5·(2 - 0.5)) = σ(-0.75) = 0.320821300824607
    # undesirable, r = -8 - (-7) = -1: 2 · (1 - σ(0.5·(0.5 + 1))) = 2σ(-0.75) = 0.641642601649214 (λ_U = 2)
    labels = torch.tensor([True, False])
    out = kto_loss(_t(-10, -8), _t(-12, -7), labels, _t(-3, -5), _t(-4, -5), beta=0.5, undesirable_weight=2.0)
    _close(out.losses, [0.320821300824607, 0.641642601649214])
    _close(out.rewards, [1.0, -0.5])
    _close(out.kl, 0.5)
    # a negative KL estimate is clamped: z0 = max(0, -1) = 0, so the desirable loss is 1 - σ(1) = 0.2689414213699951
    clamped = kto_loss(_t(-10), _t(-12), labels[:1], _t(-5), _t(-4), beta=0.5)
    _close(clamped.kl, 0.0)
    _close(clamped.losses, [0.2689414213699951])


class _TableLM(torch.nn.Module):
    """A causal LM reduced to its fused head's output: prescribed next-token log-probs for each known row of ids."""

    is_gradient_checkpointing = False

    def __init__(self, ids: torch.Tensor, logps: torch.Tensor):
        super().__init__()
        self.table = {tuple(row.tolist()): lp for row, lp in zip(ids, logps, strict=True)}  # ids [R, L] -> [L-1]

    def forward(self, input_ids, labels, **unused):
        from trl.trainer.utils import FusedCausalLMOutput

        logps = torch.stack([self.table[tuple(row.tolist())] for row in input_ids])
        valid = labels[:, 1:] != -100  # TRL's fused head zeroes every field where the label is ignored
        zeros = torch.zeros_like(logps)
        return FusedCausalLMOutput(log_probs=logps.masked_fill(~valid, 0.0), entropy=zeros, mean_logits=zeros)


def _completion_rows(gen, count: int, vocab_offset: int, length: int = 8, prompt: int = 2):
    """Rows of a 2-token prompt and a completion of 1 to 6 tokens; policy and reference next-token log-probs."""
    ends = prompt + torch.randint(1, length - prompt + 1, (count,), generator=gen)
    pos = torch.arange(length)
    completion_mask, attention_mask = ((pos >= prompt) & (pos < ends[:, None])).long(), _right_padded(ends, length)
    ids = torch.randint(0, 1000, (count, length), generator=gen) + vocab_offset
    policy = -torch.rand(count, length - 1, generator=gen, dtype=torch.float64) * 2  # [R, L-1]
    ref = policy + 0.6 * torch.randn(count, length - 1, generator=gen, dtype=torch.float64)
    return ids, attention_mask, completion_mask, policy, ref


@pytest.mark.parametrize(("loss_type", "kl_shift"), [("kto", 0.0), ("kto", 2.0), ("apo_zero_unpaired", 0.0)])
def test_kto_parity_with_trl(loss_type, kl_shift):
    from trl import KTOTrainer

    gen = torch.Generator().manual_seed(5)
    ids, att, comp, policy, ref = _completion_rows(gen, 6, vocab_offset=0)
    kl_ids, kl_att, kl_comp, kl_policy, kl_ref = _completion_rows(gen, 6, vocab_offset=1000)
    kl_ref = kl_ref + kl_shift  # a reference 2 nats more likely per token drives the KL estimate below 0
    labels = torch.tensor([True, False, True, True, False, False])
    model = _TableLM(torch.cat([ids, kl_ids]), torch.cat([policy, kl_policy]))
    trainer = _stand_in(KTOTrainer, model=model, ref_model=_TableLM(torch.cat([ids, kl_ids]), torch.cat([ref, kl_ref])))
    trainer.__dict__.update(loss_type=loss_type, calculate_KL=loss_type == "kto", beta=0.3, desirable_weight=1.0)
    trainer.__dict__.update(undesirable_weight=1.4, precompute_ref_logps=False, aux_loss_enabled=False)
    trainer.__dict__.update(accelerator=_ACCELERATOR, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    trainer.__dict__.update(_total_train_tokens=0, _tp_size=1)
    kl_batch = {"KL_input_ids": kl_ids, "KL_attention_mask": kl_att, "KL_completion_mask": kl_comp}

    def trl_loss(rows):
        batch = {"input_ids": ids[rows], "attention_mask": att[rows], "completion_mask": comp[rows]}
        return trainer._compute_loss(model, {**batch, "label": labels[rows], **kl_batch}, return_outputs=False)

    sums = [(lp * m[:, 1:]).sum(1) for lp, m in ((policy, comp), (ref, comp), (kl_policy, kl_comp), (kl_ref, kl_comp))]
    weights = {"desirable_weight": 1.0, "undesirable_weight": 1.4}
    ours = kto_loss(*sums[:2], labels, *sums[2:], loss_type=loss_type, beta=0.3, **weights)
    if loss_type == "kto":
        assert ((sums[2] - sums[3]).mean() < 0) == (kl_shift > 0) and (ours.kl.item() == 0.0) == (kl_shift > 0)
    _close(ours.losses.mean(), trl_loss(slice(None)).item())
    metrics = trainer._metrics["train"]
    _close(ours.kl, metrics["kl"][0])
    _close(ours.rewards[labels].mean(), metrics["rewards/chosen"][0])
    _close(ours.rewards[~labels].mean(), metrics["rewards/rejected"][0])
    for i in range(len(labels)):  # TRL reports a batch mean; each example alone, against the same KL rows
        _close(ours.losses[i], trl_loss(slice(i, i + 1)).item())


def test_orpo_hand_worked():
    # P_c = 0.5 -> odds 1; P_r = 0.25 -> odds 1/3; log odds ratio log 3 = 1.0986122886681098
    # -β log σ(log 3) = β log(1 + 1/3) = 0.1 · log(4/3) = 0.028768207245178087
    out = odds_ratio_loss(torch.log(_t(0.5)), torch.log(_t(0.25)), beta=0.1)
    _close(out.log_odds, [1.0986122886681098])
    _close(out.losses, [0.028768207245178087])
    _close(out.chosen_rewards, [0.1 * math.log(0.5)])
    # ā = -1e-6 in fp32: 1 - e^ā loses ~6% to rounding, log(-expm1(ā)) does not
    near_certain = odds_ratio_loss(torch.tensor([-1e-6]), torch.tensor([-2.5])).log_odds.double()
    torch.testing.assert_close(near_certain, odds_ratio_loss(_t(-1e-6), _t(-2.5)).log_odds, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_orpo_parity_with_trl(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOTrainer

    gen = torch.Generator().manual_seed(7)
    chosen, rejected = (-0.05 - 2.95 * torch.rand(2, 8, generator=gen, dtype=torch.float64) ** 2).unbind()
    assert (chosen > -math.log(2)).any() and (chosen < -math.log(2)).any()  # both branches of log(1 - e^a)
    stand_in = SimpleNamespace(beta=0.2, accelerator=_ACCELERATOR)
    trl_terms, trl_chosen, trl_rejected, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(stand_in, chosen, rejected)
    ours = odds_ratio_loss(chosen, rejected, beta=0.2)
    _close(ours.losses, -trl_terms.double())  # TRL returns β log σ and subtracts its mean from the NLL
    _close(ours.chosen_rewards, trl_chosen.double())
    _close(ours.rejected_rewards, trl_rejected.double())
    _close(ours.log_odds.mean(), trl_log_odds.item())


def test_rloo_advantages_hand_worked():
    # group 0: 1, 2, 3, 6 (sum 12): baselines 11/3, 10/3, 3, 2 -> -8/3, -4/3, 0, 4
    # group 1: 4, NaN, 5, 5 (three scored, sum 14): baselines 5, -, 4.5, 4.5 -> -1, 0 (unscored), 0.5, 0.5
    adv, zero_var = rloo_advantages(_t(1, 2, 3, 6, 4, math.nan, 5, 5), group_size=4)
    _close(adv, [-8 / 3, -4 / 3, 0, 4, -1, 0, 0.5, 0.5])
    assert zero_var.tolist() == [False, False]
    # a KL of 10 at β = 0.1 takes 1 from the first reward: 0, 2, 3, 6 -> baselines 11/3, 3, 8/3, 5/3
    _close(rloo_advantages(_t(1, 2, 3, 6), 4, kl=_t(10, 0, 0, 0), beta=0.1)[0], [-11 / 3, -1, 1 / 3, 13 / 3])
    # equal scored rewards carry no signal; a lone scored completion has no baseline
    adv, zero_var = rloo_advantages(_t(5, 5, math.nan, 7, math.nan, math.nan), group_size=3)
    _close(adv, [0, 0, 0, 0, 0, 0])
    assert zero_var.tolist() == [True, True]


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_parity_with_trl(monkeypatch, beta, normalize):
    import trl.trainer.rloo_trainer as rloo_module

    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(1, 7, (12,), generator=gen).tolist()
    old = -torch.rand(12, max(lengths), generator=gen, dtype=torch.float64) * 2  # padding is filled, so must be masked
    ref = old + 0.5 * torch.randn(12, max(lengths), generator=gen, dtype=torch.float64)
    rewards = torch.randn(12, generator=gen, dtype=torch.float64)
    rewards[[5, 9, 10, 11]] = math.nan  # one unscored in group 1; group 2 has a single scored completion

    # TRL 1.16 RLOOTrainer._generate_and_score_completions, with generation, scoring and forward passes stubbed
    monkeypatch.setattr(rloo_module, "gather", lambda t: t)
    monkeypatch.setattr(rloo_module, "gather_object", lambda x: x)
    policy, reference = torch.nn.Module(), torch.nn.Module()
    policy.is_gradient_checkpointing = False
    trainer = _stand_in(rloo_module.RLOOTrainer, model=policy, ref_model=reference, accelerator=_ACCELERATOR)
    trainer.__dict__.update(beta=beta, normalize_advantages=normalize, num_generations=4, reward_func_names=["r"])
    trainer.__dict__.update(reward_weights=torch.ones(1), reward_clip_range=None, mask_truncated_completions=False)
    trainer.__dict__.update(pad_to_multiple_of=None, log_multimodal=False, _pending_extra_logs={}, _pending_metrics={})
    trainer.args = SimpleNamespace(per_device_train_batch_size=12, gradient_checkpointing_kwargs=None)
    trainer._tokenizer, trainer._calculate_rewards = SimpleNamespace(pad_token_id=0), lambda *_: rewards[:, None]
    trainer._logs = {"prompt": [], "completion": [], "advantages": []}
    trainer._logs.update(rewards=defaultdict(list), extra=defaultdict(list))
    trainer._generate = lambda prompts: ([[1, 2]] * 12, [[3] * n for n in lengths], ["c"] * 12)
    trainer._get_per_token_logps_and_entropies = lambda model, *_, **__: (old if model is policy else ref, None, None)
    trl_adv = trainer._generate_and_score_completions([{"prompt": "p"}] * 12)["advantages"]

    kl = sequence_kl(old, ref, _right_padded(lengths, max(lengths)))
    ours, _ = rloo_advantages(rewards, 4, kl=kl, beta=beta, normalize=normalize)
    _close(ours, trl_adv)
    assert (ours[8:] == 0).all() and (ours[:5] != 0).all()


def test_rloo_loss_parity_with_trl():
    from trl import RLOOTrainer

    gen = torch.Generator().manual_seed(13)
    mask = _right_padded(torch.randint(1, 7, (8,), generator=gen), 6)
    logps = -torch.rand(8, 6, generator=gen, dtype=torch.float64) * 2
    old = logps + 0.2 * torch.randn(8, 6, generator=gen, dtype=torch.float64)
    adv = torch.randn(8, generator=gen, dtype=torch.float64)
    trainer = _stand_in(RLOOTrainer, model=torch.nn.Module(), accelerator=_ACCELERATOR, aux_loss_enabled=False)
    trainer.__dict__.update(epsilon_low=0.2, epsilon_high=0.28)
    trainer._get_per_token_logps_and_entropies = lambda *_, **__: (logps, torch.zeros_like(logps), None)
    inputs = {"prompt_ids": torch.ones(8, 2, dtype=torch.long), "prompt_mask": torch.ones(8, 2), "advantages": adv}
    inputs.update(completion_ids=torch.ones_like(mask), completion_mask=mask, old_logps=(old * mask).sum(1))
    trl_loss = trainer._compute_loss(None, inputs).item()

    ours = rloo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    _close(ours.loss, trl_loss)
    clipped = trainer._metrics["train"]["clip_ratio/region_mean"][0]
    assert 0 < clipped < 1
    _close(ours.clip_fraction, clipped)
    parts = (slice(0, 3), slice(3, 8))  # micro-batches normalised by the whole batch sum to its loss
    halves = [rloo_loss(logps[s], old[s], adv[s], mask[s], epsilon_high=0.28, num_sequences=8).loss for s in parts]
    _close(sum(halves), trl_loss)


def test_gae_hand_worked():
    # Two completion tokens and one padding slot; k1 KL (logp - ref) 0.2, -0.1; β = 0.5 -> rewards -0.1, 0.05;
    # the score 1 lands on position 2, the slot after EOS, whose value 0.3 is kept. γ = 1, λ = 0.5, V = .5, .4, .3:
    #   δ2 = 1 + 0 - 0.3 = 0.7                 A2 = 0.7
    #   δ1 = 0.05 + 0.3 - 0.4 = -0.05         A1 = -0.05 + 0.5·0.7 = 0.3
    #   δ0 = -0.1 + 0.4 - 0.5 = -0.2          A0 = -0.2 + 0.5·0.3 = -0.05
    # returns A + V = 0.45, 0.7, 1.0. Whitening A0, A1 (mean 0.125, unbiased var 0.06125) gives ∓0.175/sqrt(0.06125
    # + 1e-8) = ∓0.707106723463552; the padding slot's advantage is 0.
    logps, ref, values = _t(-1.0, -2.0, -3.0)[None], _t(-1.2, -1.9, -0.5)[None], _t(0.5, 0.4, 0.3)[None]
    out = ppo_rollout(logps, ref, values, _t(1.0), _right_padded([2], 3), kl_coef=0.5, gamma=1.0, lam=0.5)
    _close(out.rewards, [[-0.1, 0.05, 1.0]])
    _close(out.returns, [[0.45, 0.7, 1.0]])
    _close(out.advantages, [[-0.707106723463552, 0.707106723463552, 0.0]])
    _close(out.kl, [[0.2, -0.1, 0.0]])


def _closed_form_rollout(logps, ref, values, scores, lengths, kl_coef, k3, gamma, lam):
    """TRL's conventions stated directly: A_t = Σ_l (γλ)^l δ_{t+l}, as a matrix product instead of a recursion."""
    pos = torch.arange(logps.shape[1])
    tokens, kept = pos < lengths[:, None], pos <= lengths[:, None]
    x = torch.where(tokens, ref - logps, 0.0)
    kl = torch.exp(x) - 1 - x if k3 else -x
    rewards = -kl_coef * kl + torch.where(pos == lengths.clamp(max=len(pos) - 1)[:, None], scores[:, None], 0.0)
    v = torch.where(kept, values, 0.0)
    deltas = rewards + gamma * torch.cat([v[:, 1:], torch.zeros(len(v), 1, dtype=v.dtype)], 1) - v
    steps = (pos[None, :] - pos[:, None]).double()  # [t, t + l] -> l
    adv = deltas @ torch.where(steps >= 0, (gamma * lam) ** steps.clamp(min=0), 0.0).T
    mean, n = adv[tokens].mean(), tokens.sum()
    std = ((adv[tokens] - mean).pow(2).sum() / (n - 1) + 1e-8).sqrt()
    return torch.where(tokens, (adv - mean) / std, 0.0), adv + v, kl


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_ppo_rollout_matches_closed_form(kl_estimator):
    gen = torch.Generator().manual_seed(17)
    lengths = torch.tensor([7, 6, 0, 3, 1, 5])  # full row (score on the last token), one short of full, empty
    logps = -torch.rand(6, 7, generator=gen, dtype=torch.float64) * 3
    ref = logps + 0.5 * torch.randn(6, 7, generator=gen, dtype=torch.float64)
    values, scores = torch.randn(6, 7, generator=gen, dtype=torch.float64), _t(1.5, -0.3, 2.0, 0.7, -1.1, 0.2)
    kwargs = {"kl_coef": 0.3, "gamma": 0.9, "lam": 0.8}
    ours = ppo_rollout(logps, ref, values, scores, _right_padded(lengths, 7), kl_estimator=kl_estimator, **kwargs)
    adv, returns, kl = _closed_form_rollout(logps, ref, values, scores, lengths, k3=kl_estimator == "k3", **kwargs)
    _close(ours.advantages, adv)
    _close(ours.returns, returns)
    _close(ours.kl, kl)


def test_ppo_loss_hand_worked():
    # Tokens 0, 1 are the completion, 2 the slot after EOS, 3 padding (garbage that must not count); ε = ε_v = 0.2.
    # policy: ρ0 = 1.5, A = 1 -> max(-1.5, -1.2) = -1.2 (clipped); ρ1 = 0.9, A = -1 -> 0.9 either way
    #   policy loss (-1.2 + 0.9) / 2 = -0.15, clip fraction 1/2
    # value, old values 0, returns 1, 0, -1: V0 = 0.5 -> max(0.25, (0.2 - 1)² = 0.64) = 0.64 (clipped);
    #   V1 = 0.1 -> 0.01; V2 = -0.3 -> max(0.49, (-0.2 + 1)² = 0.64) = 0.64 (clipped)
    #   value loss ½ (0.64 + 0.01 + 0.64) / 3 = 0.215, clip fraction 2/3; loss -0.15 + 0.1 · 0.215 = -0.1285
    # approx KL ½ (log² 1.5 + log² 0.9) / 4 = 0.02193784901910606: TRL's mean runs over all four positions
    logps, values = torch.log(_t(1.5, 0.9, 1.0, 3.0))[None], _t(0.5, 0.1, -0.3, 9.0)[None]
    adv, returns = _t(1.0, -1.0, 0.0, 5.0)[None], _t(1.0, 0.0, -1.0, 0.0)[None]
    out = ppo_loss(logps, torch.zeros(1, 4), values, torch.zeros(1, 4), adv, returns, _right_padded([2], 4))
    _close(out.policy_loss, -0.15)
    _close(out.value_loss, 0.215)
    _close(out.loss, -0.1285)
    _close(out.policy_clip_fraction, 0.5)
    _close(out.value_clip_fraction, 2 / 3)
    _close(out.approx_kl, 0.02193784901910606)


_ZEROS = [torch.zeros(1, 3)] * 3


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: kto_loss(_t(-1), _t(-1), torch.tensor([True]), loss_type="bco"), "unknown loss_type 'bco'"),
        (lambda: kto_loss(_t(-1), _t(-1), torch.tensor([True])), "'kto' needs policy_kl_logps and ref_kl_logps"),
        (lambda: odds_ratio_loss(_t(-1), _t(-2), beta=0.0), "beta must be positive"),
        (lambda: rloo_advantages(_t(1, 2, 3), 2), "group_size must be >= 1 and divide the 3 rewards"),
        (lambda: rloo_advantages(_t(1, 2), 2, beta=0.1), "kl is required"),
        (lambda: ppo_rollout(*_ZEROS, _t(1), torch.tensor([[1, 0, 1]])), "must be right-padded"),
        (lambda: ppo_rollout(*_ZEROS, _t(1), torch.ones(1, 3), kl_estimator="k2"), "unknown kl_estimator 'k2'"),
        (lambda: ppo_rollout(*_ZEROS, _t(1), _right_padded([1], 3)), "at least 2 masked entries, got 1"),
    ],
)
def test_argument_checks(call, match):
    with pytest.raises(ValueError, match=match):
        call()
