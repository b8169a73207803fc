"""Scaling that moves difficulty between activations and weights before quantization: SmoothQuant and AWQ.

Both divide the input channels of some layers' inputs by per-channel scales ``s`` and multiply the same columns of
those layers' weights by ``s``, which leaves the float model's outputs unchanged. The division is folded into the
layer that produces the input (a norm's weight, or the output rows of a linear layer), so nothing is added to the
model. The pairs come from the decoder layer's structure (``mappings``):

- the attention's input norm feeds ``q_proj``, ``k_proj``, ``v_proj``;
- ``v_proj`` feeds ``o_proj`` (through attention, which is linear in the values) when each value channel is an
  ``o_proj`` input channel, i.e. without grouped-query attention;
- the MLP's input norm feeds ``gate_proj`` and ``up_proj``;
- ``up_proj`` feeds ``down_proj`` (through the elementwise gate).

SmoothQuant (Xiao et al. 2022) smooths for int8 activations: ``s_j = max|X_j|^α / max|W_j|^(1-α)`` over the
calibration tokens and over the balanced layers' column ``j``; only the two norm-fed pairs, whose inputs are the
activations W8A8 quantizes with outliers. ``α`` is either given, as in the paper, or searched per pair
(``smoothquant_search``): the α of ``ALPHA_GRID`` whose smoothed pair, weights rounded and inputs quantized per token
as at run time, reproduces the parent's float outputs best, by the same measure as AWQ's search.

AWQ (Lin et al. 2023) protects the weights that meet large activations: for each pair it searches
``s = mean|X|^r / mean|Ŵ|^(1-r)`` (``Ŵ`` each weight over its group's maximum) over a grid of ``r`` in [0, 1] and
keeps the ``s`` whose quantized layers ``Q(W·s)/s`` reproduce the float outputs of the layers' common parent
(the attention, the MLP, or the single balanced layer) best on the calibration inputs, measured as a mean
squared error over real tokens. With ``balance``, each token's error (and its input in ``mean|X|``)
is weighed by the answer's sensitivity to it (``mmpost.quant.sensitivity``); with all weights 1 this is AWQ's own
measure. The grid (``r = 0`` without weight means, then ``n_grid - 1`` points with them) and the normalisation
``s / sqrt(max s · min s)`` follow llm-compressor's ``AWQModifier`` with ``duo_scaling``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmpost.model.quantized import ActivationScheme, WeightScheme, quantize_dynamic
from mmpost.quant.methods import rtn

MIN_SCALE = 1e-5
ALPHA_GRID = tuple(i / 20 for i in range(1, 20))  # SmoothQuant's α searched over 0.05, 0.10, ..., 0.95


@dataclass
class Mapping:
    """Layers whose shared input is smoothed, the module producing that input, and their common parent."""

    smooth: nn.Module
    balance: list[nn.Linear]
    parent: nn.Module
    names: list[str]  # the balance layers' names in the LLM
    norm_fed: bool


def _find(layer: nn.Module, *names: str):
    found = []
    for name in names:
        module = layer
        for part in name.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        found.append(module)
    return found


def mappings(layer: nn.Module, prefix: str, quantized: dict[str, nn.Linear]) -> list[Mapping]:
    """The smoothable pairs of decoder layer ``layer`` (named ``prefix`` in the LLM) whose balance layers are all
    among ``quantized``; layers of other shapes (fused projections, GQA's values) are left as they are."""
    out = []
    attn, mlp = _find(layer, "self_attn", "mlp")
    norm_in, norm_post = _find(layer, "input_layernorm", "post_attention_layernorm")
    candidates = []
    if attn is not None and norm_in is not None:
        candidates.append((norm_in, attn, "self_attn", ["q_proj", "k_proj", "v_proj"], True))
        v, o = _find(attn, "v_proj", "o_proj")
        if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and v.out_features == o.in_features:
            candidates.append((v, o, "self_attn", ["o_proj"], False))
    if mlp is not None and norm_post is not None:
        candidates.append((norm_post, mlp, "mlp", ["gate_proj", "up_proj"], True))
        up, down = _find(mlp, "up_proj", "down_proj")
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features:
            candidates.append((up, down, "mlp", ["down_proj"], False))
    for smooth, parent, where, balance_names, norm_fed in candidates:
        names = [f"{prefix}.{where}.{b}" for b in balance_names]
        if not all(n in quantized for n in names):
            continue
        if norm_fed and getattr(smooth, "weight", None) is None:
            continue
        out.append(Mapping(smooth, [quantized[n] for n in names], parent, names, norm_fed))
    return out


@torch.no_grad()
def apply_scales(mapping: Mapping, scales: torch.Tensor) -> None:
    """Divides the smoothed input by ``scales`` (in the module producing it) and multiplies the balance layers'
    columns by them, leaving the float outputs as they were."""
    for layer in mapping.balance:
        layer.weight.mul_(scales.to(layer.weight.dtype).view(1, -1))
    smooth = mapping.smooth
    s = scales.to(smooth.weight.dtype)
    if smooth.weight.ndim == 1:
        smooth.weight.div_(s)
    else:
        smooth.weight.div_(s.view(-1, 1))
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.div_(s)


def smoothquant_scales(
    mapping: Mapping, act_max: torch.Tensor, alpha: float, weights: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)``; channels never active, or with all-zero weights, keep scale 1.
    ``weights``: the balance layers' weights to use (their current ones by default)."""
    weights = weights if weights is not None else [layer.weight.detach() for layer in mapping.balance]
    weight_max = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(0)
    act_max = act_max.float().to(weight_max.device)
    scales = act_max.pow(alpha) / weight_max.pow(1 - alpha)
    usable = (act_max > 0) & (weight_max > 0) & torch.isfinite(scales)
    return torch.where(usable, scales.clamp(min=MIN_SCALE), torch.ones_like(scales))


def _weight_means(mapping: Mapping, scheme: WeightScheme) -> torch.Tensor:
    """Mean over the balance layers' rows of each weight's magnitude relative to its quantization group's."""
    total, rows = 0.0, 0
    for layer in mapping.balance:
        w = layer.weight.detach().float().abs()
        chunk = scheme.group_size or w.shape[1]
        grouped = w.reshape(-1, chunk)
        normed = (grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape)
        total = total + normed.sum(dim=0)
        rows += w.shape[0]
    return total / rows


@dataclass
class AWQResult:
    scales: torch.Tensor
    ratio: float
    error: float  # the best grid point's mean squared error of the parent's outputs
    identity_error: float  # the same with all scales 1 (what round-to-nearest alone gives)


@torch.no_grad()
def awq_search(
    mapping: Mapping,
    act_mean: torch.Tensor,
    replay,
    scheme: WeightScheme,
    n_grid: int = 20,
    weights: list[torch.Tensor] | None = None,
) -> AWQResult:
    """Grid search of AWQ's scales for ``mapping``.

    Args:
        act_mean: mean |x| per input channel of the balance layers over the calibration tokens.
        replay: ``replay() -> list[(output, keep_mask)]``, the parent's outputs on the cached calibration inputs
            with the layers' current weights, one per calibration batch; the first call gives the float outputs.
        scheme: the weights' quantization (round to nearest inside the search, as AWQ's paper and llm-compressor
            do; the final weights may then be chosen by GPTQ).
        weights: per calibration batch, ``[B, T]`` the weight of each token's output error (every token alike when
            None; ``mmpost.quant.sensitivity``).
    """
    reference = replay()
    originals = [layer.weight.detach().clone() for layer in mapping.balance]
    x_mean = act_mean.float().to(originals[0].device)
    w_mean = _weight_means(mapping, scheme).to(x_mean.device)
    grid = [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    best, best_error, best_ratio, identity_error = None, float("inf"), 0.0, None
    for ratio, duo in grid:
        if duo:
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            scales = x_mean.pow(ratio).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales[~torch.isfinite(scales)] = 1.0
        for layer, w in zip(mapping.balance, originals, strict=True):
            scaled = w.float() * scales.view(1, -1)
            # compressed-tensors' min-max scales, unrounded, as llm-compressor's search uses: the grid's choice is
            # sensitive to them (bf16-rounded ones pick other ratios on some layers)
            quantized = rtn(scaled, scheme, torch.float32).weight.float()
            layer.weight.copy_((quantized / scales.view(1, -1)).to(w.dtype))
        error = _mse(reference, replay(), weights)
        if identity_error is None:
            identity_error = error
        if error < best_error:
            best, best_error, best_ratio = scales.clone(), error, ratio
    for layer, w in zip(mapping.balance, originals, strict=True):
        layer.weight.copy_(w)
    if best is None:
        raise ValueError(
            f"AWQ: no finite error for {mapping.names[0]}'s inputs; the calibration outputs are not finite"
        )
    return AWQResult(best, best_ratio, best_error, identity_error)


def _mse(reference: list, got: list, weights: list[torch.Tensor] | None = None) -> float:
    """Mean squared error over the real tokens' outputs, each token's weighed by ``weights`` (1 when None)."""
    total, count = 0.0, 0
    for i, ((ref, keep), (out, _)) in enumerate(zip(reference, got, strict=True)):
        squared = (ref - out)[keep].float().pow(2).sum(-1)  # [rows]
        if weights is not None:
            squared = squared * weights[i].to(squared.device)[keep]
        total += float(squared.sum())
        count += int(keep.sum()) * ref.shape[-1]
    return total / max(count, 1)


@dataclass
class AlphaResult:
    scales: torch.Tensor
    alpha: float
    error: float  # the chosen α's mean squared error of the parent's outputs
    unsmoothed_error: float  # the same with no smoothing (the pair quantized as it is)


@torch.no_grad()
def smoothquant_search(
    mapping: Mapping,
    act_max: torch.Tensor,
    replay,
    scheme: WeightScheme,
    activations: ActivationScheme,
    weights: list[torch.Tensor] | None = None,
) -> AlphaResult:
    """SmoothQuant's α for ``mapping`` chosen on the calibration inputs: for each α of ``ALPHA_GRID`` the balance
    layers get ``Q(W·s)`` (round to nearest) and the per-token quantized inputs ``Q(x / s)``, as the checkpoint
    computes them, and the α whose parent outputs are nearest the float ones (``_mse``) is kept. ``act_max``, ``replay``
    and ``weights`` as in ``awq_search``."""
    reference = replay()
    originals = [layer.weight.detach().clone() for layer in mapping.balance]
    args = activations.args()
    divisor: dict[str, torch.Tensor] = {}

    def quantized_input(module: nn.Module, inputs: tuple):
        return (quantize_dynamic(module, inputs[0] / divisor["s"].to(inputs[0].dtype), args), *inputs[1:])

    handles = [layer.register_forward_pre_hook(quantized_input) for layer in mapping.balance]
    results = []
    try:
        for alpha in (None, *ALPHA_GRID):
            scales = torch.ones_like(act_max, dtype=torch.float32)
            if alpha is not None:
                scales = smoothquant_scales(mapping, act_max, alpha, originals).to(originals[0].device)
            divisor["s"] = scales
            for layer, w in zip(mapping.balance, originals, strict=True):
                layer.weight.copy_(rtn(w.float() * scales.view(1, -1), scheme, torch.float32).weight.to(w.dtype))
            results.append((_mse(reference, replay(), weights), alpha, scales))
    finally:
        for handle in handles:
            handle.remove()
        for layer, w in zip(mapping.balance, originals, strict=True):
            layer.weight.copy_(w)
    finite = [r for r in results[1:] if math.isfinite(r[0])]
    if not finite:
        raise ValueError(
            f"SmoothQuant: no finite error for {mapping.names[0]}'s inputs; the calibration outputs are not finite"
        )
    error, alpha, scales = min(finite, key=lambda r: r[0])
    return AlphaResult(scales, alpha, error, results[0][0])
