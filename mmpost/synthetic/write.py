"""The built-in synthetic data set: coloured shapes (and tones), written in every file format the readers take.

Every stage needs data on a machine with no network, and a task whose answer can be checked, so this module
draws small images of shapes (``scenes.py``) and writes:

- caption data for ``align`` in the format of LLaVA's ``blip_laion_cc_sbu_558k.json``;
- instruction data for ``sft`` in the format of LLaVA's ``llava_v1_5_mix665k.json``, and the same samples
  again as webdataset shards;
- held-out questions (colour, shape, count; balanced) in the ``messages`` JSONL format, with the answer kept
  as ``task`` / ``answer`` fields for evaluation, and held-out captions;
- preference pairs for ``dpo`` and counting prompts with checkable answers for ``grpo`` (``rl.py``).

With ``modalities=("image", "audio")`` it also writes the tone clips of ``audio.py`` and samples that
pair an image with a clip; the image files stay what an image-only run writes.

Output is a function of the arguments only: one ``random.Random`` per stream (train images, held-out
images, text), PNGs without timestamps and tar entries with ``mtime=0``, so the same seed gives
byte-identical files.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmpost.synthetic import audio as synth_audio
from mmpost.synthetic import rl as synth_rl
from mmpost.synthetic.files import MANIFEST, Drawn, balanced, clear_previous, write_json, write_jsonl, write_shards
from mmpost.synthetic.scenes import COLOURS, NUMBER_WORDS, SHAPES, TASKS, Scene, draw_scene

_ROLES = {"human": "user", "gpt": "assistant"}  # LLaVA speakers -> messages roles, for the shard jsons
FORMAT_VERSION = 1

_CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Write a short caption.",
    "Give a brief description of the image.",
    "Summarize the picture in a few words.",
    "What does this image show? Answer in a few words.",
    "Provide a short caption for the image.",
)


def synthesize(
    out_dir: str | Path,
    num_train: int = 4000,
    num_heldout: int = 300,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    progress: bool = True,
    modalities: Sequence[str] = ("image",),
) -> dict[str, Any]:
    """Writes the synthetic data set: shapes, tones or both (media, caption / instruction / held-out files, shards).

    Layout under ``out_dir`` with ``"image"`` (image refs in these files are relative to ``images/``)::

        images/train/000000.png ...        num_train images
        images/heldout/000000.png ...      num_heldout images, from a different seed stream
        align.json                         LLaVA 558k caption format, one record per train image
        sft.json                           LLaVA 665k instruction format, one record per train image
        heldout.jsonl                      messages format, one question per held-out image, with task/answer
        heldout_captions.json              LLaVA caption format, one record per held-out image
        shards/sft-000000.tar ...          the sft records as webdataset shards, shard_size per shard
        pairs.json                         messages format, one preference pair per train image: a user-only
                                           prompt, chosen / rejected replies and task (balanced)
        pairs_heldout.jsonl                the same, one pair per held-out image
        unpaired.json                      kto's examples: each pair's prompt with its chosen reply (label true)
                                           or, every other pair, its rejected one (label false)
        pair_shards/pairs-000000.tar ...   the pairs.json records as webdataset shards
        count.json                         messages format, one user-only counting prompt per train image,
                                           with task / answer
        count_heldout.jsonl                one counting question per held-out image, with the reply as its
                                           final assistant turn, and task / answer
        count_shards/count-000000.tar ...  the count.json records as webdataset shards

    with ``"audio"`` (messages format; refs relative to ``out_dir``, so no image root is needed)::

        audio/train/000000.flac ...        num_train clips (16 kHz mono FLAC)
        audio/heldout/000000.flac ...      num_heldout clips, from a different seed stream
        audio_align.json                   one caption record per train clip
        audio_sft.json                     1-3 questions (pitch, beeps, length) per train clip
        audio_heldout.jsonl                one question per held-out clip, with task/answer
        audio_heldout_captions.json        one caption record per held-out clip
        audio_shards/sft-000000.tar ...    the audio sft records as webdataset shards

    with both, also samples holding train (held-out) image ``k`` and clip ``k``, refs relative to ``out_dir``::

        mixed_sft.json                     1-3 questions about either medium per pair
        mixed_heldout.jsonl                one question per held-out pair over all six tasks, with task/answer

    and always ``synth.json``, this function's return value. A shard sample is ``<id>.png`` (``<id>.flac``) +
    ``<id>.json``; the json is ``{"id", "messages", "images": ["png"]}`` (``"audios": ["flac"]``), listing the
    extension keys of the sample's media entries in placeholder order, plus the record's other keys (``chosen``,
    ``rejected``, ``task``, ``answer``) in the pair and count shards.

    Args:
        out_dir: a new or empty directory, or one holding an earlier output (its files are replaced).
        num_train: train images and clips (each gets one caption record and one instruction record, an image
            also a preference pair and a counting prompt).
        num_heldout: held-out images and clips (each gets one question and one caption, an image also a pair
            and a counting question).
        image_size: image width and height in pixels, at least 32.
        seed: the seed of every random stream.
        shard_size: samples per shard (sft, pairs, count).
        progress: show tqdm progress bars.
        modalities: what to write, ``"image"`` and / or ``"audio"``.

    Returns:
        The manifest also written to ``out_dir/synth.json``: format version, parameters, counts and the
        relative names of every file written.

    Raises:
        ValueError: on a bad argument.
        FileExistsError: when ``out_dir`` holds files that are not an earlier output of this function.
    """
    if num_train < 1 or num_heldout < 0 or shard_size < 1:
        raise ValueError(
            f"need num_train >= 1, num_heldout >= 0, shard_size >= 1; got {num_train}, {num_heldout}, {shard_size}"
        )
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 so shapes stay recognisable; got {image_size}")
    given = [modalities] if isinstance(modalities, str) else list(modalities)
    if not given or not set(given) <= {"image", "audio"}:
        raise ValueError(f"modalities must name one or both of 'image', 'audio'; got {given}")
    modalities = [m for m in ("image", "audio") if m in given]
    out = Path(out_dir)
    clear_previous(out)
    params: dict[str, Any] = {
        "num_train": num_train,
        "num_heldout": num_heldout,
        "image_size": image_size,
        "seed": seed,
        "shard_size": shard_size,
    }
    if modalities != ["image"]:  # left out by default, so image-only manifests stay what they always were
        params["modalities"] = modalities
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "params": params, "counts": {}, "files": {}}
    sizes = dict(num_train=num_train, num_heldout=num_heldout, seed=seed, shard_size=shard_size, progress=progress)
    if "image" in modalities:
        images = _write_images(out, manifest, image_size=image_size, **sizes)
    if "audio" in modalities:
        clips = synth_audio.write_audio(out, manifest, **sizes)
        if "image" in modalities:
            synth_audio.write_mixed(out, manifest, images, clips, TASKS, seed)
    manifest["files"] = manifest.pop("files")  # last, where it has always been
    write_json(out / MANIFEST, manifest)
    return manifest


def _write_images(
    out: Path,
    manifest: dict[str, Any],
    *,
    num_train: int,
    num_heldout: int,
    image_size: int,
    seed: int,
    shard_size: int,
    progress: bool,
) -> tuple[Drawn, Drawn]:
    """Writes the shapes part and its manifest entries; returns the train and held-out images as drawn (refs
    relative to ``images/``)."""
    with tqdm(total=num_train + num_heldout, desc="synthesizing shapes", unit="img", disable=not progress) as bar:
        train = _draw_split(out, "train", num_train, random.Random(seed), image_size, bar)
        # A separate stream, so held-out images are not a prefix of the train images of another run.
        heldout = _draw_split(out, "heldout", num_heldout, random.Random(f"{seed}/heldout"), image_size, bar)

    text_rng = random.Random(f"{seed}/text")
    align = [_caption_record(f"align-{i:06d}", ref, scene, text_rng) for i, (scene, ref, _) in enumerate(train)]
    sft = [_sft_record(f"sft-{i:06d}", ref, scene, text_rng) for i, (scene, ref, _) in enumerate(train)]
    heldout_captions = [
        _caption_record(f"heldout-cap-{i:06d}", ref, scene, text_rng) for i, (scene, ref, _) in enumerate(heldout)
    ]
    tasks = balanced(TASKS, num_heldout, text_rng)
    questions = [
        _heldout_line(f"heldout-{i:06d}", ref, scene, task, text_rng)
        for i, ((scene, ref, _), task) in enumerate(zip(heldout, tasks, strict=True))
    ]

    write_json(out / "align.json", align)
    write_json(out / "sft.json", sft)
    write_json(out / "heldout_captions.json", heldout_captions)
    write_jsonl(out / "heldout.jsonl", questions)
    records = [{"id": r["id"], "messages": _messages(r["conversations"])} for r in sft]
    shards = write_shards(out, "shards", records, [png for _, _, png in train], "image", "png", shard_size)

    manifest["counts"].update(
        train_images=num_train,
        heldout_images=num_heldout,
        align=len(align),
        sft=len(sft),
        heldout=len(questions),
        heldout_captions=len(heldout_captions),
        shards=len(shards),
        heldout_tasks={task: tasks.count(task) for task in TASKS},
    )
    manifest["image_root"] = "images"
    manifest["shard_urls"] = f"shards/sft-{{000000..{len(shards) - 1:06d}}}.tar"
    manifest["files"].update(
        align="align.json",
        sft="sft.json",
        heldout="heldout.jsonl",
        heldout_captions="heldout_captions.json",
        shards=shards,
        images=[f"images/{ref}" for _, ref, _ in train + heldout],
    )
    choices = {"colour": tuple(COLOURS), "shape": SHAPES, "count": tuple(NUMBER_WORDS)}
    synth_rl.write_rl(out, manifest, (train, heldout), choices, seed=seed, shard_size=shard_size)
    return train, heldout


def _draw_split(
    out: Path, split: str, n: int, rng: random.Random, image_size: int, bar: tqdm
) -> list[tuple[Scene, str, bytes]]:
    """Draws and saves ``n`` images; returns (scene, ref relative to ``images/``, PNG bytes) for each."""
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    for i in range(n):
        scene, image = draw_scene(rng, image_size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png = buffer.getvalue()
        (folder / f"{i:06d}.png").write_bytes(png)
        drawn.append((scene, f"{split}/{i:06d}.png", png))
        bar.update()
    return drawn


def _caption_record(sample_id: str, ref: str, scene: Scene, rng: random.Random) -> dict[str, Any]:
    prompt = rng.choice(_CAPTION_PROMPTS)
    # LLaVA's 558k file puts <image> before or after the prompt; do both so neither is learnt as a rule.
    text = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
    return {
        "id": sample_id,
        "image": ref,
        "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": scene.caption()}],
    }


def _sft_record(sample_id: str, ref: str, scene: Scene, rng: random.Random) -> dict[str, Any]:
    tasks = rng.sample(TASKS, rng.randint(1, len(TASKS)))
    conversations = []
    for turn, task in enumerate(tasks):
        question = scene.question(task, rng)
        conversations.append({"from": "human", "value": f"<image>\n{question}" if turn == 0 else question})
        conversations.append({"from": "gpt", "value": scene.reply(task)})
    return {"id": sample_id, "image": ref, "conversations": conversations}


def _heldout_line(sample_id: str, ref: str, scene: Scene, task: str, rng: random.Random) -> dict[str, Any]:
    return {
        "id": sample_id,
        "messages": [
            {"role": "user", "content": f"<image>\n{scene.question(task, rng)}"},
            {"role": "assistant", "content": scene.reply(task)},
        ],
        "images": [ref],
        "task": task,
        "answer": scene.answer(task),
    }


def _messages(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": _ROLES[t["from"]], "content": t["value"]} for t in conversations]
