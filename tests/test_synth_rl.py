"""The synthetic preference pairs and counting prompts: right answers, wrong answers that are really wrong, and
files every reader takes."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from mmpost.data.sources import iter_shards, read_records
from mmpost.synthetic.scenes import COLOURS, NUMBER_WORDS, SHAPES, TASKS, Scene
from mmpost.synthetic.write import synthesize

NUM_TRAIN, NUM_HELDOUT, SHARD_SIZE = 12, 6, 5
VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "count": tuple(NUMBER_WORDS)}
NEW_FILES = ["pairs.json", "pairs_heldout.jsonl", "count.json", "count_heldout.jsonl"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_rl")
    synthesize(out, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT, shard_size=SHARD_SIZE, seed=3, progress=False)
    return out


def _scenes(out: Path) -> dict[str, Scene]:
    """Image ref -> scene, from the captions (whose agreement with the pixels test_data_sources.py checks)."""
    words = {word: n for n, word in NUMBER_WORDS.items()}
    scenes = {}
    for name in ("align.json", "heldout_captions.json"):
        for record in json.loads((out / name).read_text()):
            number, colour, shape = record["conversations"][1]["value"].rstrip(".").split()
            scenes[record["image"]] = Scene(shape=shape.removesuffix("s"), colour=colour, count=words[number])
    return scenes


def _manifest(out: Path) -> dict:
    return json.loads((out / "synth.json").read_text())


def _check_pair(scene: Scene, meta: dict) -> None:
    task, chosen, rejected = meta["task"], meta["chosen"], meta["rejected"]
    assert chosen == scene.reply(task) and rejected != chosen
    # The rejected reply is the reply to the same question about an image with one other value of the task.
    wrong = [dataclasses.replace(scene, **{task: v}).reply(task) for v in VALUES[task] if v != getattr(scene, task)]
    assert rejected in wrong
    if task == "count":
        assert rejected in {"1", "2", "3"}
    else:
        assert rejected.endswith(".") and rejected[:-1].lower() in VALUES[task] and rejected[0].isupper()


@pytest.mark.parametrize(("name", "split"), [("pairs.json", "train"), ("pairs_heldout.jsonl", "heldout")])
def test_pairs_prefer_the_true_reply_over_a_wrong_one(synth, name, split):
    scenes = _scenes(synth)
    samples = read_records(synth / name, image_root=synth / "images")
    assert len(samples) == (NUM_TRAIN if split == "train" else NUM_HELDOUT)
    for sample in samples:
        # A prompt: one user turn, no reply, so DPO scores chosen and rejected as its continuations.
        assert [m["role"] for m in sample.messages] == ["user"]
        assert sample.messages[0]["content"].startswith("<image>\n")
        (image,) = sample.media["image"]
        ref = image.relative_to(synth / "images").as_posix()
        assert ref.startswith(f"{split}/")
        _check_pair(scenes[ref], sample.meta)
    tasks = Counter(s.meta["task"] for s in samples)
    assert set(tasks) == set(TASKS) and max(tasks.values()) - min(tasks.values()) <= 1
    key = "pairs_tasks" if split == "train" else "pairs_heldout_tasks"
    assert _manifest(synth)["counts"][key] == dict(tasks)


def test_count_prompts_carry_the_answer(synth):
    scenes = _scenes(synth)
    train = read_records(synth / "count.json", image_root=synth / "images")
    heldout = read_records(synth / "count_heldout.jsonl", image_root=synth / "images")
    assert (len(train), len(heldout)) == (NUM_TRAIN, NUM_HELDOUT)
    for sample in train + heldout:
        (image,) = sample.media["image"]
        scene = scenes[image.relative_to(synth / "images").as_posix()]
        assert sample.meta == {"task": "count", "answer": str(scene.count)}
        assert sample.messages[0]["role"] == "user" and sample.messages[0]["content"].startswith("<image>\nHow many")
    assert all(len(s.messages) == 1 for s in train)
    # The held-out copy ends with the reply, so an evaluator can compare a generated answer with it.
    assert all([m["role"] for m in s.messages] == ["user", "assistant"] for s in heldout)
    assert all(s.messages[1]["content"] == s.meta["answer"] for s in heldout)
    assert {s.meta["answer"] for s in train + heldout} <= {"1", "2", "3"}


@pytest.mark.parametrize(
    ("folder", "prefix", "name"), [("pair_shards", "pairs", "pairs.json"), ("count_shards", "count", "count.json")]
)
def test_shards_hold_the_records_and_their_images(synth, folder, prefix, name):
    shards = _manifest(synth)["files"][folder]
    assert shards == [f"{folder}/{prefix}-{k:06d}.tar" for k in range(-(-NUM_TRAIN // SHARD_SIZE))]
    expected = {s.id: s for s in read_records(synth / name, image_root=synth / "images")}
    samples = list(iter_shards([synth / shard for shard in shards]))
    assert [s.id for s in samples] == list(expected)
    for sample in samples:
        want = expected[sample.id]
        # chosen / rejected / task / answer reach Sample.meta from a shard as they do from the JSON file.
        assert sample.messages == want.messages and sample.meta == want.meta
        (png,) = sample.media["image"]
        assert png == want.media["image"][0].read_bytes()


def test_same_seed_gives_identical_bytes_and_the_manifest_lists_every_file(synth, tmp_path):
    manifest = _manifest(synth)
    files = manifest["files"]
    new = [*NEW_FILES, *files["pair_shards"], *files["count_shards"]]
    listed = {n for entry in files.values() for n in ([entry] if isinstance(entry, str) else entry)}
    assert set(new) <= listed
    assert {str(p.relative_to(synth)) for p in synth.rglob("*") if p.is_file()} == listed | {"synth.json"}
    assert manifest["pair_shard_urls"] == "pair_shards/pairs-{000000..000002}.tar"
    assert manifest["count_shard_urls"] == "count_shards/count-{000000..000002}.tar"
    again = tmp_path / "again"
    synthesize(again, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT, shard_size=SHARD_SIZE, seed=3, progress=False)
    for name in new:
        assert (synth / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize(other, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT, shard_size=SHARD_SIZE, seed=4, progress=False)
    for name in NEW_FILES:
        assert (synth / name).read_bytes() != (other / name).read_bytes(), name


def test_a_smaller_second_run_leaves_no_stale_shards(tmp_path):
    synthesize(tmp_path, num_train=6, num_heldout=2, shard_size=2, progress=False)
    synthesize(tmp_path, num_train=3, num_heldout=1, shard_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "pair_shards").iterdir()) == ["pairs-000000.tar", "pairs-000001.tar"]
    assert sorted(p.name for p in (tmp_path / "count_shards").iterdir()) == ["count-000000.tar", "count-000001.tar"]
    synthesize(tmp_path, num_train=3, num_heldout=1, progress=False, modalities=["audio"])
    assert not (tmp_path / "pair_shards").exists() and not (tmp_path / "pairs.json").exists()
