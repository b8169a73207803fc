"""Scalar heads on the LLM's last hidden state: a reward model's score (``reward``), PPO's value (``value``).

A head is one linear map from the LLM's width to a number, at every position (TRL's reward and value models are
the same: ``AutoModelForSequenceClassification`` with one label, a bias-free ``score`` layer). The LMM keeps its
heads in ``LMM.heads`` by name; ``LMM.forward(..., head=name)`` returns their values beside the logits
(``TokenLogits.values``); they train as the part ``heads`` (or ``heads.<name>``) and are saved with the encoders
and connectors (``mmpost.model.format``). A model with a ``reward`` head is a reward model: ``mmpost.rewards``
loads it as a reward function, and the score of a text is the head's value at its last token.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mmpost.interfaces import IGNORE

HEAD_NAMES = ("reward", "value")


class ScalarHead(nn.Module):
    """``[..., D] -> [..., 1]`` linear score of a hidden state, without bias (as TRL's ``score`` layer).

    Initialised with std ``1 / sqrt(D + 1)``, the value TRL gives a fresh reward / value head (``layer_init``
    with ``std=1/sqrt(hidden + 1)``), so the first scores are of order one whatever the width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.score = nn.Linear(dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (dim + 1) ** 0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` values of ``[B, T, D]`` hidden states (cast to the head's dtype: a bf16 LLM under an fp32 head),
        as fp32 (they feed losses directly)."""
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


class CriticTrunk(nn.Module):
    """A value model of its own: a copy of the LLM's decoder (its transformer layers and final norm, LoRA adapters
    included) with a scalar head, reading the LMM's input embeddings (text and media tokens) without training them.

    PPO's ``value_model: separate``: the value loss trains this copy alone and the policy's trunk is untouched by
    it, as with TRL's separate value model; unlike TRL's, the critic has no embeddings, encoders or connectors of its
    own (it reads the policy's, computed again without gradients), and it starts as a copy of the starting policy.
    """

    def __init__(self, decoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.decoder = decoder
        self.head = ScalarHead(dim)

    def values(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, media, media_repeat: int):
        """``[B, T]`` values of a batch of the LMM ``model``'s rows."""
        from mmpost.model.positions import positions_of

        with torch.no_grad():
            embeds, _ = model.embed(input_ids, media, positions_of(attention_mask), media_repeat)
            position_ids = model.decoder_positions(input_ids, attention_mask, media, media_repeat)
        out = self.decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return self.head(out.last_hidden_state)


def head_values(model, name: str, hidden: torch.Tensor, input_ids, attention_mask, media, media_repeat: int):
    """``[B, T]`` values of ``model``'s head ``name``: on the LMM's own last hidden states, or a critic's."""
    head = model.heads[name]
    if isinstance(head, CriticTrunk):
        return head.values(model, input_ids, attention_mask, media, media_repeat)
    return head(hidden)


def add_head(model, name: str, trunk: bool = False) -> nn.Module:
    """Adds (or returns the existing) head ``name`` of ``model``, an ``LMM``, on its LLM's width and device: a
    ``ScalarHead`` on the LMM's hidden states, or with ``trunk`` a ``CriticTrunk`` (a copy of the LLM's decoder).

    Raises:
        ValueError: for a name not in ``HEAD_NAMES``, or a trunk for a model with a fusion connector (its blocks
            hook the policy's own decoder layers).
    """
    from mmpost.interfaces import FusionConnector

    if name not in HEAD_NAMES:
        raise ValueError(f"unknown head {name!r}; valid: {', '.join(HEAD_NAMES)}")
    if name not in model.heads:
        weight = model.base_llm.get_input_embeddings().weight
        if trunk:
            fused = [m for m, c in model.connectors.items() if isinstance(c, FusionConnector)]
            if fused:
                raise ValueError(
                    f"a separate value model copies the LLM's decoder, whose layers the fusion connector of {fused} "
                    "hooks; use value_model: shared"
                )
            decoder = copy.deepcopy(model.base_llm.get_decoder())
            model.heads[name] = CriticTrunk(decoder, model.hidden_size).to(weight.device)
        else:
            model.heads[name] = ScalarHead(model.hidden_size).to(weight.device)
    return model.heads[name]


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` each row's value at its last attended token (left- or right-padded rows), from ``[B, T]`` values."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).amax(dim=1)  # [B]
    return values[torch.arange(values.shape[0], device=values.device), last]


def answer_end_scores(
    values: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor, eos_ids: set[int]
) -> torch.Tensor:
    """``[B]`` each row's value at its answer's first end-of-sequence token, or at its last answer token when it has
    none. Generation stops at end-of-sequence, so this is where a sampled completion ends (``last_token_scores`` of
    its rows): a reward model trained on answers rendered by a chat template, which may write more after the
    end-of-turn token (a newline), is read at the token it was trained on.

    Args:
        values: ``[B, T]`` head values; labels: ``[B, T]`` the answer's tokens, ``IGNORE`` elsewhere; input_ids:
            ``[B, T]``; eos_ids: the model's end-of-sequence ids (``mmpost.model.completions.eos_token_ids``).
    """
    answer = labels != IGNORE  # [B, T]
    eos = torch.tensor(sorted(eos_ids), device=input_ids.device)
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    width = labels.shape[1]
    first_eos = torch.where(answer & torch.isin(input_ids, eos), positions, width).amin(dim=1)  # [B]
    last = (positions * answer).amax(dim=1)
    at = torch.where(first_eos < width, first_eos, last)
    return values[torch.arange(values.shape[0], device=values.device), at]
