"""Distillation divergences: parity with TRL's GKD loss, hand-worked numbers, properties, top-k, gradients, errors.

The parity test calls TRL's own ``GKDTrainer.generalized_jsd_loss`` (a static method, so no trainer is built) on the
same logits; nothing of its formula is copied here.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmpost.losses.distill import DIVERGENCES, TopK, token_divergence, top_k

ATOL = 1e-6


def _t(*values: float | list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _logits(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------- parity with TRL


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_parity_with_trl_gkd(monkeypatch, beta, temperature):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    student, teacher = _logits(0, 3, 6, 11), _logits(1, 3, 6, 11)  # [B, T, V]
    labels = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = labels[1, :4] = labels[2, :1] = -100  # prompt positions of varied lengths
    mask = labels != -100

    kwargs = {"labels": labels, "beta": beta, "temperature": temperature}
    trl_elementwise = GKDTrainer.generalized_jsd_loss(student, teacher, reduction="none", **kwargs)  # [M, V]
    trl_batchmean = GKDTrainer.generalized_jsd_loss(student, teacher, reduction="batchmean", **kwargs)

    ours = token_divergence(student[mask], teacher[mask], "jsd", beta=beta, temperature=temperature)  # [M]
    assert ours.dtype == torch.float64 and ours.shape == (mask.sum().item(),)
    torch.testing.assert_close(ours, trl_elementwise.sum(dim=-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.mean(), trl_batchmean, atol=ATOL, rtol=0)
    # TRL's endpoints: β = 0 is KL(teacher || student), β = 1 is KL(student || teacher)
    endpoint = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta)
    if endpoint is not None:
        kl = token_divergence(student[mask], teacher[mask], endpoint, temperature=temperature)
        torch.testing.assert_close(kl, trl_elementwise.sum(dim=-1), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- hand-worked

# teacher p_t = (1/2, 1/2); student p_s = (3/4, 1/4)
# forward KL(p_t || p_s) = ½ ln(½ / ¾) + ½ ln(½ / ¼) = ½ ln(4/3) = 0.14384103622589042
# reverse KL(p_s || p_t) = ¾ ln(¾ / ½) + ¼ ln(¼ / ½) = ¾ ln(3/2) - ¼ ln 2 = 0.13081203594113697
# JSD, β = ½: m = (5/8, 3/8); KL(p_t || m) = ½ ln(16/15) = 0.03226926056878557,
#   KL(p_s || m) = ¾ ln(6/5) + ¼ ln(2/3) = 0.03537489056842484; ½ (sum) = 0.033822075568605205
# JSD, β = 0 and 1: the forward and reverse KL above
HAND_WORKED = [
    ("forward_kl", 0.5, 0.14384103622589042),
    ("reverse_kl", 0.5, 0.13081203594113697),
    ("jsd", 0.5, 0.033822075568605205),
    ("jsd", 0.0, 0.14384103622589042),
    ("jsd", 1.0, 0.13081203594113697),
]


@pytest.mark.parametrize(("divergence", "beta", "expected"), HAND_WORKED)
def test_two_token_vocab_hand_worked(divergence, beta, expected):
    teacher = _t([0.0, 0.0], [5.0, 5.0])  # softmax (½, ½) in both rows
    student = _t([math.log(3.0), 0.0], [1.0 + math.log(3.0), 1.0])  # (¾, ¼): shift invariance
    out = token_divergence(student, teacher, divergence, beta=beta)
    torch.testing.assert_close(out, _t(expected, expected), atol=1e-12, rtol=0)
    # T = 2 halves the logits: student logits 2 ln 3, 0 at T = 2 are ln 3, 0 at T = 1
    # and no T² factor (GKD's convention), so the value is unchanged
    hot = token_divergence(2 * student, 2 * teacher, divergence, beta=beta, temperature=2.0)
    torch.testing.assert_close(hot, _t(expected, expected), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_on_equal_distributions_and_nonnegative(divergence):
    logits = _logits(3, 8, 13)
    same = token_divergence(logits, logits + 4.0, divergence, beta=0.3)  # a constant shift is the same distribution
    torch.testing.assert_close(same, torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
    for beta in (0.0, 0.3, 1.0):
        out = token_divergence(logits, _logits(4, 8, 13), divergence, beta=beta)
        assert (out > 0).all()


# β weights the teacher, so swapping the sides turns JSD_β into JSD_(1-β) and forward KL into reverse KL
@pytest.mark.parametrize(
    ("ab", "ba"),
    [(("jsd", 0.5), ("jsd", 0.5)), (("jsd", 0.2), ("jsd", 0.8)), (("forward_kl", 0.5), ("reverse_kl", 0.5))],
)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_swapping_student_and_teacher(ab, ba, temperature):
    a, b = _logits(5, 8, 13), _logits(6, 8, 13)
    torch.testing.assert_close(token_divergence(a, b, *ab, temperature), token_divergence(b, a, *ba, temperature))
    if ab != ba:
        assert not torch.allclose(token_divergence(a, b, *ab, temperature), token_divergence(b, a, *ab, temperature))


def test_jsd_vanishes_near_the_endpoints_that_are_kls():
    # the documented jump: JSD_β ≈ β KL(p_t || p_s) as β -> 0 and (1 - β) KL(p_s || p_t) as β -> 1
    student, teacher = _logits(7, 5, 9, scale=1.0), _logits(8, 5, 9, scale=1.0)
    eps = 1e-6
    forward = token_divergence(student, teacher, "forward_kl")
    reverse = token_divergence(student, teacher, "reverse_kl")
    torch.testing.assert_close(token_divergence(student, teacher, "jsd", beta=eps) / eps, forward, rtol=1e-3, atol=0)
    torch.testing.assert_close(
        token_divergence(student, teacher, "jsd", beta=1 - eps) / eps, reverse, rtol=1e-3, atol=0
    )


# ----------------------------------------------------------------------------- top-k teacher


def test_top_k_returns_sorted_largest_logprobs():
    logits = _logits(9, 4, 10)
    out = top_k(logits, 3)
    full = torch.log_softmax(logits, dim=-1)
    expected, _ = full.sort(dim=-1, descending=True)
    torch.testing.assert_close(out.logprobs, expected[:, :3], atol=0, rtol=0)
    torch.testing.assert_close(out.logprobs, full.gather(-1, out.indices), atol=0, rtol=0)
    assert out.indices.dtype == torch.long and (out.logprobs[:, :-1] >= out.logprobs[:, 1:]).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_top_k_with_full_vocab_equals_full(divergence, temperature):
    student, teacher = _logits(10, 6, 12), _logits(11, 6, 12)
    full = token_divergence(student, teacher, divergence, beta=0.3, temperature=temperature)
    topk = token_divergence(student, top_k(teacher, 12), divergence, beta=0.3, temperature=temperature)
    torch.testing.assert_close(topk, full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_top_k_renormalises_both_sides_over_the_teacher_ids(divergence):
    student, teacher = _logits(12, 6, 20), _logits(13, 6, 20)
    k, temperature = 4, 1.5
    teacher_top = top_k(teacher, k)
    out = token_divergence(student, teacher_top, divergence, beta=0.4, temperature=temperature)
    assert torch.isfinite(out).all() and (out >= 0).all()
    # the same as the full divergence between the logits sliced to those ids
    ids = teacher_top.indices
    sliced = token_divergence(student.gather(-1, ids), teacher.gather(-1, ids), divergence, 0.4, temperature)
    torch.testing.assert_close(out, sliced, atol=1e-12, rtol=0)
    assert not torch.allclose(out, token_divergence(student, teacher, divergence, 0.4, temperature))


# ----------------------------------------------------------------------------- gradients and extremes


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradient_reaches_the_student_only(divergence):
    student = _logits(14, 5, 7).requires_grad_()
    teacher = _logits(15, 5, 7).requires_grad_()
    token_divergence(student, teacher, divergence, beta=0.3).sum().backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_finite_values_and_gradients_at_extreme_logits(dtype, temperature):
    gen = torch.Generator().manual_seed(16)
    signs = torch.randint(0, 2, (2, 6, 32), generator=gen) * 2.0 - 1.0
    student_base, teacher = 50.0 * signs[0], 50.0 * signs[1]  # ±50: most probabilities underflow
    teacher[:, 0] = 50.0
    student_base[:, 0] = -50.0  # the teacher's mode is where the student has (almost) no mass
    for divergence in DIVERGENCES:
        for beta in (0.0, 0.3, 1.0):
            for teacher_in in (teacher.to(dtype), top_k(teacher.to(dtype), 5)):
                student = student_base.to(dtype).requires_grad_()
                out = token_divergence(student, teacher_in, divergence, beta=beta, temperature=temperature)
                assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out >= 0).all()
                out.sum().backward()
                assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("divergence", "beta"), [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0)])
def test_minus_inf_teacher_logits_are_finite(divergence, beta):
    # masked-out vocabulary: zero teacher mass contributes nothing (reverse KL there is genuinely infinite)
    teacher = _logits(17, 3, 6)
    teacher[:, -2:] = -math.inf
    student = _logits(18, 3, 6).requires_grad_()
    out = token_divergence(student, teacher, divergence, beta=beta)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(student.grad).all()


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"divergence": "kl"}, "unknown divergence 'kl'; valid: forward_kl, reverse_kl, jsd"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\], got -0.1"),
        ({"beta": 1.5}, r"beta must be in \[0, 1\], got 1.5"),
        ({"temperature": 0.0}, "temperature must be positive, got 0.0"),
        ({"temperature": -1.0}, "temperature must be positive"),
    ],
)
def test_bad_arguments(kwargs, match):
    logits = _logits(19, 2, 5)
    with pytest.raises(ValueError, match=match):
        token_divergence(logits, logits, **kwargs)


def test_shape_mismatches():
    student = _logits(20, 2, 5)
    with pytest.raises(ValueError, match="vocab sizes differ: student 5, teacher 7"):
        token_divergence(student, _logits(21, 2, 7))
    with pytest.raises(ValueError, match=r"student logits \(2, 5\) and teacher logits \(3, 5\) differ"):
        token_divergence(student, _logits(21, 3, 5))
    with pytest.raises(ValueError, match="N matching the student logits"):
        token_divergence(student, top_k(_logits(22, 3, 5), 2))
    bad = TopK(logprobs=torch.zeros(2, 6), indices=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="k=6 ids but the student vocab size is 5"):
        token_divergence(student, bad)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        top_k(student, 0)
