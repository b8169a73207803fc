"""Verifiable rewards for the GRPO stage: the built-in ones, custom ones by dotted path, and their weighted sum.

A reward is a plain function of one completion and the fields of its data record::

    def brevity(completion: str, max_chars: int = 400, **fields) -> float:
        return 1.0 if len(completion) <= max_chars else 0.0

It is called as ``fn(completion, **kwargs, **fields)``: ``kwargs`` come from the config, ``fields`` are the
sample's record (``id``, ``prompt``, ``answer``, ``task``, ... whatever the data had), passed by keyword. A custom
reward must therefore accept ``**fields`` and pick out the ones it needs by name. It returns a real number
(``bool`` counts as 0/1); anything else, NaN or infinity included, is an error naming the reward and the sample.
A config lists the rewards and their weights; the total is ``sum_i weight_i * r_i``::

    rewards:
      - {name: accuracy, weight: 1.0}
      - {name: format, weight: 0.2}
      - {name: mypkg.rewards.brevity, weight: 0.1, kwargs: {max_chars: 300}}

Built-in names are exact keys of ``REWARDS``; anything else must be a dotted path (``mypkg.rewards.brevity`` or
``mypkg.rewards:brevity``). Every function is resolved when the ``RewardSet`` is built, so a misspelt name fails
at start, before any model is loaded.

A trained reward model is the built-in ``model``, with the ``path`` of a run directory or a saved model that has a
``reward`` head (``stage: rm`` trains one; ``mmpost.reward_model``)::

    rewards:
      - {name: model, path: runs/rm, weight: 1.0, kwargs: {batch_size: 16}}
      - {name: format, weight: 0.2}

It scores the policy's token rows rather than the decoded text: the head's value at each row's last token (the
end-of-sequence token when the completion has one), ``batch_size`` rows a forward (default 32, whole prompt
groups). The directory is checked when the set is built; the model is loaded by ``RewardSet.bind`` once the policy
is: frozen (no gradients, eval mode), on the policy's device, in its dtype. Since it reads the policy's token ids
as they are, its tokenizer must be the policy's (the same vocabulary), else ``bind`` refuses it. ``path`` belongs
to ``model`` only, and only one ``model`` reward may be listed.

Departure from the R1-style recipe: ``accuracy`` is exact match after light normalisation (``mmpost.answers``:
numbers compared as numbers, text case-insensitively), with no symbolic equivalence: ``1/2`` and ``0.5`` do not
match.
"""

from __future__ import annotations

import difflib
import importlib
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmpost.answers import answer_span, completion_answers
from mmpost.reward_model import ModelReward, RewardError, RewardRows

if TYPE_CHECKING:
    from mmpost.model.lmm import LMM

RewardFn = Callable[..., Any]
__all__ = ["REWARDS", "RewardError", "RewardRows", "RewardSet", "RewardSpec", "accuracy", "format_reward"]


_FORMAT = re.compile(
    r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*",
    re.DOTALL,
)


def accuracy(completion: str, answer: Any = None, strict: bool = False, **fields: Any) -> float:
    """1.0 if the completion's answer equals the reference ``answer``, else 0.0.

    The completion's answer is its last ``<answer>`` span; without one it is the whole completion, or
    nothing (reward 0.0) when ``strict``. It is compared with ``answer`` as held-out accuracy compares
    (``mmpost.answers``): numbers numerically, text case-insensitively without trailing punctuation.

    Args:
        completion: the model's generated text.
        answer: the reference answer from the data record (a string or a number).
        strict: score 0.0 when the completion has no ``<answer>`` span.
        **fields: the record's other fields, unused.

    Returns:
        1.0 or 0.0.

    Raises:
        RewardError: if the record has no ``answer`` field, or an empty one.
    """
    if answer is None or not str(answer).strip():
        raise RewardError(
            "the accuracy reward compares against a reference, so the data needs an `answer` field "
            f"in every record (got {answer!r})"
        )
    if strict and answer_span(completion) is None:
        return 0.0
    return float(completion_answers(completion, str(answer)))


def format_reward(completion: str, **fields: Any) -> float:
    """1.0 when the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0.

    Whitespace is allowed before, between and after the two blocks; the blocks may span lines but may not
    contain another tag of their own kind (so a second ``<answer>`` block scores 0.0).
    """
    return float(_FORMAT.fullmatch(completion) is not None)


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy, "format": format_reward}
MODEL = "model"  # the built-in reward of a trained reward model (``mmpost.reward_model``), given by ``path``
MODEL_KWARGS = ("batch_size",)


@dataclass
class RewardSpec:
    """One reward in a config: a built-in name or a dotted path, its weight, keyword arguments for it, and for the
    reward model (``name: model``) its ``path``."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def resolve_reward(name: str) -> RewardFn:
    """The function for a built-in name in ``REWARDS`` or a dotted path (``pkg.mod.fn`` or ``pkg.mod:fn``).

    Raises:
        RewardError: if the name is unknown, its module fails to import, or it names no callable.
    """
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        builtins = sorted([*REWARDS, MODEL])
        close = difflib.get_close_matches(name, builtins, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RewardError(
            f"unknown reward {name!r}.{hint} Built-in: {', '.join(builtins)}; "
            "a custom reward is given by dotted path, e.g. 'mypkg.rewards.brevity'"
        )
    if not module_name or not attr:
        raise RewardError(f"reward {name!r} must look like 'package.module.function' or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a module that raises while importing is as unusable as a missing one
        raise RewardError(f"reward {name!r}: module {module_name!r} does not import ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardError(f"reward {name!r}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    return fn


def _as_spec(spec: RewardSpec | Mapping[str, Any]) -> RewardSpec:
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"name", "weight", "kwargs", "path"})
        if unknown:
            raise RewardError(
                f"reward entry {dict(spec)!r} has unknown key(s) {unknown}; valid: name, weight, kwargs, path"
            )
        if "name" not in spec:
            raise RewardError(f"reward entry {dict(spec)!r} has no `name`")
        spec = RewardSpec(**spec)
    if not isinstance(spec, RewardSpec):
        raise RewardError(f"a reward is a RewardSpec or a mapping with name/weight/kwargs, got {spec!r}")
    if not isinstance(spec.name, str) or not spec.name:
        raise RewardError(f"reward name must be a non-empty string, got {spec.name!r}")
    weight = spec.weight
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise RewardError(f"reward {spec.name!r}: weight must be a finite number, got {weight!r}")
    if not isinstance(spec.kwargs, Mapping):
        raise RewardError(f"reward {spec.name!r}: kwargs must be a mapping, got {spec.kwargs!r}")
    if spec.name == MODEL and spec.path is None:
        raise RewardError(
            "reward 'model' needs a `path`: a run directory or a saved model with a reward head, "
            "e.g. {name: model, path: runs/rm}"
        )
    if spec.name != MODEL and spec.path is not None:
        raise RewardError(
            f"reward {spec.name!r}: `path` names a reward model and belongs to {{name: model, path: ...}} only; "
            "a reward function takes its options in `kwargs`"
        )
    if spec.path is not None and not isinstance(spec.path, str | os.PathLike):
        raise RewardError(f"reward 'model': path must be a string, got {spec.path!r}")
    path = None if spec.path is None else os.fspath(spec.path)
    return RewardSpec(spec.name, float(weight), dict(spec.kwargs), path)


def _resolve(spec: RewardSpec) -> RewardFn | ModelReward:
    if spec.name != MODEL:
        return resolve_reward(spec.name)
    unknown = sorted(set(spec.kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise RewardError(f"reward 'model': unknown kwargs {unknown}; valid: {', '.join(MODEL_KWARGS)}")
    return ModelReward(spec.path, **spec.kwargs)


class RewardSet:
    """A weighted sum of rewards, every function resolved at construction.

    Args:
        specs: ``RewardSpec`` objects or mappings with keys ``name``, ``weight``, ``kwargs`` and (for ``model``)
            ``path``.

    Raises:
        RewardError: for an empty list, an unknown key, a bad weight, a name listed twice, a name that does
            not resolve (see ``resolve_reward``), ``model`` without a ``path`` (or ``path`` elsewhere), or a
            ``path`` that is not a model with a reward head.
    """

    def __init__(self, specs: Sequence[RewardSpec | Mapping[str, Any]]) -> None:
        if not specs:
            raise RewardError("no rewards configured; list at least one, e.g. [{name: accuracy}]")
        self.specs = [_as_spec(s) for s in specs]
        self.names = [s.name for s in self.specs]
        twice = sorted({n for n in self.names if self.names.count(n) > 1})
        if twice:
            raise RewardError(f"reward(s) {twice} listed twice; each name may appear once")
        self.fns = [_resolve(s) for s in self.specs]

    @property
    def needs_rows(self) -> bool:
        """True when a reward model scores token rows (``__call__`` then needs ``rows``)."""
        return MODEL in self.names

    def bind(self, policy: LMM, device: torch.device | str) -> None:
        """Loads every reward model for ``policy``: frozen, on ``device``, its LLM in the policy's dtype.

        Raises:
            RewardError: for a reward model whose tokenizer differs from the policy's, that lacks an encoder for
                one of the policy's modalities, or that marks a medium with another placeholder token.
        """
        for spec, fn in zip(self.specs, self.fns, strict=True):
            if spec.name == MODEL:
                fn.bind(policy, device)

    def __call__(
        self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]], rows: RewardRows | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores each completion against its sample.

        Args:
            completions: ``N`` generated texts.
            samples: ``N`` data records, one per completion, passed to each reward as keyword arguments.
            rows: the ``N`` completions as the policy's token rows, for a reward model (``needs_rows``).

        Returns:
            ``(total, per_reward)``: the weighted sum ``[N]`` float32, and each reward's raw values ``[N]``
            float32 by name.

        Raises:
            RewardError: if the lengths differ, a reward raises (chained), or a reward returns something that
                is not a finite real number (a reward model's score included), the message naming the reward and
                the sample's ``id``; or if a reward model has no ``rows`` or is not bound.
        """
        if len(completions) != len(samples):
            raise RewardError(f"{len(completions)} completions but {len(samples)} samples")
        if self.needs_rows and rows is None:
            raise RewardError("reward 'model' scores the policy's token rows: pass rows= with the completions")
        if self.needs_rows and rows.input_ids.shape[0] != len(completions):
            raise RewardError(f"{len(completions)} completions but {rows.input_ids.shape[0]} token rows")
        per_reward: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for spec, fn in zip(self.specs, self.fns, strict=True):
            if spec.name == MODEL:
                per_reward[spec.name] = fn(rows)  # [N]
                bad = (~torch.isfinite(per_reward[spec.name])).nonzero().flatten().tolist()
                if bad:
                    raise RewardError(
                        f"reward 'model' scored sample {samples[bad[0]].get('id')!r} "
                        f"{per_reward[spec.name][bad[0]].item()}; a reward must be a finite number"
                    )
            else:
                values = [self._score(spec, fn, c, s) for c, s in zip(completions, samples, strict=True)]
                per_reward[spec.name] = torch.tensor(values, dtype=torch.float32)  # [N]
            total += spec.weight * per_reward[spec.name]
        return total, per_reward

    @staticmethod
    def _score(spec: RewardSpec, fn: RewardFn, completion: str, sample: Mapping[str, Any]) -> float:
        sample_id = sample.get("id")
        clash = sorted(spec.kwargs.keys() & sample.keys())
        if clash:
            raise RewardError(
                f"reward {spec.name!r}: kwargs {clash} are also fields of sample {sample_id!r}; rename one"
            )
        try:
            value = fn(completion, **spec.kwargs, **sample)
        except Exception as e:
            raise RewardError(f"reward {spec.name!r} failed on sample {sample_id!r}: {type(e).__name__}: {e}") from e
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(
                f"reward {spec.name!r} returned {value!r} for sample {sample_id!r}; a reward must be a finite number"
            )
        return float(value)
