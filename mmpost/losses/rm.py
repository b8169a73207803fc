"""The Bradley–Terry loss of a reward model on preference pairs, as TRL 1.16's ``RewardTrainer.compute_loss``.

With ``r_c`` and ``r_r`` the scalar rewards of a pair's chosen and rejected answers, the model of a preference
``P(c ≻ r) = σ(r_c - r_r)`` (Bradley & Terry 1952; InstructGPT's reward model, Ouyang et al. 2022, eq. 1) gives the
negative log-likelihood of each pair

    ``L = -log σ(r_c - r_r - m)``

where ``m`` is the pair's margin, 0 unless the data gives one (Llama 2's reward models, Touvron et al. 2023, eq. 2:
a larger margin for a more clear-cut preference). With a centring coefficient ``η`` (Eisenstein et al. 2023), TRL adds
``η mean((r_c + r_r)²)``, which keeps the rewards near zero mean without changing their differences.

TRL's loss is the mean over its batch of the first term plus ``η`` times the mean over the batch of the second.
Here each pair carries its own share of both, ``L_i = -log σ(r_c,i - r_r,i - m_i) + η (r_c,i + r_r,i)²``, so that
the caller may sum pairs over micro-batches and processes and divide once by the pairs of the whole step: on one
batch ``mean_i L_i`` is TRL's loss exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """Per-pair Bradley–Terry loss, ``-log σ(r_c - r_r - m) + η (r_c + r_r)²``.

    Args:
        chosen: ``[N]`` reward of each pair's chosen answer.
        rejected: ``[N]`` reward of each pair's rejected answer.
        margin: ``[N]`` margin each pair's reward difference should exceed, or None for none (TRL's ``margin``
            column).
        center_coefficient: η, the weight of the centring term (TRL's ``center_rewards_coefficient``); None or 0
            for none.

    Returns:
        ``[N]`` losses, in at least fp32; their mean is TRL's loss on the same batch.
    """
    dtype = torch.promote_types(chosen.dtype, torch.float32)
    chosen, rejected = chosen.to(dtype), rejected.to(dtype)
    difference = chosen - rejected  # [N]
    if margin is not None:
        difference = difference - margin.to(dtype)
    losses = -F.logsigmoid(difference)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses
