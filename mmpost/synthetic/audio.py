"""The audio half of the built-in synthetic data set: tone clips whose answers can be checked.

A clip holds 1-3 beeps of one pitch class (low / middle / high, around 300 / 700 / 1600 Hz) and one length
class (short / long, around 0.12 / 0.35 s), separated by silent gaps of at least 0.1 s, after a random
lead-in and before a random tail, so clips run 0.6-2.6 s. Pitch and length jitter by at most 4% and 10%,
which keeps the classes far apart: an FFT peak tells the pitch, an energy envelope the count and the length
(the tests check every label that way). Each beep has a 10 ms raised-cosine fade at both ends (no clicks)
and its own amplitude; faint Gaussian noise (about -54 dBFS) covers the whole clip. Clips are 16 kHz mono.

``synth.synthesize`` calls ``write_audio`` for the tone files (captions, questions, held-out questions and
captions, shards; all in the ``messages`` format with refs relative to the output folder) and ``write_mixed``
for samples that pair an image with a clip. Every stream has its own seeded ``random.Random``, and FLAC from
libsndfile carries no timestamp, so a seed gives byte-identical files (with the same libsndfile, whose
version string is in each file).
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile
from tqdm import tqdm

from mmpost.synthetic.files import Drawn, balanced, write_json, write_jsonl, write_shards

if TYPE_CHECKING:
    from mmpost.synthetic.scenes import Scene

SAMPLE_RATE = 16_000
PITCHES: dict[str, float] = {"low": 300.0, "middle": 700.0, "high": 1600.0}  # Hz
LENGTHS: dict[str, float] = {"short": 0.12, "long": 0.35}  # seconds
AUDIO_TASKS: tuple[str, ...] = ("pitch", "beeps", "length")
MIN_SECONDS, MAX_SECONDS = 0.6, 2.6

_PITCH_JITTER, _LENGTH_JITTER = 0.04, 0.10
_GAP = (0.10, 0.22)  # silence between beeps, seconds
_FADE = 0.010  # seconds of raised-cosine fade at each end of a beep
_NOISE = 0.002  # standard deviation of the background noise
_BEEP_WORDS = {1: "One", 2: "Two", 3: "Three"}

_CAPTION_PROMPTS = (
    "Describe the sound briefly.",
    "Write a short caption for the audio.",
    "Give a brief description of the clip.",
    "Summarize the audio in a few words.",
    "What does this clip contain? Answer in a few words.",
    "Provide a short caption for the sound.",
)
# Singular phrasings for one beep, plural for several, so every question reads as correct English.
_QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pitch": (
        ("Is the beep low, middle or high in pitch?", "What is the pitch of the beep: low, middle or high?"),
        ("Are the beeps low, middle or high in pitch?", "What is the pitch of the beeps: low, middle or high?"),
    ),
    "beeps": (
        ("How many beeps are there?", "How many beeps do you hear?", "How many beeps are in the clip?"),
        ("How many beeps are there?", "How many beeps do you hear?", "How many beeps are in the clip?"),
    ),
    "length": (
        ("Is the beep short or long?", "How long is the beep: short or long?"),
        ("Are the beeps short or long?", "How long are the beeps: short or long?"),
    ),
}


@dataclass(frozen=True)
class Tones:
    """What one synthetic clip holds: ``beeps`` beeps, all of pitch class ``pitch`` and length class ``length``."""

    pitch: str
    length: str
    beeps: int

    def caption(self) -> str:
        plural = "s" if self.beeps > 1 else ""
        return f"{_BEEP_WORDS[self.beeps]} {self.length} {self.pitch} beep{plural}."

    def answer(self, task: str) -> str:
        """The short answer key of ``task``: ``"high"``, ``"2"`` or ``"long"``."""
        return {"pitch": self.pitch, "beeps": str(self.beeps), "length": self.length}[task]

    def reply(self, task: str) -> str:
        """The assistant's reply: a capitalised word with a period, or a digit."""
        return str(self.beeps) if task == "beeps" else f"{self.answer(task).capitalize()}."

    def question(self, task: str, rng: random.Random) -> str:
        return rng.choice(_QUESTIONS[task][self.beeps > 1])


def draw_tones(rng: random.Random) -> tuple[Tones, np.ndarray]:
    """Draws one random clip.

    Args:
        rng: the only source of randomness, so a seeded ``rng`` gives the same clip every time.

    Returns:
        The clip's labels and its ``[samples]`` float32 waveform at ``SAMPLE_RATE``, within [-1, 1].
    """
    tones = Tones(pitch=rng.choice(list(PITCHES)), length=rng.choice(list(LENGTHS)), beeps=rng.randint(1, 3))
    frequency = PITCHES[tones.pitch] * rng.uniform(1 - _PITCH_JITTER, 1 + _PITCH_JITTER)
    durations = [
        LENGTHS[tones.length] * rng.uniform(1 - _LENGTH_JITTER, 1 + _LENGTH_JITTER) for _ in range(tones.beeps)
    ]
    gaps = [rng.uniform(*_GAP) for _ in range(tones.beeps - 1)]
    content = sum(durations) + sum(gaps)
    # At least 50 ms of silence on each side and at most 1.2 s of it in all.
    total = rng.uniform(max(MIN_SECONDS, content + 0.1), min(MAX_SECONDS, content + 1.2))
    lead_in = 0.05 + rng.random() * (total - content - 0.1)

    wave = np.zeros(round(total * SAMPLE_RATE), dtype=np.float64)
    fade = np.sin(np.linspace(0, np.pi / 2, round(_FADE * SAMPLE_RATE))) ** 2  # raised cosine, 0 -> 1
    start = lead_in
    amplitude = rng.uniform(0.4, 0.6)
    for k, duration in enumerate(durations):
        n = round(duration * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        beep = amplitude * rng.uniform(0.9, 1.1) * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
        beep[: len(fade)] *= fade
        beep[n - len(fade) :] *= fade[::-1]
        i = round(start * SAMPLE_RATE)
        wave[i : i + n] += beep
        start += duration + (gaps[k] if k < len(gaps) else 0.0)
    noise = np.random.default_rng(rng.getrandbits(64)).standard_normal(len(wave))
    wave += _NOISE * noise
    return tones, np.clip(wave, -1.0, 1.0).astype(np.float32)


def encode_flac(wave: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """16-bit FLAC bytes of a mono float waveform."""
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def write_audio(
    out: Path, manifest: dict[str, Any], *, num_train: int, num_heldout: int, seed: int, shard_size: int, progress: bool
) -> tuple[Drawn, Drawn]:
    """Writes the tones part of ``synth.synthesize`` (clips, caption / instruction / held-out files, shards) and
    its manifest entries.

    Returns:
        The train and held-out clips as drawn: (tones, ref relative to ``out``, FLAC bytes) each.
    """
    with tqdm(total=num_train + num_heldout, desc="synthesizing tones", unit="clip", disable=not progress) as bar:
        train = _draw_clips(out, "train", num_train, random.Random(f"{seed}/audio"), bar)
        # A separate stream, so held-out clips are not a prefix of the train clips of another run.
        heldout = _draw_clips(out, "heldout", num_heldout, random.Random(f"{seed}/audio-heldout"), bar)

    rng = random.Random(f"{seed}/audio-text")
    align = [_caption_record(f"audio-align-{i:06d}", ref, tones, rng) for i, (tones, ref, _) in enumerate(train)]
    sft = [_sft_record(f"audio-sft-{i:06d}", ref, tones, rng) for i, (tones, ref, _) in enumerate(train)]
    captions = [
        _caption_record(f"audio-heldout-cap-{i:06d}", ref, tones, rng) for i, (tones, ref, _) in enumerate(heldout)
    ]
    tasks = balanced(AUDIO_TASKS, num_heldout, rng)
    questions = []
    for i, ((tones, ref, _), task) in enumerate(zip(heldout, tasks, strict=True)):
        record = _record(f"audio-heldout-{i:06d}", [(f"<audio>\n{tones.question(task, rng)}", tones.reply(task))])
        questions.append({**record, "audios": [ref], "task": task, "answer": tones.answer(task)})

    write_json(out / "audio_align.json", align)
    write_json(out / "audio_sft.json", sft)
    write_json(out / "audio_heldout_captions.json", captions)
    write_jsonl(out / "audio_heldout.jsonl", questions)
    shards = write_shards(out, "audio_shards", sft, [flac for _, _, flac in train], "audio", "flac", shard_size)

    manifest["counts"].update(
        train_clips=num_train,
        heldout_clips=num_heldout,
        audio_align=len(align),
        audio_sft=len(sft),
        audio_heldout=len(questions),
        audio_heldout_captions=len(captions),
        audio_shards=len(shards),
        audio_heldout_tasks={task: tasks.count(task) for task in AUDIO_TASKS},
    )
    manifest["audio_shard_urls"] = f"audio_shards/sft-{{000000..{len(shards) - 1:06d}}}.tar"
    manifest["files"].update(
        audio_align="audio_align.json",
        audio_sft="audio_sft.json",
        audio_heldout="audio_heldout.jsonl",
        audio_heldout_captions="audio_heldout_captions.json",
        audio_shards=shards,
        audios=[ref for _, ref, _ in train + heldout],
    )
    return train, heldout


def write_mixed(
    out: Path,
    manifest: dict[str, Any],
    images: tuple[Drawn, Drawn],
    clips: tuple[Drawn, Drawn],
    image_tasks: Sequence[str],
    seed: int,
) -> None:
    """Writes samples of image ``k`` with clip ``k`` of the same split, and their manifest entries.

    ``mixed_sft.json`` asks 1-3 questions per pair, ``mixed_heldout.jsonl`` one per held-out pair, balanced
    over ``image_tasks`` and ``AUDIO_TASKS``. Both placeholders open the first user turn.

    Args:
        images: train and held-out images as drawn by ``synth.py`` (scene, ref relative to ``images/``, bytes).
        clips: train and held-out clips as ``write_audio`` returns them.
        image_tasks: the tasks the image scenes answer (``synth.TASKS``).
    """
    rng = random.Random(f"{seed}/mixed-text")
    all_tasks = (*image_tasks, *AUDIO_TASKS)

    def record(
        sample_id: str, image: tuple[Scene, str, bytes], clip: tuple[Tones, str, bytes], tasks: Sequence[str]
    ) -> dict[str, Any]:
        (scene, image_ref, _), (tones, audio_ref, _) = image, clip
        turns = []
        for task in tasks:
            medium = tones if task in AUDIO_TASKS else scene
            turns.append((medium.question(task, rng), medium.reply(task)))
        turns[0] = (f"<image>\n<audio>\n{turns[0][0]}", turns[0][1])
        return {**_record(sample_id, turns), "images": [f"images/{image_ref}"], "audios": [audio_ref]}

    sft = [
        record(f"mixed-sft-{i:06d}", image, clip, rng.sample(all_tasks, rng.randint(1, 3)))
        for i, (image, clip) in enumerate(zip(images[0], clips[0], strict=True))
    ]
    tasks = balanced(all_tasks, len(images[1]), rng)
    heldout = []
    for i, (image, clip, task) in enumerate(zip(images[1], clips[1], tasks, strict=True)):
        medium = clip[0] if task in AUDIO_TASKS else image[0]
        heldout.append(
            {**record(f"mixed-heldout-{i:06d}", image, clip, [task]), "task": task, "answer": medium.answer(task)}
        )

    write_json(out / "mixed_sft.json", sft)
    write_jsonl(out / "mixed_heldout.jsonl", heldout)
    manifest["counts"].update(
        mixed_sft=len(sft), mixed_heldout=len(heldout), mixed_heldout_tasks={t: tasks.count(t) for t in all_tasks}
    )
    manifest["files"].update(mixed_sft="mixed_sft.json", mixed_heldout="mixed_heldout.jsonl")


def _draw_clips(out: Path, split: str, n: int, rng: random.Random, bar: tqdm) -> Drawn:
    """Draws and saves ``n`` clips as ``audio/<split>/NNNNNN.flac``; returns (tones, ref, FLAC bytes) for each."""
    folder = out / "audio" / split
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    for i in range(n):
        tones, wave = draw_tones(rng)
        flac = encode_flac(wave)
        (folder / f"{i:06d}.flac").write_bytes(flac)
        drawn.append((tones, f"audio/{split}/{i:06d}.flac", flac))
        bar.update()
    return drawn


def _caption_record(sample_id: str, ref: str, tones: Tones, rng: random.Random) -> dict[str, Any]:
    prompt = rng.choice(_CAPTION_PROMPTS)
    # <audio> before or after the prompt, as the image captions do, so neither is learnt as a rule.
    text = f"<audio>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<audio>"
    return {**_record(sample_id, [(text, tones.caption())]), "audios": [ref]}


def _sft_record(sample_id: str, ref: str, tones: Tones, rng: random.Random) -> dict[str, Any]:
    tasks = rng.sample(AUDIO_TASKS, rng.randint(1, len(AUDIO_TASKS)))
    turns = [(tones.question(task, rng), tones.reply(task)) for task in tasks]
    turns[0] = (f"<audio>\n{turns[0][0]}", turns[0][1])
    return {**_record(sample_id, turns), "audios": [ref]}


def _record(sample_id: str, turns: list[tuple[str, str]]) -> dict[str, Any]:
    """A messages record of (user, assistant) turns; the caller adds the media refs."""
    messages = []
    for question, reply in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return {"id": sample_id, "messages": messages}
