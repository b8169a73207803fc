"""The built-in synthetic data set: coloured shapes, written in every file format the readers take.

Every stage needs data on a machine with no network, and a task whose answer can be checked, so this module
draws small images of 1-3 shapes of one type (circle / square / triangle) and one colour (red / green / blue /
yellow) and writes:

- caption data for ``align`` in the format of LLaVA's ``blip_laion_cc_sbu_558k.json``;
- instruction data for ``sft`` in the format of LLaVA's ``llava_v1_5_mix665k.json``, and the same samples
  again as webdataset shards;
- held-out questions (colour, shape, count; balanced) in the ``messages`` JSONL format, with the answer kept
  as ``task`` / ``answer`` fields for evaluation, and held-out captions.

Shapes sit in distinct cells of a 3x3 grid with a little jitter in size and position and at least one
background pixel between cells, so they never overlap or touch and a count is unambiguous; colours are
saturated and far apart so the colour word is too. Drawing uses PIL without antialiasing, so every pixel is
either the background or the shape's exact colour (``COLOURS``), which the tests rely on.

Output is a function of the arguments only: one ``random.Random`` per stream (train images, held-out
images, text), PNGs without timestamps and tar entries with ``mtime=0``, so the same seed gives
byte-identical files.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 0, 0),
    "green": (0, 170, 0),
    "blue": (0, 0, 230),
    "yellow": (250, 210, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TASKS: tuple[str, ...] = ("colour", "shape", "count")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

MANIFEST = "synth.json"
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
# Singular phrasings for one shape, plural for several, so every question reads as correct English.
_QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (
        ("What colour is the shape?", "What color is the shape?", "Which colour is the shape?"),
        ("What colour are the shapes?", "What color are the shapes?", "Which colour are the shapes?"),
    ),
    "shape": (
        ("What shape is it?", "Which shape is shown?"),
        ("What shape are they?", "Which shape is shown?"),
    ),
    "count": (
        ("How many shapes are there?", "How many shapes are in the image?"),
        ("How many shapes are there?", "How many shapes are in the image?"),
    ),
}


@dataclass(frozen=True)
class Scene:
    """What one synthetic image shows: ``count`` shapes, all of type ``shape`` and colour ``colour``."""

    shape: str
    colour: str
    count: int

    def caption(self) -> str:
        plural = "s" if self.count > 1 else ""
        return f"{NUMBER_WORDS[self.count]} {self.colour} {self.shape}{plural}."

    def answer(self, task: str) -> str:
        """The short answer key of ``task``: ``"red"``, ``"circle"`` or ``"2"``."""
        return {"colour": self.colour, "shape": self.shape, "count": str(self.count)}[task]

    def reply(self, task: str) -> str:
        """The assistant's reply: a capitalised word with a period, or a digit."""
        return str(self.count) if task == "count" else f"{self.answer(task).capitalize()}."

    def question(self, task: str, rng: random.Random) -> str:
        return rng.choice(_QUESTIONS[task][self.count > 1])


def draw_scene(rng: random.Random, image_size: int = 64) -> tuple[Scene, Image.Image]:
    """Draws one random scene.

    Args:
        rng: the only source of randomness, so a seeded ``rng`` gives the same image every time.
        image_size: width and height in pixels (at least 32).

    Returns:
        The scene and its RGB image.
    """
    scene = Scene(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), count=rng.randint(1, 3))
    cell = image_size // 3
    # 12-18 px at 64x64; the upper bound leaves >= 1 px of slack, so a shape fits inside its cell with a
    # one-pixel margin on every side and neighbours are always >= 2 px apart.
    max_size = min(round(image_size * 18 / 64), cell - 3)
    min_size = min(round(image_size * 12 / 64), max_size)
    background = tuple(rng.randint(228, 255) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    for index in rng.sample(range(9), scene.count):
        row, col = divmod(index, 3)
        size = rng.randint(min_size, max_size)
        slack = cell - 2 - size
        x0 = col * cell + 1 + rng.randint(0, slack)
        y0 = row * cell + 1 + rng.randint(0, slack)
        x1, y1 = x0 + size - 1, y0 + size - 1  # PIL boxes are inclusive
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return scene, image


def synthesize(
    out_dir: str | Path,
    num_train: int = 4000,
    num_heldout: int = 300,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes the synthetic shapes data set (images, caption / instruction / held-out files, shards).

    Layout under ``out_dir`` (image refs in the JSON files are relative to ``images/``)::

        images/train/000000.png ...        num_train images
        images/heldout/000000.png ...      num_heldout images, from a different seed stream
        align.json                         LLaVA 558k caption format, one record per train image
        sft.json                           LLaVA 665k instruction format, one record per train image
        heldout.jsonl                      messages format, one question per held-out image, with task/answer
        heldout_captions.json              LLaVA caption format, one record per held-out image
        shards/sft-000000.tar ...          the sft records as webdataset shards, shard_size per shard
        synth.json                         this function's return value

    A shard sample is ``<id>.png`` + ``<id>.json``; the json is ``{"id", "messages", "images": ["png"]}``, where
    ``images`` lists the extension keys of the sample's image entries in placeholder order.

    Args:
        out_dir: a new or empty directory, or one holding an earlier output (its files are replaced).
        num_train: train images (each gets one caption record and one instruction record).
        num_heldout: held-out images (each gets one question and one caption).
        image_size: image width and height in pixels, at least 32.
        seed: the seed of every random stream.
        shard_size: sft samples per shard.
        progress: show a tqdm progress bar.

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
    out = Path(out_dir)
    _clear_previous(out)
    params = {
        "num_train": num_train,
        "num_heldout": num_heldout,
        "image_size": image_size,
        "seed": seed,
        "shard_size": shard_size,
    }

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
    # Balanced tasks: as equal as num_heldout allows, in a shuffled order.
    tasks = [TASKS[i % len(TASKS)] for i in range(num_heldout)]
    text_rng.shuffle(tasks)
    questions = [
        _heldout_line(f"heldout-{i:06d}", ref, scene, task, text_rng)
        for i, ((scene, ref, _), task) in enumerate(zip(heldout, tasks, strict=True))
    ]

    _write_json(out / "align.json", align)
    _write_json(out / "sft.json", sft)
    _write_json(out / "heldout_captions.json", heldout_captions)
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in questions)
    shards = _write_shards(out, sft, [png for _, _, png in train], shard_size)

    manifest = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "counts": {
            "train_images": num_train,
            "heldout_images": num_heldout,
            "align": len(align),
            "sft": len(sft),
            "heldout": len(questions),
            "heldout_captions": len(heldout_captions),
            "shards": len(shards),
            "heldout_tasks": {task: tasks.count(task) for task in TASKS},
        },
        "image_root": "images",
        "shard_urls": f"shards/sft-{{000000..{len(shards) - 1:06d}}}.tar",
        "files": {
            "align": "align.json",
            "sft": "sft.json",
            "heldout": "heldout.jsonl",
            "heldout_captions": "heldout_captions.json",
            "shards": shards,
            "images": [f"images/{ref}" for _, ref, _ in train + heldout],
        },
    }
    _write_json(out / MANIFEST, manifest)
    return manifest


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


def _write_shards(out: Path, sft: list[dict[str, Any]], pngs: list[bytes], shard_size: int) -> list[str]:
    """Writes the sft records as shards of ``<id>.png`` + ``<id>.json``; returns the shard names."""
    (out / "shards").mkdir(exist_ok=True)
    names = []
    for k, start in enumerate(range(0, len(sft), shard_size)):
        name = f"shards/sft-{k:06d}.tar"
        # mtime=0 and pre-encoded bytes (encoder=False) keep the tar byte-identical across runs.
        with wds.TarWriter(str(out / name), encoder=False, mtime=0) as writer:
            for record, png in zip(sft[start : start + shard_size], pngs[start : start + shard_size], strict=True):
                messages = [{"role": _ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
                meta = {"id": record["id"], "messages": messages, "images": ["png"]}
                writer.write({"__key__": record["id"], "png": png, "json": json.dumps(meta).encode("utf-8")})
        names.append(name)
    return names


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _clear_previous(out: Path) -> None:
    """Removes an earlier output's files; refuses a non-empty directory that is not one."""
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise FileExistsError(
            f"{out} is not empty and holds no {MANIFEST} from an earlier synthesize(); choose a new or empty directory"
        )
    # Only the files the earlier run listed are removed, so a user's other files in the folder survive; a
    # smaller new run must not leave stale shards behind for a directory reader to pick up.
    files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    for entry in files.values():
        for name in [entry] if isinstance(entry, str) else entry:
            (out / name).unlink(missing_ok=True)
    manifest_path.unlink()
