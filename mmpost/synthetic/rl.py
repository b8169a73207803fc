"""The preference and reward part of the built-in synthetic data set: DPO pairs and GRPO counting prompts.

``synth.synthesize`` calls ``write_rl`` with the shapes it drew, and it writes, in the ``messages`` format with
image refs relative to ``images/``:

- preference pairs for ``dpo``: one question per image (colour, shape or count; balanced) as a user-only
  prompt, with ``chosen`` the true reply and ``rejected`` the reply a wrong value of the same task would get
  (another colour, another shape, another count in 1-3), in the same format (``"Red."``, ``"2"``);
- reward-model pairs for ``rm`` (``reward_pairs.json``, ``reward_pairs_heldout.jsonl``): the same questions with
  the true reply as ``chosen`` and, as ``rejected``, one of the replies a policy may sample when RL pushes it off
  its data: a wrong value of the same task (half of them), the reply to another task (``"Red."`` to a count
  question), a value no scene has (``"4"``, ``"Purple."``), the true reply repeated, or nothing at all; a reward
  model that saw only the first kind scores the others at random, and PPO finds them;
- counting prompts for ``grpo``: "how many shapes" as a user-only prompt, with the digit as ``answer`` for a
  verifiable reward; the held-out copy keeps the reply as a final assistant turn so an evaluator can compare
  a generated answer with it.

Where this departs from the papers: DPO's pairs are two samples of a policy ranked by people, here the
rejected reply is a constructed wrong answer, so the pairs are off-policy and differ in one word; GRPO's
rewards come from a checker, here exact match with ``answer`` is all there is to check.

Every record is drawn from one ``random.Random(f"{seed}/rl")``, a stream no other file uses, so these files
change no byte of the others.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpost.synthetic.files import Drawn, balanced, write_json, write_jsonl, write_shards

if TYPE_CHECKING:
    from mmpost.synthetic.scenes import Scene


def write_rl(
    out: Path,
    manifest: dict[str, Any],
    images: tuple[Drawn, Drawn],
    choices: Mapping[str, Sequence[Any]],
    *,
    seed: int,
    shard_size: int,
) -> None:
    """Writes the pair and counting files with their shards, and their manifest entries.

    Args:
        out: the output folder of ``synth.synthesize``.
        manifest: its manifest, whose ``counts`` and ``files`` gain the new entries.
        images: train and held-out images as drawn by ``synth.py`` (scene, ref relative to ``images/``, PNG).
        choices: every value each task can take, keyed by task, which is also the name of the ``Scene`` field
            it asks about: ``{"colour": ("red", ...), "shape": ("circle", ...), "count": (1, 2, 3)}``.
        seed: the seed of ``synthesize``.
        shard_size: samples per shard.
    """
    train, heldout = images
    rng = random.Random(f"{seed}/rl")
    tasks = tuple(choices)
    train_tasks = balanced(tasks, len(train), rng)
    pairs = [
        _pair(f"pair-{i:06d}", scene, ref, task, choices, rng)
        for i, ((scene, ref, _), task) in enumerate(zip(train, train_tasks, strict=True))
    ]
    heldout_tasks = balanced(tasks, len(heldout), rng)
    pairs_heldout = [
        _pair(f"pair-heldout-{i:06d}", scene, ref, task, choices, rng)
        for i, ((scene, ref, _), task) in enumerate(zip(heldout, heldout_tasks, strict=True))
    ]
    count = [_count(f"count-{i:06d}", scene, ref, rng, reply=False) for i, (scene, ref, _) in enumerate(train)]
    count_heldout = [
        _count(f"count-heldout-{i:06d}", scene, ref, rng, reply=True) for i, (scene, ref, _) in enumerate(heldout)
    ]

    rm_rng = random.Random(f"{seed}/rm")  # a stream of its own: the files above keep every byte
    reward_pairs = [
        _reward_pair(f"reward-pair-{i:06d}", scene, ref, task, choices, rm_rng)
        for i, ((scene, ref, _), task) in enumerate(zip(train, train_tasks, strict=True))
    ]
    reward_pairs_heldout = [
        _reward_pair(f"reward-pair-heldout-{i:06d}", scene, ref, task, choices, rm_rng)
        for i, ((scene, ref, _), task) in enumerate(zip(heldout, heldout_tasks, strict=True))
    ]

    write_json(out / "pairs.json", pairs)
    write_json(out / "reward_pairs.json", reward_pairs)
    write_jsonl(out / "reward_pairs_heldout.jsonl", reward_pairs_heldout)
    write_json(out / "unpaired.json", [_unpaired(p, i % 2 == 0) for i, p in enumerate(pairs)])
    write_jsonl(out / "pairs_heldout.jsonl", pairs_heldout)
    write_json(out / "count.json", count)
    write_jsonl(out / "count_heldout.jsonl", count_heldout)
    pngs = [png for _, _, png in train]
    pair_shards = write_shards(out, "pair_shards", pairs, pngs, "image", "png", shard_size, prefix="pairs")
    count_shards = write_shards(out, "count_shards", count, pngs, "image", "png", shard_size, prefix="count")

    manifest["counts"].update(
        pairs=len(pairs),
        unpaired=len(pairs),
        pairs_heldout=len(pairs_heldout),
        reward_pairs=len(reward_pairs),
        reward_pairs_heldout=len(reward_pairs_heldout),
        count=len(count),
        count_heldout=len(count_heldout),
        pair_shards=len(pair_shards),
        count_shards=len(count_shards),
        pairs_tasks={task: train_tasks.count(task) for task in tasks},
        pairs_heldout_tasks={task: heldout_tasks.count(task) for task in tasks},
    )
    manifest["pair_shard_urls"] = f"pair_shards/pairs-{{000000..{len(pair_shards) - 1:06d}}}.tar"
    manifest["count_shard_urls"] = f"count_shards/count-{{000000..{len(count_shards) - 1:06d}}}.tar"
    manifest["files"].update(
        pairs="pairs.json",
        unpaired="unpaired.json",
        pairs_heldout="pairs_heldout.jsonl",
        reward_pairs="reward_pairs.json",
        reward_pairs_heldout="reward_pairs_heldout.jsonl",
        count="count.json",
        count_heldout="count_heldout.jsonl",
        pair_shards=pair_shards,
        count_shards=count_shards,
    )


def _pair(
    sample_id: str, scene: Scene, ref: str, task: str, choices: Mapping[str, Sequence[Any]], rng: random.Random
) -> dict[str, Any]:
    question = scene.question(task, rng)
    wrong = rng.choice([value for value in choices[task] if value != getattr(scene, task)])
    return {
        "id": sample_id,
        "messages": [{"role": "user", "content": f"<image>\n{question}"}],
        "chosen": scene.reply(task),
        "rejected": dataclasses.replace(scene, **{task: wrong}).reply(task),
        "images": [ref],
        "task": task,
    }


# values no scene of the data set has, as a policy off its data may answer them
_UNSEEN = {"colour": ("purple", "black"), "shape": ("star", "hexagon"), "count": (0, 4, 5)}


def _reward_pair(
    sample_id: str, scene: Scene, ref: str, task: str, choices: Mapping[str, Sequence[Any]], rng: random.Random
) -> dict[str, Any]:
    """A pair for a reward model: the true reply against a wrong one drawn from the kinds a sampling policy
    produces (see the module docstring)."""
    pair = _pair(sample_id, scene, ref, task, choices, rng)
    kind = rng.choices(("wrong", "other_task", "unseen", "repeated", "empty"), weights=(5, 2, 1, 1, 1))[0]
    if kind == "other_task":
        pair["rejected"] = scene.reply(rng.choice([t for t in choices if t != task]))
    elif kind == "unseen":
        value = rng.choice(_UNSEEN[task])
        pair["rejected"] = str(value) if task == "count" else f"{str(value).capitalize()}."
    elif kind == "repeated":
        pair["rejected"] = " ".join([pair["chosen"]] * rng.randint(2, 3))
    elif kind == "empty":
        pair["rejected"] = ""
    return pair | {"rejected_kind": kind}


def _unpaired(pair: dict[str, Any], desirable: bool) -> dict[str, Any]:
    """KTO's example from a pair: its prompt with the chosen answer (desirable) or the rejected one."""
    completion = pair["chosen"] if desirable else pair["rejected"]
    fields = {k: v for k, v in pair.items() if k not in ("chosen", "rejected")}
    return fields | {"id": pair["id"].replace("pair", "unpaired"), "completion": completion, "label": desirable}


def _count(sample_id: str, scene: Scene, ref: str, rng: random.Random, *, reply: bool) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"<image>\n{scene.question('count', rng)}"}]
    if reply:
        messages.append({"role": "assistant", "content": scene.reply("count")})
    return {"id": sample_id, "messages": messages, "images": [ref], "task": "count", "answer": scene.answer("count")}
