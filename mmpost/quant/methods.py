"""Weight quantization arithmetic: round-to-nearest (RTN) and GPTQ for one ``[out, in]`` linear weight.

Scales, zero points, rounding and clamping are compressed-tensors' own (``calculate_qparams``, ``fake_quantize``), so
the integers behind a returned weight are exactly those its ``pack-quantized`` compressor recovers when it saves the
model: ``quantize(weight, scale, zero_point)`` gives them back, and ``dequantize`` of them gives the weight again.
Symmetric int4 has ``scale = max|w| / 7.5`` and ``q`` in ``[-8, 7]``; asymmetric has ``scale = (max - min) / 15``
with ``min`` and ``max`` widened to include 0, and a zero point in the same range. int8 is the same over
``[-128, 127]``.

Two choices of ours on top of compressed-tensors:

- Scales are made representable in the dtype the checkpoint stores them in (``scale_dtype``: the layer's weight
  dtype, which compressed-tensors gives its ``weight_scale``) before anything is quantized with them, so that a bf16
  checkpoint stores the very scales the integers were computed with, and a float32 one compressed-tensors' scales as
  they are. Rounding a scale to bf16 moves it by up to 0.4 %, which moves many weights across a rounding boundary:
  on SmolLM2-135M's layers it raised AWQ's int4 layer error by up to 14 % over float32 scales, plain rounding's by up
  to 4 %. Asymmetric zero points
  are recomputed from a rounded scale (compressed-tensors computes them from the unrounded one), which also gives an
  all-zero group a usable zero point rather than one from 0/0.
- GPTQ zeroes the weight columns of inputs that were never active in calibration (``H_ii == 0``), as the reference
  implementation does: they contributed nothing to the calibration outputs, so nothing constrains them.

Packing a bf16 model: bf16 keeps 8 significant bits, so the bf16 weight returned for a bf16 input is
``(q - zero_point) * scale`` rounded. Requantizing it in float32 still gives back ``q`` for int4 and symmetric int8
(the rounding is under half a step), but not for asymmetric int8 (255 steps), and compressed-tensors' ``quantize`` run
in bf16 arithmetic loses some int8 integers even when symmetric. So pack from float32: quantize ``weight.float()`` and
give the packer that result with the float32 scale; its integers dequantized in bf16 are exactly the bf16 weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.quant_args import round_to_quantized_type_dtype
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

from mmpost.model.quantized import WeightScheme

CHOLESKY_RETRIES = 3  # after the first try, each retry multiplies the dampening by 10


@dataclass
class QuantizedWeight:
    """A quantized weight as the model computes with it, and the parameters that turn it back into integers.

    Attributes:
        weight: ``[out, in]`` dequantized weight ``(q - zero_point) * scale``, in the input weight's dtype.
        scale: ``[out, in // group_size]`` (``[out, 1]`` per channel) float32 scales, each exactly representable in
            the checkpoint's scale dtype.
        zero_point: same shape, ``int8`` as compressed-tensors stores it; zeros when symmetric.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor


def check_group_size(name: str, in_features: int, scheme: WeightScheme) -> None:
    """Fail early, naming the layer, when the scheme's group size does not divide the layer's input width."""
    group = scheme.group_size
    if group is None or in_features % group == 0:
        return
    smaller = [d for d in range(group - 1, 0, -1) if in_features % d == 0][:1]
    larger = [d for d in range(group + 1, in_features + 1) if in_features % d == 0][:1]
    hint = " or ".join(str(d) for d in smaller + larger)
    raise ValueError(
        f"{name}: group size {group} does not divide its input width {in_features}; "
        f"use a divisor such as {hint}, or group_size: null for per-channel scales"
    )


def _qparams(
    weight: torch.Tensor, args: QuantizationArgs, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scale (each value representable in ``scale_dtype``) and zero point of each row, or of each group of a
    row, from min and max."""
    rows = weight.shape[0]
    if args.strategy == QuantizationStrategy.GROUP:
        grouped = weight.reshape(rows, -1, args.group_size)  # [out, groups, g]
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)  # [out, groups]
    else:
        low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)  # [out, 1]
    scale, zero_point = calculate_qparams(low, high, args)
    if scale_dtype == torch.float32:
        return scale, zero_point
    scale = scale.to(scale_dtype).float()
    if not args.symmetric:  # the same formula as calculate_qparams, from the rounded scale
        q_min, q_max = calculate_range(args, weight.device)
        shifted = (q_min - low.clamp(max=0.0) / scale).clamp(q_min, q_max)
        zero_point = round_to_quantized_type_dtype(shifted, dtype=args.zp_dtype, cast_to_original_dtype=False)
    return scale, zero_point


def rtn(weight: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Round-to-nearest: each group's (or row's) scale from its min and max, then round every weight on its own.
    A weight's zeros (a pruned weight's) stay zero. ``scale_dtype``: what the scales must be representable in (the
    checkpoint's; ``weight``'s dtype by default)."""
    check_group_size("weight", weight.shape[1], scheme)
    args = scheme.args()
    full = weight.float()
    scale, zero_point = _qparams(full, args, scale_dtype or weight.dtype)
    return QuantizedWeight(fake_quantize(full, scale, zero_point, args).to(weight.dtype), scale, zero_point)


def _inverse_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the dampened Hessian; retries with 10x dampening while it fails."""
    mean_diag = torch.diagonal(hessian).mean()
    for attempt in range(CHOLESKY_RETRIES + 1):
        damp = dampening * 10**attempt
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return upper
    raise ValueError(
        f"GPTQ: the Hessian is not positive definite even with dampening {damp:g} x its mean diagonal; "
        "the calibration inputs are degenerate (too few rows, or collinear features), or raise dampening"
    )


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: WeightScheme,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize columns one at a time, moving each one's rounding error onto the columns
    not yet quantized so as to minimise the output error ``||(W - Q) X^T||`` on the calibration inputs.

    Args:
        weight: ``[out, in]`` weight.
        hessian: ``[in, in]`` float32 ``sum of x x^T`` over the calibration rows (any positive scale: the result does
            not depend on it).
        scheme: bits, symmetry and group size.
        block_size: columns per lazy batch update (rounded down to a multiple of the group size); a speed setting.
        dampening: fraction of the mean Hessian diagonal added to the diagonal.
        act_order: quantize columns in order of decreasing ``H_ii``, the most active inputs first.
        mask: ``[out, in]``, True at weights pruned before quantization: they stay zero (zero is exact in every
            scheme), and the error of zeroing them moves onto later columns as any rounding error does.
        scale_dtype: what the scales must be representable in (the checkpoint's; ``weight``'s dtype by default).

    Groups without ``act_order`` take their scale and zero point from the group's current weights, already
    corrected by the earlier columns, when the loop reaches the group's first column. With ``act_order`` a group's
    columns are no longer quantized together, so every group's parameters are computed up front from the original
    weights (the reference code's "static groups"); the scale layout stays that of the original column order, which
    is what the checkpoint format can express (it has no column permutation). Per-channel parameters are always
    computed up front.

    Returns:
        ``QuantizedWeight``; ``quantize(weight, scale, zero_point)`` recovers exactly the integers chosen here.

    Raises:
        ValueError: for a group size that does not divide ``in``, a Hessian of the wrong shape or with non-finite
            entries, or one that stays singular after the dampening retries.
    """
    # Written here rather than imported: no maintained library runs GPTQ on an arbitrary torch module outside its
    # own calibration pipeline.
    rows, cols = weight.shape
    check_group_size("weight", cols, scheme)
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"GPTQ: the Hessian must be [{cols}, {cols}] for a weight of {cols} inputs, got {hessian.shape}"
        )
    if not torch.isfinite(hessian).all():
        raise ValueError("GPTQ: the Hessian has NaN or infinite entries; check the calibration activations")
    args = scheme.args()
    column_args = replace(scheme, group_size=None).args()  # one column, one scale per row
    scale_dtype = scale_dtype or weight.dtype
    group = scheme.group_size or cols
    w = weight.float().clone()
    h = hessian.to(device=w.device, dtype=torch.float32).clone()

    dead = torch.diagonal(h) == 0  # inputs never active in calibration
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static = scheme.group_size is None or act_order
    if static:
        scale, zero_point = _qparams(w, args, scale_dtype)
    else:
        scale = torch.empty(rows, cols // group, device=w.device)
        zero_point = torch.empty(rows, cols // group, device=w.device, dtype=args.zp_dtype)

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    pruned = mask[:, perm].to(w.device) if mask is not None else None
    group_of = (perm // group).tolist()  # group of the original column, per processed position
    upper = _inverse_cholesky(h, dampening)

    block = max(group, block_size - block_size % group) if scheme.group_size else block_size
    out = torch.zeros_like(w)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_blk = w[:, start:end].clone()  # [out, b], corrected column by column
        u_blk = upper[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        for i in range(end - start):
            g = group_of[start + i]
            if not static and (start + i) % group == 0:
                s, z = _qparams(w_blk[:, i : i + group], column_args, scale_dtype)
                scale[:, g], zero_point[:, g] = s[:, 0], z[:, 0]
            column = w_blk[:, i : i + 1]  # [out, 1]
            quantized = fake_quantize(column, scale[:, g : g + 1], zero_point[:, g : g + 1], column_args)
            if pruned is not None:
                quantized = quantized.masked_fill(pruned[:, start + i : start + i + 1], 0.0)
            out[:, start + i] = quantized[:, 0]
            err = (column[:, 0] - quantized[:, 0]) / u_blk[i, i]
            w_blk[:, i + 1 :] -= torch.outer(err, u_blk[i, i + 1 :])
            err_blk[:, i] = err
        w[:, end:] -= err_blk @ upper[start:end, end:]

    out = out[:, torch.argsort(perm)]
    return QuantizedWeight(out.to(weight.dtype), scale, zero_point)


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error on the calibration inputs, ``tr((W - Q) H (W - Q)^T) / tr(W H W^T)``.

    With ``H = X^T X`` this is ``||X (W - Q)^T||^2 / ||X W^T||^2``: 0 for a lossless quantization, 1 for one as bad
    as zeroing the layer. 0 when the layer's calibration outputs are all zero and the quantized ones too.
    """
    h = hessian.float()
    w = weight.to(device=h.device, dtype=torch.float32)
    diff = w - quantized.to(device=h.device, dtype=torch.float32)
    error = ((diff @ h) * diff).sum().item()
    total = ((w @ h) * w).sum().item()
    if total == 0:
        return 0.0 if error == 0 else float("inf")
    return error / total
