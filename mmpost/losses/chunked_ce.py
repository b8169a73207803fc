"""The label tokens' summed cross-entropy straight from the last hidden states: the LM head and the loss run in
chunks of rows, and each chunk's gradient is computed as soon as its loss is, so that the ``[N, V]`` logits, their
log-softmax and its gradient never exist whole.

The arithmetic is the plain path's (one matmul forward, two for the gradients); what goes is three ``[N, V]``
float32 tensors per micro-batch, allocated, written and read once each. With a 49k vocabulary and a few hundred
label tokens per sample they are the largest tensors of an sft step. Written here because the libraries that fuse
the head and the loss this way (Liger Kernel, Cut Cross-Entropy) are Triton kernels for CUDA; this is plain torch
and runs wherever the model runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

# Float32 logits of one chunk. Fewer, larger chunks run faster on a CPU (the weight's gradient is accumulated
# once per chunk); 256 MiB is about 1,300 rows of a 49k vocabulary or 440 of a 152k one.
CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _chunked(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, want_hidden: bool, want_weight: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed cross-entropy of ``hidden @ weight.T`` against ``targets`` and, where asked, its gradients with
    respect to ``hidden`` (in its dtype) and ``weight`` (accumulated in float32)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = None  # the first chunk's, then the sum
    rows = chunk_rows(weight.shape[0])
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        z = (h @ weight.t()).float()  # [c, V], the chunk's one large tensor: what follows works in place
        picked = z.gather(1, t.unsqueeze(1))
        top = z.amax(dim=1, keepdim=True)
        z.sub_(top).exp_()
        norm = z.sum(dim=1, keepdim=True)
        total += (top + norm.log() - picked).sum()  # log-sum-exp minus the target's logit
        if not (want_hidden or want_weight):
            continue
        z.div_(norm)  # softmax
        z[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # d loss / d logits
        g = z.to(h.dtype)
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start : start + rows])
        if not want_weight:
            continue
        if grad_weight is None:
            grad_weight = (g.t() @ h).float()
        elif g.dtype == torch.float32:
            grad_weight.addmm_(g.t(), h)
        else:
            grad_weight += (g.t() @ h).float()
    if want_weight and grad_weight is None:  # no label token
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            total, grad_hidden, grad_weight = _chunked(
                hidden.to(dtype), weight.to(dtype), targets, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            )
        # held on ctx, not saved for backward: they are results, scaled in place once
        ctx.grads = (grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = (None, None)
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad).to(weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``cross_entropy_sum(hidden @ weight.T, targets)``, computed chunk by chunk.

    Args:
        hidden: ``[N, D]`` last hidden states at the label positions.
        weight: ``[V, D]`` the LM head's weight (bias-free).
        targets: ``[N]`` the label tokens.

    Returns:
        scalar fp32 tensor; under autocast the head's matmuls run in the autocast dtype, as ``nn.Linear``'s would,
        and the softmax in float32.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)
    with torch.no_grad(), torch.autocast(device, enabled=False):
        return _chunked(hidden.to(dtype), weight.to(dtype), targets, False, False)[0]


def is_plain_head(head: nn.Module) -> bool:
    """Whether ``linear_cross_entropy_sum`` can take the LM ``head``'s weight: a bias-free ``nn.Linear`` (not a
    LoRA-wrapped or quantized one) whose weight is whole here. A DeepSpeed ZeRO-3 weight is gathered only when the
    module itself runs, and a DTensor is a shard; those heads run as modules."""
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    weight = head.weight
    sharded = hasattr(weight, "ds_id") or hasattr(weight, "device_mesh")
    return not sharded and weight.shape == (head.out_features, head.in_features)
