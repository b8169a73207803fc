"""Weight quantization math: RTN against compressed-tensors, GPTQ against RTN and an unblocked reference, the
packing invariant, dead inputs, group-size checks and bf16."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from mmpost.model.quantized import WeightScheme
from mmpost.quant.methods import check_group_size, gptq, reconstruction_error, rtn

SCHEMES = [WeightScheme(bits, sym, group) for bits in (4, 8) for sym in (True, False) for group in (32, None)]
RANGES = {4: (-8, 7), 8: (-128, 127)}


def ids(scheme: WeightScheme) -> str:
    return scheme.describe().replace(" ", "-")


@pytest.fixture(scope="module")
def calibration() -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[32, 64]`` weight and the Hessian ``X^T X`` of 512 correlated input rows ``X = Z A``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    return torch.randn(32, 64, generator=gen), x.T @ x


def unblocked_gptq(weight: torch.Tensor, hessian: torch.Tensor, scale, zero_point, scheme: WeightScheme):
    """GPTQ as first written, in float64: after each column, update the rest with the inverse Hessian of the columns
    left, then drop the column from that inverse. Per-channel only (its scales do not depend on the order)."""
    args = scheme.args()
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    for i in range(w.shape[1]):
        out[:, i] = fake_quantize(w[:, i : i + 1].float(), scale, zero_point, args)[:, 0].double()
        w -= torch.outer((w[:, i] - out[:, i]) / hinv[i, i], hinv[i])
        hinv = hinv - torch.outer(hinv[:, i], hinv[i]) / hinv[i, i]
    return out.float()


@pytest.mark.parametrize("scheme", SCHEMES, ids=ids)
def test_rtn_is_compressed_tensors_quantization(scheme):
    args = scheme.args()
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    out = rtn(weight, scheme, torch.bfloat16)  # scales a bf16 checkpoint stores exactly
    groups = 1 if scheme.group_size is None else 128 // scheme.group_size
    assert out.scale.shape == out.zero_point.shape == (16, groups)
    assert out.scale.dtype == torch.float32 and out.zero_point.dtype == torch.int8
    assert torch.equal(out.scale.bfloat16().float(), out.scale)

    grouped = weight.reshape(16, groups, -1)
    ct_scale, ct_zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    assert torch.equal(out.scale, ct_scale.bfloat16().float())
    own = rtn(weight, scheme)  # a float32 weight keeps compressed-tensors' float32 scales and zero points as they are
    assert torch.equal(own.scale, ct_scale) and torch.equal(own.zero_point, ct_zero.to(torch.int8))
    assert torch.equal(own.weight, fake_quantize(weight, ct_scale, ct_zero, args))
    if scheme.symmetric:
        assert not out.zero_point.any()
        expected = grouped.abs().amax(-1) / (7.5 if scheme.bits == 4 else 127.5)
        assert torch.equal(out.scale, expected.bfloat16().float())
    else:  # recomputed from the rounded scale, so at most one step from compressed-tensors' own
        assert (out.zero_point.int() - ct_zero.int()).abs().max() <= 1

    assert torch.equal(out.weight, fake_quantize(weight, out.scale, out.zero_point, args))
    q = quantize(weight, out.scale, out.zero_point, args, dtype=torch.int8)
    assert torch.equal(out.weight, dequantize(q, out.scale, out.zero_point, args))
    low, high = RANGES[scheme.bits]
    assert q.min().item() == low and q.max().item() == high  # the whole range, and nothing outside it
    assert low <= out.zero_point.min() and out.zero_point.max() <= high


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", [WeightScheme(4, True, 32), WeightScheme(4, False, None)], ids=ids)
def test_gptq_with_identity_hessian_is_rtn(scheme, act_order):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ours, plain = gptq(weight, 3.7 * torch.eye(64), scheme, act_order=act_order), rtn(weight, scheme)
    assert torch.equal(ours.weight, plain.weight)
    assert torch.equal(ours.scale, plain.scale) and torch.equal(ours.zero_point, plain.zero_point)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "scheme", [WeightScheme(4, True, 32), WeightScheme(4, True, None), WeightScheme(8, True, None)], ids=ids
)
def test_gptq_beats_rtn_on_correlated_inputs(calibration, scheme, act_order):
    weight, hessian = calibration
    baseline = reconstruction_error(weight, rtn(weight, scheme).weight, hessian)
    error = reconstruction_error(weight, gptq(weight, hessian, scheme, act_order=act_order).weight, hessian)
    # measured: 0.42x to 0.53x of RTN's error for these schemes and data
    assert 0 < error < 0.7 * baseline, (error, baseline)


@pytest.mark.parametrize("scheme", [WeightScheme(4, True, None), WeightScheme(8, False, None)], ids=ids)
def test_gptq_matches_unblocked_reference(calibration, scheme):
    weight, hessian = calibration
    out = gptq(weight, hessian, scheme, block_size=16)
    assert torch.equal(out.weight, gptq(weight, hessian, scheme).weight)  # lazy batch updates change nothing
    assert torch.equal(out.weight, unblocked_gptq(weight, hessian, out.scale, out.zero_point, scheme))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES, ids=ids)
def test_packing_recovers_gptq_integers(calibration, scheme, act_order):
    weight, hessian = calibration
    args = scheme.args()
    out = gptq(weight, hessian, scheme, act_order=act_order)
    q = quantize(out.weight, out.scale, out.zero_point, args, dtype=torch.int8)
    assert torch.equal(dequantize(q, out.scale, out.zero_point, args), out.weight)

    state = {"weight": out.weight, "weight_scale": out.scale, "weight_zero_point": out.zero_point}
    packed_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    packed = PackedQuantizationCompressor.compress(state, packed_scheme)
    assert "weight" not in packed and packed["weight_packed"].dtype == torch.int32
    assert torch.equal(PackedQuantizationCompressor.decompress(packed, packed_scheme)["weight"], out.weight)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", [WeightScheme(4, True, 32), WeightScheme(4, False, None)], ids=ids)
def test_dead_inputs_and_zero_rows_stay_finite(calibration, scheme, act_order):
    weight, _ = calibration
    weight = weight.clone()
    weight[3] = 0.0  # a row (and so a group) of zeros: scale falls back to eps, zero point must stay usable
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    x[:, [5, 40]] = 0.0  # features never active in calibration
    hessian = x.T @ x
    out = gptq(weight, hessian, scheme, act_order=act_order)
    assert torch.isfinite(out.weight).all() and torch.isfinite(out.scale).all()
    assert not out.weight[:, [5, 40]].any() and not out.weight[3].any()
    error = reconstruction_error(weight, out.weight, hessian)
    assert 0 < error < reconstruction_error(weight, rtn(weight, scheme).weight, hessian)


def test_gptq_hessian_checks():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    hessian = torch.eye(32)
    hessian[0, 0] = -0.05  # indefinite: 1x dampening is not enough, 10x is
    assert torch.isfinite(gptq(weight, hessian, WeightScheme(group_size=None)).weight).all()
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(weight, -torch.eye(32), WeightScheme(group_size=None))
    with pytest.raises(ValueError, match="NaN or infinite"):
        gptq(weight, torch.full((32, 32), float("nan")), WeightScheme(group_size=32))
    with pytest.raises(ValueError, match=r"\[32, 32\]"):
        gptq(weight, torch.eye(16), WeightScheme(group_size=None))


def test_check_group_size_names_the_layer():
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.up_proj: group size 32 .* input width 48") as info:
        check_group_size("model.layers.0.mlp.up_proj", 48, WeightScheme(group_size=32))
    assert "24 or 48" in str(info.value) and "group_size: null" in str(info.value)
    check_group_size("model.layers.0.mlp.up_proj", 64, WeightScheme(group_size=32))
    check_group_size("model.layers.0.mlp.up_proj", 48, WeightScheme(group_size=None))
    with pytest.raises(ValueError, match="group size 32 does not divide"):
        rtn(torch.randn(4, 48), WeightScheme(group_size=32))


def test_scheme_args_and_labels():
    args = WeightScheme(4, True, 64).args()
    assert (args.num_bits, args.type, args.symmetric, args.strategy, args.group_size) == (4, "int", True, "group", 64)
    args = WeightScheme(8, False, None).args()
    assert (args.num_bits, args.symmetric, args.strategy, args.group_size) == (8, False, "channel", None)
    assert WeightScheme().describe() == "int4 sym g64"
    assert WeightScheme(8, False, None).describe() == "int8 asym per-channel"
    with pytest.raises(ValueError, match="bits"):
        WeightScheme(bits=3)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=ids)
def test_bf16_weights_keep_their_integers(calibration, scheme, method):
    _, hessian = calibration
    args = scheme.args()
    weight = (0.02 * torch.randn(32, 64, generator=torch.Generator().manual_seed(4))).bfloat16()
    if method == "rtn":
        run = lambda w: rtn(w, scheme, torch.bfloat16)  # noqa: E731
    else:
        run = lambda w: gptq(w, hessian, scheme, scale_dtype=torch.bfloat16)  # noqa: E731
    full, half = run(weight.float()), run(weight)
    assert half.weight.dtype == torch.bfloat16 and half.scale.dtype == torch.float32
    assert torch.equal(half.weight, full.weight.bfloat16())
    assert torch.equal(half.scale, full.scale) and torch.equal(half.zero_point, full.zero_point)
    q = quantize(full.weight, full.scale, full.zero_point, args, dtype=torch.int8)
    # a bf16 checkpoint: integers from the float32 result, bf16 scales; it reloads to the bf16 weight exactly
    assert torch.equal(dequantize(q, full.scale.bfloat16(), full.zero_point, args), half.weight)
    if scheme.bits == 4 or scheme.symmetric:  # rounding to bf16 moves a value by under half a step
        assert torch.equal(quantize(half.weight.float(), half.scale, half.zero_point, args, dtype=torch.int8), q)
