"""Pruning one linear weight on its calibration inputs: SparseGPT and Wanda, unstructured or 2:4.

Both return the pruned weight and the mask of removed weights. 2:4 removes two weights of every four consecutive
input columns of each row (the layout sparse tensor cores run); unstructured removes a fraction of each layer's
weights.

- Wanda (Sun et al. 2023) removes the weights of least ``|W_ij| · ||X_j||`` within each row (or each group of
  four), and leaves the others as they are. ``||X_j||²`` is the Hessian's diagonal.
- SparseGPT (Frantar & Alistarh 2023) goes column by column as GPTQ does: it removes the weights of least
  ``W_ij² / [H⁻¹]_jj²`` (chosen per block of columns, or per group of four when it reaches the group) and moves
  each removed weight's error onto the columns not yet visited, minimising ``||(W - Ŵ) Xᵀ||``.

Written here rather than imported: llm-compressor, which has both, pins other versions of torch, transformers
and compressed-tensors than this package runs with. Their per-layer errors are compared with it in
``tools/quant_reference.py``.
"""

from __future__ import annotations

import torch

from mmpost.quant.methods import _inverse_cholesky


def check_structure(name: str, in_features: int, structure: str) -> None:
    """Fail early, naming the layer, when a 2:4 pattern cannot tile the layer's input width."""
    if structure == "2:4" and in_features % 4:
        raise ValueError(
            f"{name}: 2:4 sparsity needs an input width divisible by 4, and this layer has {in_features}; "
            "add it to ignore, or use unstructured sparsity"
        )


def _n_of_m_mask(metric: torch.Tensor) -> torch.Tensor:
    """True at the two smallest entries of every four consecutive columns of each row."""
    rows, cols = metric.shape
    grouped = metric.reshape(rows, cols // 4, 4)
    smallest = grouped.topk(2, dim=-1, largest=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, smallest, True)
    return mask.reshape(rows, cols)


def wanda(weight: torch.Tensor, hessian_diag: torch.Tensor, sparsity: float, structure: str):
    """Wanda: ``(pruned weight, mask)``. ``hessian_diag`` is ``sum x_j²`` per input column."""
    w = weight.float()
    metric = w.abs() * hessian_diag.float().to(w.device).clamp(min=0).sqrt().view(1, -1)
    if structure == "2:4":
        mask = _n_of_m_mask(metric)
    else:
        count = int(w.shape[1] * sparsity)
        order = torch.sort(metric, dim=1, stable=True).indices[:, :count]
        mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, order, True)
    return w.masked_fill(mask, 0.0).to(weight.dtype), mask


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    structure: str,
    block_size: int = 128,
    dampening: float = 0.01,
):
    """SparseGPT: ``(pruned weight, mask)``, the kept weights updated to compensate the removed ones."""
    rows, cols = weight.shape
    w = weight.float().clone()
    h = hessian.to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    upper = _inverse_cholesky(h, dampening)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_blk = w[:, start:end].clone()
        u_blk = upper[start:end, start:end]
        diag = torch.diagonal(u_blk).view(1, -1)
        err_blk = torch.zeros_like(w_blk)
        if structure != "2:4":
            metric = w_blk.pow(2) / diag.pow(2)
            threshold = torch.sort(metric.flatten()).values[int(metric.numel() * sparsity)]
            mask[:, start:end] = metric <= threshold
        for i in range(end - start):
            if structure == "2:4" and i % 4 == 0:
                metric = w_blk[:, i : i + 4].pow(2) / diag[:, i : i + 4].pow(2)
                mask[:, start + i : start + i + 4] = _n_of_m_mask(metric)
            column = w_blk[:, i]
            kept = column.masked_fill(mask[:, start + i], 0.0)
            err = (column - kept) / u_blk[i, i]
            w_blk[:, i:] -= torch.outer(err, u_blk[i, i:])
            w_blk[:, i] = kept
            err_blk[:, i] = err
        w[:, start:end] = w_blk
        w[:, end:] -= err_blk @ upper[start:end, end:]
    return w.masked_fill(mask, 0.0).to(weight.dtype), mask
