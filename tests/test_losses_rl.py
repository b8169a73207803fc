"""Preference (DPO family) and GRPO losses: hand-worked numbers, parity with TRL's trainers, argument checks.

The parity tests run TRL's own loss code, not a copy of it. A trainer object is made with ``object.__new__`` (so no
model, dataset or accelerator is built) and given only the attributes its loss method reads; the model forward is a
stub returning prescribed per-token log-probabilities, so both implementations see the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmpost.losses.dpo import preference_loss
from mmpost.losses.grpo import AGGREGATIONS, group_advantages, policy_loss

pytest.importorskip("trl")

ATOL = 1e-6


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- DPO family, hand-worked


def test_sigmoid_hand_worked():
    # chosen log-ratio -10 - (-11) = 1, rejected -12 - (-12) = 0, so Δ = 1; β = 0.5:
    # -log σ(0.5) = log(1 + e^-0.5) = 0.4740769841801067; rewards β(π - ref) = 0.5 and 0
    out = preference_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-12.0), _t(3), _t(4), loss_type="sigmoid", beta=0.5)
    torch.testing.assert_close(out.losses, _t(0.4740769841801067))
    torch.testing.assert_close(out.chosen_rewards, _t(0.5))
    torch.testing.assert_close(out.rejected_rewards, _t(0.0))


def test_cdpo_hand_worked():
    # cDPO, ε = 0.1, βΔ = 0.5: 0.9·(-log σ(0.5)) + 0.1·(-log σ(-0.5)); since -log σ(-x) = -log σ(x) + x this is
    # -log σ(0.5) + 0.1·0.5 = 0.4740769841801067 + 0.05 = 0.5240769841801067
    out = preference_loss(
        _t(-10.0), _t(-12.0), _t(-11.0), _t(-12.0), _t(3), _t(4), loss_type="sigmoid", beta=0.5, label_smoothing=0.1
    )
    torch.testing.assert_close(out.losses, _t(0.5240769841801067))


def test_ipo_hand_worked():
    # chosen log-ratio 1 over 2 tokens -> 0.5; rejected log-ratio -1 over 4 tokens -> -0.25; Δ = 0.75
    # β = 0.5: 1/(2β) = 1, loss (0.75 - 1)² = 0.0625. Rewards stay on summed log-ratios: 0.5·1, 0.5·(-1)
    out = preference_loss(_t(-5.0), _t(-9.0), _t(-6.0), _t(-8.0), _t(2), _t(4), loss_type="ipo", beta=0.5)
    torch.testing.assert_close(out.losses, _t(0.0625))
    torch.testing.assert_close(out.chosen_rewards, _t(0.5))
    torch.testing.assert_close(out.rejected_rewards, _t(-0.5))


def test_hinge_hand_worked():
    # both pairs have Δ = 1 (summed log-ratios, lengths do not matter); β = 0.5: relu(1 - 0.5) = 0.5;
    # β = 2: relu(1 - 2) = 0
    args = (_t(-10.0, -3.0), _t(-12.0, -5.0), _t(-11.0, -4.0), _t(-12.0, -5.0), _t(3, 1), _t(4, 7))
    torch.testing.assert_close(preference_loss(*args, loss_type="hinge", beta=0.5).losses, _t(0.5, 0.5))
    torch.testing.assert_close(preference_loss(*args, loss_type="hinge", beta=2.0).losses, _t(0.0, 0.0))


def test_simpo_hand_worked():
    # -4 over 2 tokens -> -2; -9 over 3 tokens -> -3; Δ = 1; β = 2, γ = 0.5: βΔ - γ = 1.5
    # -log σ(1.5) = log(1 + e^-1.5) = 0.2014132779827524; rewards β·π/|len| = -4 and -6
    out = preference_loss(_t(-4.0), _t(-9.0), None, None, _t(2), _t(3), loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    torch.testing.assert_close(out.losses, _t(0.2014132779827524))
    torch.testing.assert_close(out.chosen_rewards, _t(-4.0))
    torch.testing.assert_close(out.rejected_rewards, _t(-6.0))
    # with ε = 0.2: -log σ(1.5) + 0.2·1.5 = 0.5014132779827524
    smoothed = preference_loss(
        _t(-4.0), _t(-9.0), None, None, _t(2), _t(3), loss_type="simpo", beta=2.0, label_smoothing=0.2
    )
    torch.testing.assert_close(smoothed.losses, _t(0.5014132779827524))


def test_preference_loss_fp32_and_grad():
    policy_c = torch.tensor([-10.0], dtype=torch.bfloat16, requires_grad=True)
    out = preference_loss(policy_c, _t(-12.0).bfloat16(), _t(-11.0), _t(-12.0), _t(3), _t(4), beta=0.5)
    assert out.losses.dtype == torch.float32 and not out.chosen_rewards.requires_grad
    out.losses.sum().backward()
    # d/dπc of -log σ(βΔ) = -β σ(-βΔ) = -0.5 σ(-0.5) = -0.5·0.3775406687981454
    torch.testing.assert_close(policy_c.grad.float(), torch.tensor([-0.1887703343990727]), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "kto"}, "unknown loss_type 'kto'; valid: sigmoid, ipo, hinge, simpo"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "applies to 'sigmoid' and 'simpo' only"),
        ({"beta": 0.0}, "beta must be positive"),
        ({"ref": None}, "'sigmoid' needs ref_chosen and ref_rejected"),
        ({"ref": None, "loss_type": "hinge"}, "'hinge' needs ref_chosen and ref_rejected"),
    ],
)
def test_preference_loss_errors(kwargs, match):
    ref = kwargs.pop("ref", _t(-1.0))
    with pytest.raises(ValueError, match=match):
        preference_loss(_t(-1.0), _t(-2.0), ref, ref, _t(1), _t(1), **kwargs)


# ----------------------------------------------------------------------------- GRPO, hand-worked


def test_group_advantages_hand_worked():
    # group 0: rewards 0, 1, 2 -> mean 1, unbiased std sqrt((1 + 0 + 1) / 2) = 1 (a biased std would be 0.816):
    #   advantages ±1 / (1 + 1e-4) = ±0.9999000099990001 and 0
    # group 1: 5, 5, 5 -> zero variance, advantages 0
    adv, zero_var = group_advantages(_t(0.0, 1.0, 2.0, 5.0, 5.0, 5.0), group_size=3)
    torch.testing.assert_close(adv, _t(-0.9999000099990001, 0.0, 0.9999000099990001, 0.0, 0.0, 0.0))
    assert zero_var.tolist() == [False, True]
    # scale=False (Dr. GRPO) only subtracts the mean
    adv, _ = group_advantages(_t(0.0, 1.0, 2.0, 5.0, 5.0, 5.0), group_size=3, scale=False)
    torch.testing.assert_close(adv, _t(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0))
    # a group of one has no spread: advantage 0, not NaN
    adv, zero_var = group_advantages(_t(3.0, 4.0), group_size=1)
    torch.testing.assert_close(adv, _t(0.0, 0.0))
    assert zero_var.tolist() == [True, True]


def test_group_advantages_std_matches_trl_nanstd():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([0.3, 1.0, 0.0, 0.7, 2.0, -1.0, 0.5, 0.5], dtype=torch.float64)
    adv, _ = group_advantages(rewards, group_size=4)
    grouped = rewards.view(2, 4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    expected = (rewards - grouped.mean(1).repeat_interleave(4)) / (std + 1e-4)
    torch.testing.assert_close(adv, expected, atol=ATOL, rtol=0)


def _clip_case():
    # seq 0, A = +1, ratios 1.5, 0.5, 1.0; seq 1, A = -1, ratios 0.5, 1.5 and a padding token
    logps = torch.log(_t(1.5, 0.5, 1.0, 0.5, 1.5, 1.0)).view(2, 3)
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logps, old, _t(1.0, -1.0), mask


def test_policy_loss_clipping_hand_worked():
    logps, old, adv, mask = _clip_case()
    kwargs = {"epsilon_low": 0.2, "epsilon_high": 0.28}
    # per token -min(ρA, clip(ρ, 0.8, 1.28)A):
    #   seq 0 (A=+1): ρ=1.5 -> -min(1.5, 1.28) = -1.28 (clipped, active); ρ=0.5 -> -min(0.5, 0.8) = -0.5; ρ=1 -> -1
    #   seq 1 (A=-1): ρ=0.5 -> -min(-0.5, -0.8) = 0.8 (clipped, active); ρ=1.5 -> -min(-1.5, -1.28) = 1.5
    # grpo: (-2.78/3 + 2.3/2) / 2 = 0.11166666...; dapo: (-2.78 + 2.3) / 5 = -0.096; dr_grpo, L=4: -0.48 / 8 = -0.06
    out = policy_loss(logps, old, adv, mask, **kwargs)
    torch.testing.assert_close(out.loss, torch.tensor((-2.78 / 3 + 2.3 / 2) / 2, dtype=torch.float64))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(0.4, dtype=torch.float64))  # 2 of 5 tokens
    torch.testing.assert_close(out.kl, torch.tensor(0.0, dtype=torch.float64))
    dapo = policy_loss(logps, old, adv, mask, aggregation="dapo", **kwargs)
    torch.testing.assert_close(dapo.loss, torch.tensor(-0.096, dtype=torch.float64))
    dr = policy_loss(logps, old, adv, mask, aggregation="dr_grpo", max_completion_length=4, **kwargs)
    torch.testing.assert_close(dr.loss, torch.tensor(-0.06, dtype=torch.float64))


def test_policy_loss_k3_kl_hand_worked():
    # A = 0 and ρ = 1, so only β·k3 is left. k3(x) = e^x - x - 1 with x = ref - logp:
    #   x = log 2 -> 2 - 0.6931471805599453 - 1 = 0.3068528194400546
    #   x = -log 2 -> 0.5 + 0.6931471805599453 - 1 = 0.1931471805599454; mean over the 2 tokens 0.25
    logps = torch.zeros(1, 3, dtype=torch.float64)
    ref = torch.log(_t(2.0, 0.5, 7.0)).view(1, 3)  # the third token is padding
    mask = torch.tensor([[1, 1, 0]])
    out = policy_loss(logps, logps, _t(0.0), mask, beta=0.1, ref_logps=ref)
    torch.testing.assert_close(out.kl, torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(out.loss, torch.tensor(0.025, dtype=torch.float64))  # 0.1 · 0.25
    assert out.clip_fraction.item() == 0.0


def _random_rollout(seed: int, batch: int = 6, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    # off-policy drift of ~±0.3 nat puts ratios on both sides of both clip bounds
    old = logps + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = logps + 0.5 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).long()
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_sum_to_whole_batch(aggregation):
    logps, old, ref, adv, mask = _random_rollout(0, batch=6)
    kwargs = {"beta": 0.04, "ref_logps": ref, "aggregation": aggregation, "max_completion_length": 9}
    kwargs.update(epsilon_low=0.2, epsilon_high=0.28)
    whole = policy_loss(logps, old, adv, mask, **kwargs).loss
    totals = {"num_sequences": 6, "num_tokens": mask.sum().item()}
    micro = sum(
        policy_loss(logps[s], old[s], adv[s], mask[s], **{**kwargs, "ref_logps": ref[s]}, **totals).loss
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    )
    torch.testing.assert_close(micro, whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aggregation": "bnpo"}, "unknown aggregation 'bnpo'; valid: grpo, dapo, dr_grpo"),
        ({"beta": 0.1}, "ref_logps is required"),
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"aggregation": "dr_grpo"}, "max_completion_length, which is required"),
    ],
)
def test_policy_loss_errors(kwargs, match):
    logps, old, adv, mask = _clip_case()
    with pytest.raises(ValueError, match=match):
        policy_loss(logps, old, adv, mask, **kwargs)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size must be >= 1 and divide the 5 rewards"):
        group_advantages(torch.zeros(5), group_size=2)


# ----------------------------------------------------------------------------- parity with TRL

_ACCELERATOR = SimpleNamespace(
    device=torch.device("cpu"),
    num_processes=1,
    gather=lambda t: t,
    gather_for_metrics=lambda t: t,
    reduce=lambda t, reduction="sum": t,
)


class _PrescribedLM(torch.nn.Module):
    """A causal LM with TRL's fused LM head, reduced to its output: the log-probability of each next token.

    ``per_token_logps[b, t]`` is the log-probability of token ``t + 1`` of row ``b``; like TRL's fused head it is
    zeroed where the label is -100.
    """

    is_gradient_checkpointing = False

    def __init__(self, per_token_logps: torch.Tensor):
        super().__init__()
        self.per_token_logps = per_token_logps  # [2N, L-1]

    def forward(self, input_ids, attention_mask, use_cache, labels, fused_lm_head):
        from trl.trainer.utils import FusedCausalLMOutput

        assert fused_lm_head and input_ids.shape[1] == self.per_token_logps.shape[1] + 1
        valid = labels[:, 1:] != -100  # [2N, L-1]
        zeros = torch.zeros_like(self.per_token_logps)
        return FusedCausalLMOutput(
            log_probs=self.per_token_logps.masked_fill(~valid, 0.0),
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(valid),
            label_mask=valid,
        )


def _preference_batch(seed: int, pairs: int = 4, prompt: int = 2, length: int = 9):
    """Rows 0..N-1 chosen, N..2N-1 rejected (TRL's layout); completions of varied lengths after a 2-token prompt."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    lengths = torch.randint(1, length - prompt + 1, (rows,), generator=gen)
    pos = torch.arange(length)
    completion_mask = ((pos >= prompt) & (pos < prompt + lengths[:, None])).long()  # [2N, L]
    attention_mask = (pos < prompt + lengths[:, None]).long()
    input_ids = torch.randint(0, 50, (rows, length), generator=gen)
    policy = -torch.rand(rows, length - 1, generator=gen, dtype=torch.float64) * 2  # [2N, L-1]
    ref = policy + 0.8 * torch.randn(rows, length - 1, generator=gen, dtype=torch.float64)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    return inputs, policy, ref


def _trl_dpo_loss(loss_type: str, beta: float, inputs, policy, ref):
    """TRL 1.16 ``DPOTrainer._compute_loss`` with a policy and a reference model that return prescribed log-probs."""
    from trl import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    model = _PrescribedLM(policy)
    trainer.__dict__.update(
        model=model,
        ref_model=_PrescribedLM(ref),
        accelerator=_ACCELERATOR,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _sequence_sums(per_token: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2N, L-1] next-token log-probs -> summed log-prob of each chosen and rejected completion, [N] each."""
    sums = (per_token * completion_mask[:, 1:]).sum(dim=1)  # [2N]
    return sums.chunk(2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_parity_with_trl(loss_type, beta):
    inputs, policy, ref = _preference_batch(seed=1)
    trl_loss, metrics = _trl_dpo_loss(loss_type, beta, inputs, policy, ref)

    pi_c, pi_r = _sequence_sums(policy, inputs["completion_mask"])
    ref_c, ref_r = _sequence_sums(ref, inputs["completion_mask"])
    len_c, len_r = inputs["completion_mask"].sum(dim=1).chunk(2)
    ours = preference_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, loss_type=loss_type, beta=beta)

    if loss_type == "hinge" and beta == 0.5:  # the pairs reach both sides of the hinge
        assert (ours.losses == 0).any() and (ours.losses > 0).any()
    assert trl_loss.dtype == torch.float64
    torch.testing.assert_close(ours.losses.mean(), trl_loss, atol=ATOL, rtol=0)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=ATOL)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=ATOL)
    # TRL reports only batch means, so each pair is also run alone
    pairs = len(pi_c)
    for i in range(pairs):
        rows = torch.tensor([i, pairs + i])
        pair_loss, _ = _trl_dpo_loss(loss_type, beta, {k: v[rows] for k, v in inputs.items()}, policy[rows], ref[rows])
        torch.testing.assert_close(ours.losses[i], pair_loss, atol=ATOL, rtol=0)


def _trl_cpo(loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float = 0.5):
    from trl.experimental.cpo import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(
        accelerator=_ACCELERATOR,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        alpha=0.0,  # AlphaPO reward shaping off
    )
    return trainer


def _logits_for(per_token: torch.Tensor) -> torch.Tensor:
    """[R, L-1] next-token log-probs -> [R, L, 2] logits whose log-softmax at label 1 is exactly those log-probs."""
    logits = torch.zeros(*per_token.shape[:1], per_token.shape[1] + 1, 2, dtype=per_token.dtype)
    logits[:, :-1, 1] = per_token
    logits[:, :-1, 0] = torch.log(-torch.expm1(per_token))  # the rest of the probability mass
    return logits


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_parity_with_trl_cpo(monkeypatch, label_smoothing):
    # SimPO lives in TRL's experimental CPO trainer: CPOTrainer.get_batch_logps length-normalises (static, TRL's code)
    # and CPOTrainer.cpo_loss takes the loss from there.
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOTrainer

    inputs, policy, _ = _preference_batch(seed=2)
    labels = torch.where(inputs["completion_mask"].bool(), 1, -100)  # every completion token is label 1
    avg = CPOTrainer.get_batch_logps(_logits_for(policy), labels, average_log_prob=True)
    trainer = _trl_cpo("simpo", beta=2.0, label_smoothing=label_smoothing, simpo_gamma=0.7)
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(*avg.chunk(2))

    pi_c, pi_r = _sequence_sums(policy, inputs["completion_mask"])
    len_c, len_r = inputs["completion_mask"].sum(dim=1).chunk(2)
    ours = preference_loss(
        pi_c,
        pi_r,
        None,
        None,
        len_c,
        len_r,
        loss_type="simpo",
        beta=2.0,
        label_smoothing=label_smoothing,
        simpo_gamma=0.7,
    )
    torch.testing.assert_close(ours.losses, trl_losses, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cdpo_formula_matches_trl_cpo_sigmoid(monkeypatch):
    # TRL's DPO `sigmoid` has no label smoothing, but CPO's `sigmoid` is the same smoothed logistic on
    # β(π_c - π_r): our cDPO with a zero reference must give it.
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    pi_c, pi_r = _t(-3.0, -7.5, -1.2), _t(-4.0, -6.0, -9.9)
    trl_losses, _, _ = _trl_cpo("sigmoid", beta=0.3, label_smoothing=0.15).cpo_loss(pi_c, pi_r)
    zero = torch.zeros(3, dtype=torch.float64)
    ours = preference_loss(pi_c, pi_r, zero, zero, _t(1, 1, 1), _t(1, 1, 1), beta=0.3, label_smoothing=0.15)
    torch.testing.assert_close(ours.losses, trl_losses, atol=ATOL, rtol=0)


def _trl_grpo(aggregation: str, beta: float, eps: tuple[float, float], logps: torch.Tensor, accumulation: int = 1):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` with its log-prob helper returning ``logps`` ([B, T]) and no entropy."""
    from trl import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)

    def prescribed_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == logps.shape[1]
        return logps, torch.zeros_like(logps), None

    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=prescribed_logps,
        model=torch.nn.Module(),  # only `.training` is read: True, so the train-mode normalisers apply
        accelerator=_ACCELERATOR,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation),
        loss_type=aggregation,
        beta=beta,
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=accumulation,
        max_completion_length=logps.shape[1] + 3,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    return trainer


def _grpo_inputs(old, ref, adv, mask, num_items_in_batch):
    batch = mask.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.ones_like(mask),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": torch.tensor(float(num_items_in_batch), dtype=torch.float64),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return inputs


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_parity_with_trl(aggregation, beta):
    logps, old, ref, adv, mask = _random_rollout(3)
    eps = (0.2, 0.28)  # DAPO's clip-higher: the two bounds must not be confused
    ref = ref if beta > 0 else None
    trainer = _trl_grpo(aggregation, beta, eps, logps)
    trl_loss = trainer._compute_loss(None, _grpo_inputs(old, ref, adv, mask, mask.sum().item()))
    metrics = trainer._metrics["train"]

    ours = policy_loss(
        logps,
        old,
        adv,
        mask,
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        beta=beta,
        ref_logps=ref,
        aggregation=aggregation,
        max_completion_length=logps.shape[1] + 3,
    )
    assert trl_loss.dtype == torch.float64
    torch.testing.assert_close(ours.loss, trl_loss, atol=ATOL, rtol=0)
    clipped = metrics["clip_ratio/region_mean"][0]
    assert 0 < clipped < 1 and metrics["clip_ratio/low_mean"][0] > 0 and metrics["clip_ratio/high_mean"][0] > 0
    assert ours.clip_fraction.item() == pytest.approx(clipped, abs=ATOL)
    assert ours.kl.item() == pytest.approx(metrics["kl"][0] if beta > 0 else 0.0, abs=ATOL)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_grpo_micro_batches_match_trl_accumulation(aggregation):
    # A generation batch of 6 in 2 micro-batches of 3, accumulated over 2 steps: TRL scales each micro-batch loss
    # for the accumulation; ours gets the whole batch's totals. Both must agree per micro-batch.
    logps, old, ref, adv, mask = _random_rollout(4, batch=6)
    eps, beta, total_tokens = (0.15, 0.3), 0.02, mask.sum().item()
    for s in (slice(0, 3), slice(3, 6)):
        trainer = _trl_grpo(aggregation, beta, eps, logps[s], accumulation=2)
        trainer.max_completion_length = 10
        trl_loss = trainer._compute_loss(None, _grpo_inputs(old[s], ref[s], adv[s], mask[s], total_tokens))
        ours = policy_loss(
            logps[s],
            old[s],
            adv[s],
            mask[s],
            epsilon_low=eps[0],
            epsilon_high=eps[1],
            beta=beta,
            ref_logps=ref[s],
            aggregation=aggregation,
            max_completion_length=10,
            num_sequences=6,
            num_tokens=total_tokens,
        )
        torch.testing.assert_close(ours.loss, trl_loss, atol=ATOL, rtol=0)
