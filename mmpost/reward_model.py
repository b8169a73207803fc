"""A trained reward model as a reward function: ``{name: model, path: RUN}`` in a stage's ``rewards``.

A reward model is a saved mmpost LMM with a ``reward`` head (``stage: rm`` trains one; ``mmpost.model.heads``).
It scores the policy's own rows (left-padded prompt, then the completion through its end-of-sequence token), and
a row's score is the head's value at its last attended token. The token ids are read as the policy wrote them,
so the reward model must have the policy's tokenizer (the same vocabulary), an encoder for each of the policy's
modalities, and the same placeholder token for each.

The model is named when the reward set is built (its directory is checked then, so a typo fails at start) and
loaded by ``bind``, once the policy and the device are known: frozen (no gradients, eval mode), on that device, its
LLM in the policy's dtype. Rows are scored ``batch_size`` at a time under ``no_grad``, in whole prompt groups
(rows ``k*G .. k*G + G - 1`` with prompt ``k``'s media, encoded once for the group), so a batch holds at least one
group. The media are split by prompt from the placeholder count of each prompt; a modality whose collated layout
cannot be split that way (Qwen2-VL's patches of every image in one tensor, several audio clips to a prompt) has
its rows scored in one forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from mmpost.interfaces import MediaBatch, media_count
from mmpost.model.build import load_lmm
from mmpost.model.format import CONFIG_NAME, read_json, resolve_model_dir
from mmpost.model.heads import last_token_scores
from mmpost.model.lmm import LMM

log = logging.getLogger("mmpost")


class RewardError(ValueError):
    """A reward that cannot be resolved, a bad reward config, or a reward that failed on a sample (the error of
    every reward, ``mmpost.rewards`` included; defined here, which that module imports)."""


@dataclass
class RewardRows:
    """The token rows a reward model scores, laid out as the policy's rollout.

    Attributes:
        input_ids: ``[N, T]`` each row's prompt followed by its completion.
        attention_mask: ``[N, T]`` 1 on prompt and completion tokens, the end-of-sequence token included.
        media: the prompts' media, once per prompt, in prompt order.
        media_repeat: G, rows per prompt: rows ``k*G .. k*G + G - 1`` continue prompt ``k``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    media: dict[str, MediaBatch]
    media_repeat: int = 1


class ModelReward:
    """The ``reward`` head of a saved LMM as a reward of token rows.

    Args:
        path: a run directory (its ``final/``) or a saved model, with a ``reward`` head.
        batch_size: rows per forward (whole prompt groups, at least one).

    Raises:
        RewardError: if ``path`` is not a finished run nor a saved model, or the model has no ``reward`` head.
    """

    def __init__(self, path: str, batch_size: int = 32) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RewardError(f"reward 'model': batch_size must be a positive integer, got {batch_size!r}")
        try:
            self.path = resolve_model_dir(path, what="reward 'model' path")
        except FileNotFoundError as e:
            raise RewardError(str(e)) from None
        heads = read_json(self.path / CONFIG_NAME).get("heads") or {}
        if "reward" not in heads:
            raise RewardError(
                f"reward 'model': {self.path} has no reward head (heads: {', '.join(heads) or 'none'}); "
                "train a reward model with `stage: rm`"
            )
        self.batch_size = batch_size
        self.model: LMM | None = None
        self._unsplit_warned = False

    def bind(self, policy: LMM, device: torch.device | str) -> None:
        """Loads the reward model, frozen, on ``device`` with its LLM in ``policy``'s dtype.

        Raises:
            RewardError: if its tokenizer, modalities or placeholder tokens differ from ``policy``'s.
        """
        model = load_lmm(self.path, dtype=policy.base_llm.dtype)
        check_reads_policy_rows(model, policy, self.path)
        self.model = model.requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def __call__(self, rows: RewardRows) -> torch.Tensor:
        """``[N]`` float32 scores on the CPU: the head's value at each row's last attended token.

        Raises:
            RewardError: if the model is not bound, or cannot read the rows' media.
        """
        if self.model is None:
            raise RewardError("reward 'model' is not loaded; call RewardSet.bind(policy, device) before scoring")
        model, group = self.model, rows.media_repeat
        if rows.input_ids.shape[0] % group:
            raise RewardError(f"reward 'model': media_repeat={group} does not divide {rows.input_ids.shape[0]} rows")
        prompts = rows.input_ids.shape[0] // group
        offsets = media_offsets(model, rows)
        if offsets is None and not self._unsplit_warned:
            log.warning(
                "reward 'model': the media cannot be split by prompt; a rollout's rows are scored in one forward"
            )
            self._unsplit_warned = True
        step = max(1, self.batch_size // group) if offsets is not None else max(prompts, 1)
        device = model.base_llm.get_input_embeddings().weight.device
        scores = [torch.zeros(0)]  # so that no rows give an empty [0]
        for first in range(0, prompts, step):
            last = min(first + step, prompts)
            ids = rows.input_ids[first * group : last * group].to(device)  # [B, T]
            mask = rows.attention_mask[first * group : last * group].to(device)
            media = rows.media if offsets is None else prompt_media(rows.media, offsets, first, last)
            try:
                values = model(ids, mask, send_to_device(media, device), media_repeat=group, head="reward").values
            except ValueError as e:  # the media's token counts differ from the placeholders the policy wrote
                raise RewardError(
                    f"reward 'model' ({self.path}) cannot read the policy's rows: {e}; its encoders and connectors "
                    "must turn each medium into as many tokens as the policy's"
                ) from e
            scores.append(last_token_scores(values, mask).float().cpu())  # [B]
        return torch.cat(scores)


def check_reads_policy_rows(model: LMM, policy: LMM, path: Path) -> None:
    """Refuses a reward model that would misread the policy's rows: another vocabulary, a modality it cannot encode,
    or another placeholder token."""
    ours, theirs = model.tokenizer.get_vocab(), policy.tokenizer.get_vocab()
    if ours != theirs:
        only_ours, only_theirs = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        moved = sorted(t for t in ours.keys() & theirs.keys() if ours[t] != theirs[t])
        found = [
            f"{len(tokens)} tokens {where}, e.g. {tokens[0]!r}"
            for tokens, where in (
                (only_ours, "only in the reward model's"),
                (only_theirs, "only in the policy's"),
                (moved, "with other ids"),
            )
            if tokens
        ]
        raise RewardError(
            f"reward 'model': the reward model at {path} has a different tokenizer from the policy "
            f"({'; '.join(found)}); it scores the policy's token ids as they are, so it must use the policy's "
            "tokenizer (train it from the policy's base model)"
        )
    missing = sorted(set(policy.encoders) - set(model.encoders))
    if missing:
        raise RewardError(
            f"reward 'model': the reward model at {path} has no encoder for {', '.join(missing)}, which the policy's "
            f"prompts carry (it has: {', '.join(model.encoders) or 'none'})"
        )
    for modality in policy.encoders:
        if model.placeholder_ids[modality] != policy.placeholder_ids[modality]:
            raise RewardError(
                f"reward 'model': the reward model at {path} marks {modality} with token "
                f"{model.placeholder_ids[modality]}, the policy with {policy.placeholder_ids[modality]}"
            )


def media_offsets(model: LMM, rows: RewardRows) -> dict[str, list[int]] | None:
    """Per modality, where each prompt's media start in the collated batch (``P + 1`` offsets), or None when they
    cannot be told apart. Empty modalities are left out (they pass through whole)."""
    first_rows = rows.input_ids[:: rows.media_repeat]  # [P, T]
    offsets: dict[str, list[int]] = {}
    for modality, inputs in rows.media.items():
        if inputs is None or media_count(inputs) == 0:
            continue
        markers = (first_rows == model.placeholder_ids[modality]).sum(-1)  # [P]
        if isinstance(inputs, torch.Tensor):  # stacked media of one shape: the same number of tokens each
            counts = markers // model.media_tokens(modality, tuple(inputs.shape[1:]))
        elif all(v.shape[0] == media_count(inputs) for v in inputs.values()):
            counts = (markers > 0).long()  # one entry per medium of a varying token count: one per prompt at most
        else:
            return None
        if int(counts.sum()) != media_count(inputs):
            return None
        offsets[modality] = [0, *torch.cumsum(counts, 0).tolist()]
    return offsets


def prompt_media(
    media: dict[str, MediaBatch], offsets: dict[str, list[int]], first: int, last: int
) -> dict[str, MediaBatch]:
    """The media of prompts ``first .. last - 1``."""
    out: dict[str, MediaBatch] = {}
    for modality, inputs in media.items():
        if modality not in offsets:
            out[modality] = inputs
            continue
        start, stop = offsets[modality][first], offsets[modality][last]
        if isinstance(inputs, torch.Tensor):
            out[modality] = inputs[start:stop]
        else:
            out[modality] = {key: value[start:stop] for key, value in inputs.items()}
    return out
