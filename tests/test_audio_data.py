"""Synthetic tones, audio decoding, and the readers and dataset on audio and image+audio data."""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds

from mmpost.cli import main
from mmpost.data.chat import ChatEncoder
from mmpost.data.loader import ListDataset, ShardDataset
from mmpost.data.media import decode_audio
from mmpost.data.pipeline import ConversationPipeline
from mmpost.data.sample import DataError
from mmpost.data.sources import iter_shards, read_records
from mmpost.interfaces import Audio, MediaProcessor
from mmpost.synthetic.audio import LENGTHS, MAX_SECONDS, MIN_SECONDS, PITCHES, SAMPLE_RATE, Tones, draw_tones
from mmpost.synthetic.tiny_llm import make_tiny_tokenizer
from mmpost.synthetic.write import synthesize

NUM_TRAIN, NUM_HELDOUT, SHARD_SIZE = 36, 24, 12
BOTH = ("image", "audio")
WORD_NUMBERS = {"one": 1, "two": 2, "three": 3}
AUDIO_FILES = ["audio_align.json", "audio_sft.json", "audio_heldout.jsonl", "audio_heldout_captions.json"]
MIXED_FILES = ["mixed_sft.json", "mixed_heldout.jsonl"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_av")
    synthesize(out, NUM_TRAIN, NUM_HELDOUT, shard_size=SHARD_SIZE, seed=3, progress=False, modalities=BOTH)
    return out


def _listed(out: Path) -> set[str]:
    files = json.loads((out / "synth.json").read_text())["files"]
    return {name for entry in files.values() for name in ([entry] if isinstance(entry, str) else entry)}


def _on_disk(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _analyse_clip(wave: np.ndarray, rate: int) -> tuple[int, str, str]:
    """Reads (beeps, pitch, length) back from a waveform: energy envelope for count and length, FFT for pitch."""
    frame = rate // 200  # 5 ms
    n = len(wave) // frame
    energy = np.sqrt((wave[: n * frame].reshape(n, frame) ** 2).mean(axis=1))  # [frames] RMS
    loud = energy > 0.05
    edges = np.diff(np.concatenate([[0], loud.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # frame indices of each beep
    seconds = frame / rate
    durations = (ends - starts) * seconds
    assert len(starts) >= 1, "no beep found"
    assert starts[0] * seconds >= 0.04 and (n - ends[-1]) * seconds >= 0.04, "no silence before or after"
    assert np.all((starts[1:] - ends[:-1]) * seconds >= 0.09), "beeps closer than the 0.1 s gap"
    near = np.convolve(loud, np.ones(5), mode="same") > 0  # a beep and 10 ms of fade either side
    assert energy[~near].max() < 0.01, "sound outside the beeps"  # faint noise only
    for start, end in zip(starts, ends, strict=True):
        beep = wave[max(0, (start - 3) * frame) : (end + 3) * frame]  # with its fades and a little silence
        for edge in (beep, beep[::-1]):  # onset, then the end read backwards
            first = np.argmax(np.abs(edge) > 0.03)  # 15x the noise level
            # A 10 ms fade is still below a third of the full amplitude 1.5 ms later; a step (a click) is not.
            assert np.abs(edge[first : first + 24]).max() < 0.45 * np.abs(beep).max(), "a beep with a step (click)"
    (length,) = {min(LENGTHS, key=lambda name: abs(LENGTHS[name] - d)) for d in durations}
    assert np.all(np.abs(durations - LENGTHS[length]) <= 0.1 * LENGTHS[length] + 0.01), durations
    spectrum = np.abs(np.fft.rfft(wave))
    peak = np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)]
    pitch = min(PITCHES, key=lambda name: abs(np.log(PITCHES[name] / peak)))
    assert abs(peak / PITCHES[pitch] - 1) <= 0.05, peak
    return len(starts), pitch, length


def _read_clip(path: Path) -> tuple[int, str, str]:
    wave, rate = soundfile.read(path, dtype="float32")
    assert rate == SAMPLE_RATE and wave.ndim == 1
    assert MIN_SECONDS - 0.01 <= len(wave) / rate <= MAX_SECONDS + 0.01
    return _analyse_clip(wave, rate)


def _caption_labels(caption: str) -> tuple[int, str, str]:
    number, length, pitch, noun = caption.rstrip(".").split()
    assert caption[0].isupper() and caption.endswith(".") and noun == ("beep" if number == "One" else "beeps")
    return WORD_NUMBERS[number.lower()], pitch, length


def _truth(out: Path) -> dict[str, tuple[int, str, str]]:
    """Clip ref -> (beeps, pitch, length) from the caption files (which the first test checks against sound)."""
    records = json.loads((out / "audio_align.json").read_text())
    records += json.loads((out / "audio_heldout_captions.json").read_text())
    return {r["audios"][0]: _caption_labels(r["messages"][1]["content"]) for r in records}


def _task_of(question: str) -> str:
    if "beeps" in question and "many" in question:
        return "beeps"
    for task, words in [("pitch", "pitch"), ("length", "short or long"), ("count", "many"), ("colour", "colo")]:
        if words in question:
            return task
    assert "shape" in question, question
    return "shape"


def _replies(clip: tuple[int, str, str], scene: tuple[int, str, str] | None = None) -> dict[str, str]:
    beeps, pitch, length = clip
    replies = {"beeps": str(beeps), "pitch": f"{pitch.capitalize()}.", "length": f"{length.capitalize()}."}
    if scene is not None:
        count, colour, shape = scene
        replies.update(count=str(count), colour=f"{colour.capitalize()}.", shape=f"{shape.capitalize()}.")
    return replies


def _scenes(out: Path) -> dict[str, tuple[int, str, str]]:
    """Image ref (relative to the output folder) -> (count, colour, shape), from the image caption files."""
    scenes = {}
    for name in ("align.json", "heldout_captions.json"):
        for r in json.loads((out / name).read_text()):
            number, colour, shape = r["conversations"][1]["value"].rstrip(".").split()
            scenes[f"images/{r['image']}"] = (WORD_NUMBERS[number], colour, shape.rstrip("s"))
    return scenes


def test_clips_hold_what_their_captions_say(synth):
    truth = _truth(synth)
    assert len(truth) == NUM_TRAIN + NUM_HELDOUT
    for ref, labels in truth.items():
        assert _read_clip(synth / ref) == labels, ref
    assert {labels[1] for labels in truth.values()} == set(PITCHES)
    assert {labels[2] for labels in truth.values()} == set(LENGTHS) and {t[0] for t in truth.values()} == {1, 2, 3}


def test_drawn_clips_vary_in_length_and_match_their_labels():
    rng = random.Random(11)
    durations = []
    for k in range(200):
        tones, wave = draw_tones(rng)
        assert wave.dtype == np.float32 and np.abs(wave).max() <= 1.0
        durations.append(len(wave) / SAMPLE_RATE)
        if k < 40:
            assert _analyse_clip(wave, SAMPLE_RATE) == (tones.beeps, tones.pitch, tones.length), (k, tones)
    assert MIN_SECONDS - 0.001 <= min(durations) and max(durations) <= MAX_SECONDS + 0.001
    assert sum(d > 2.0 for d in durations) >= 5 and sum(d < 1.0 for d in durations) >= 5


def test_questions_read_as_english_for_one_or_several_beeps():
    rng = random.Random(0)
    for beeps in (1, 2, 3):
        tones = Tones(pitch="high", length="long", beeps=beeps)
        questions = {tones.question(task, rng) for task in ("pitch", "beeps", "length") for _ in range(30)}
        for q in questions:
            assert q[0].isupper() and q.endswith("?"), q
            if "many" not in q:
                assert bool(re.search(r"\bthe beeps\b", q)) == (beeps > 1), q
                assert bool(re.search(r"\bthe beep\b", q)) == (beeps == 1), q
                for verb, noun in re.findall(r"\b(is|are) the (beeps?)\b", q, flags=re.IGNORECASE):
                    assert (verb.lower() == "are") == (noun == "beeps"), q  # the verb agrees with its subject
        assert tones.reply("beeps") == str(beeps) and tones.reply("pitch") == "High."
        assert tones.reply("length") == "Long." and tones.answer("length") == "long"
    assert Tones("low", "short", 1).caption() == "One short low beep."
    assert Tones("high", "long", 2).caption() == "Two long high beeps."


def test_same_seed_gives_identical_bytes_and_the_manifest_lists_every_file(synth, tmp_path):
    listed = _listed(synth)
    assert _on_disk(synth) == listed | {"synth.json"}
    assert {f"audio/train/{i:06d}.flac" for i in range(NUM_TRAIN)} <= listed
    assert {f"audio_shards/sft-{k:06d}.tar" for k in range(NUM_TRAIN // SHARD_SIZE)} <= listed
    assert set(AUDIO_FILES + MIXED_FILES) <= listed
    again = tmp_path / "again"
    synthesize(again, NUM_TRAIN, NUM_HELDOUT, shard_size=SHARD_SIZE, seed=3, progress=False, modalities=BOTH)
    for name in sorted(listed | {"synth.json"}):
        assert (synth / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize(other, NUM_TRAIN, NUM_HELDOUT, shard_size=SHARD_SIZE, seed=4, progress=False, modalities=BOTH)
    for name in ["audio/train/000000.flac", "audio_sft.json", "mixed_sft.json"]:
        assert (synth / name).read_bytes() != (other / name).read_bytes(), name


def test_adding_audio_leaves_the_image_files_as_they_were(synth, tmp_path):
    synthesize(tmp_path, NUM_TRAIN, NUM_HELDOUT, shard_size=SHARD_SIZE, seed=3, progress=False)
    image_only = _listed(tmp_path)
    assert image_only < _listed(synth) and not any(name.startswith(("audio", "mixed")) for name in image_only)
    for name in sorted(image_only):
        assert (synth / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert "modalities" not in json.loads((tmp_path / "synth.json").read_text())["params"]


def test_a_second_run_leaves_no_stale_files(tmp_path):
    out = tmp_path / "data"
    synthesize(out, num_train=8, num_heldout=4, shard_size=2, progress=False, modalities=BOTH)
    synthesize(out, num_train=5, num_heldout=2, shard_size=2, progress=False, modalities=BOTH)
    assert _on_disk(out) == _listed(out) | {"synth.json"}
    assert sorted(p.name for p in (out / "audio_shards").iterdir()) == [f"sft-{k:06d}.tar" for k in range(3)]
    assert len(list((out / "audio" / "train").iterdir())) == 5
    synthesize(out, num_train=4, num_heldout=2, shard_size=2, progress=False)
    assert _on_disk(out) == _listed(out) | {"synth.json"}
    assert not (out / "audio").exists() and not (out / "audio_shards").exists()
    synthesize(out, num_train=3, num_heldout=1, shard_size=2, progress=False, modalities=["audio"])
    assert _on_disk(out) == _listed(out) | {"synth.json"} and not (out / "images").exists()
    with pytest.raises(ValueError, match="modalities"):
        synthesize(out, num_train=3, num_heldout=1, progress=False, modalities=["video"])


def test_heldout_audio_questions_are_balanced_and_correct(synth):
    lines = _lines(synth / "audio_heldout.jsonl")
    assert Counter(line["task"] for line in lines) == {"pitch": 8, "beeps": 8, "length": 8}
    assert len({line["audios"][0] for line in lines}) == NUM_HELDOUT
    for line in lines:
        (ref,) = line["audios"]
        assert ref.startswith("audio/heldout/")
        beeps, pitch, length = _read_clip(synth / ref)
        assert line["answer"] == {"beeps": str(beeps), "pitch": pitch, "length": length}[line["task"]]
        question, reply = (m["content"] for m in line["messages"])
        assert question.startswith("<audio>\n") and _task_of(question) == line["task"]
        assert reply == _replies((beeps, pitch, length))[line["task"]]
    train = {(synth / "audio" / "train" / f"{i:06d}.flac").read_bytes() for i in range(NUM_TRAIN)}
    assert not any((synth / line["audios"][0]).read_bytes() in train for line in lines)


def test_audio_sft_answers_match_the_clips(synth):
    truth = _truth(synth)
    for record in json.loads((synth / "audio_sft.json").read_text()):
        turns = record["messages"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) and 2 <= len(turns) <= 6
        assert turns[0]["content"].startswith("<audio>\n") and sum(t["content"].count("<audio>") for t in turns) == 1
        replies = _replies(truth[record["audios"][0]])
        for question, reply in zip(turns[::2], turns[1::2], strict=True):
            assert reply["content"] == replies[_task_of(question["content"])], (record["id"], question)


def test_mixed_samples_hold_one_image_and_one_clip_with_their_placeholders(synth):
    truth, scenes = _truth(synth), _scenes(synth)
    held = _lines(synth / "mixed_heldout.jsonl")
    assert Counter(line["task"] for line in held) == dict.fromkeys(
        ["colour", "shape", "count", "pitch", "beeps", "length"], 4
    )
    sft = json.loads((synth / "mixed_sft.json").read_text())
    assert len(sft) == NUM_TRAIN and len(held) == NUM_HELDOUT
    tasks_seen = Counter()
    for split, records in (("train", sft), ("heldout", held)):
        for k, record in enumerate(records):
            assert record["images"] == [f"images/{split}/{k:06d}.png"]
            assert record["audios"] == [f"audio/{split}/{k:06d}.flac"]
            turns = record["messages"]
            assert turns[0]["content"].startswith("<image>\n<audio>\n") and 2 <= len(turns) <= 6
            text = "".join(t["content"] for t in turns)
            assert text.count("<image>") == 1 and text.count("<audio>") == 1
            replies = _replies(truth[record["audios"][0]], scenes[record["images"][0]])
            for question, reply in zip(turns[::2], turns[1::2], strict=True):
                task = _task_of(question["content"])
                tasks_seen[task] += 1
                assert reply["content"] == replies[task], (record["id"], question)
            if split == "heldout":
                assert _task_of(turns[0]["content"]) == record["task"]
                assert replies[record["task"]] in (record["answer"], f"{record['answer'].capitalize()}.")
    assert set(tasks_seen) == {"colour", "shape", "count", "pitch", "beeps", "length"}


def _write_audio(path: Path, wave: np.ndarray, rate: int, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, rate, format=fmt, subtype="PCM_16")
    return path.read_bytes()


def test_decode_audio_reads_wav_and_flac_and_mixes_stereo_to_mono(tmp_path):
    t = np.arange(4410) / 44_100
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), np.full_like(t, 0.25)
    data = _write_audio(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 44_100, "WAV")
    for ref in (tmp_path / "stereo.wav", data):
        audio = decode_audio(ref)
        assert isinstance(audio, Audio) and audio.rate == 44_100
        assert audio.waveform.dtype == torch.float32 and audio.waveform.shape == (4410,)
        assert torch.allclose(audio.waveform, torch.from_numpy((left + right) / 2).float(), atol=1e-4)
    mono = 0.3 * np.sin(2 * np.pi * 300 * np.arange(8000) / 8000)
    data = _write_audio(tmp_path / "mono.flac", mono, 8000, "FLAC")
    for ref in (tmp_path / "mono.flac", data):
        audio = decode_audio(ref)
        assert audio.rate == 8000 and audio.waveform.shape == (8000,)
        assert torch.allclose(audio.waveform, torch.from_numpy(mono).float(), atol=1e-4)
    with pytest.raises(RuntimeError):
        decode_audio(b"fLaC" + b"\x00not really" * 20)


class _Frames(MediaProcessor):
    """Stand-in audio processor: RMS of the first second's 10 ms frames, resampled to 16 kHz by dropping."""

    def __call__(self, audio: Audio) -> torch.Tensor:
        wave = audio.waveform[:: max(1, audio.rate // SAMPLE_RATE)][:SAMPLE_RATE]
        wave = torch.nn.functional.pad(wave, (0, SAMPLE_RATE - len(wave)))
        return wave.view(100, 160).pow(2).mean(dim=1).sqrt()  # [100]


class _MeanColour(MediaProcessor):
    def __call__(self, image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).mean(dim=(0, 1))  # [3]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tokenizer = make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), ["How many beeps are there? Short. Long."])
    tokenizer.add_tokens(["<image>", "<audio>"], special_tokens=True)
    ids = {m: tokenizer.convert_tokens_to_ids(f"<{m}>") for m in ("image", "audio")}
    processors = {"image": _MeanColour(), "audio": _Frames()}
    chat = ChatEncoder(tokenizer, ids, max_length=256)
    return ConversationPipeline(chat, processors, lambda modality, shape: 4, tokenizer.pad_token_id)


def test_corrupt_audio_in_json_data_is_skipped_and_counted(synth, tmp_path, pipeline):
    records = json.loads((synth / "audio_sft.json").read_text())[:6]
    for record in records:
        (ref,) = record["audios"]
        (tmp_path / ref).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth / ref, tmp_path / ref)
    (tmp_path / records[2]["audios"][0]).write_bytes(b"fLaC" + b"\x07garbage" * 50)
    _write_audio(tmp_path / "audio" / "empty.wav", np.zeros(0), SAMPLE_RATE, "WAV")
    records[4]["audios"] = ["audio/empty.wav"]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = ListDataset(read_records(tmp_path / "data.json"), pipeline.process)
    batch = pipeline.collate([dataset[i] for i in range(len(dataset))])
    assert batch.drawn == 6 and len(batch.skipped) == 2
    assert all("cannot decode audio" in reason for reason in batch.skipped)
    assert records[2]["id"] in batch.skipped[0] and records[4]["id"] in batch.skipped[1]
    assert batch.ids == [r["id"] for k, r in enumerate(records) if k not in (2, 4)]
    assert batch.media["audio"].shape == (4, 100) and (batch.media["audio"].amax(dim=1) > 0.1).all()


def test_corrupt_audio_in_a_shard_is_skipped_and_counted(synth, tmp_path, pipeline):
    good = list(iter_shards(synth / "audio_shards" / "sft-000000.tar"))[:5]
    with wds.TarWriter(str(tmp_path / "bad.tar"), encoder=False) as writer:
        for k, sample in enumerate(good):
            flac = b"RIFF\x00\x00\x00\x00WAVEbroken" if k == 1 else sample.media["audio"][0]
            meta = {"id": sample.id, "messages": sample.messages, "audios": ["flac"]}
            writer.write({"__key__": sample.id, "flac": flac, "json": json.dumps(meta).encode()})
    dataset = ShardDataset(lambda: iter_shards(tmp_path / "bad.tar"), pipeline.process)
    batch = pipeline.collate(list(dataset))
    assert batch.drawn == 5 and len(batch.skipped) == 1
    assert "cannot decode audio" in batch.skipped[0] and good[1].id in batch.skipped[0]
    assert batch.ids == [s.id for k, s in enumerate(good) if k != 1]


def test_mixed_samples_go_through_the_dataset_with_both_media(synth, pipeline):
    samples = read_records(synth / "mixed_sft.json")[:4]
    batch = pipeline.collate([pipeline.process(s) for s in samples])
    assert not batch.skipped and batch.ids == [s.id for s in samples]
    assert batch.media["image"].shape == (4, 3) and batch.media["audio"].shape == (4, 100)


@pytest.mark.parametrize("name", AUDIO_FILES + MIXED_FILES)
def test_read_records_reads_the_audio_and_mixed_files_without_an_image_root(synth, name):
    samples = read_records(synth / name)
    assert len(samples) == (NUM_TRAIN if "align" in name or "sft" in name else NUM_HELDOUT)
    for sample in samples:
        sample.check_placeholders()
        assert set(sample.media) == ({"image", "audio"} if name.startswith("mixed") else {"audio"})
        for refs in sample.media.values():
            (ref,) = refs
            assert isinstance(ref, Path) and ref.is_absolute() and ref.is_file() and ref.is_relative_to(synth)
    if name.endswith(".jsonl"):
        assert all(s.meta["task"] and s.meta["answer"] for s in samples)
    decoded = decode_audio(samples[0].media["audio"][0])
    assert decoded.rate == SAMPLE_RATE and decoded.waveform.ndim == 1


def test_audio_shards_hold_the_audio_sft_samples(synth):
    expected = {s.id: s for s in read_records(synth / "audio_sft.json")}
    got = list(iter_shards(synth / "audio_shards"))
    assert [s.id for s in got] == list(expected)
    for sample in got:
        assert sample.messages == expected[sample.id].messages
        (flac,) = sample.media["audio"]
        assert isinstance(flac, bytes) and flac == expected[sample.id].media["audio"][0].read_bytes()
    assert decode_audio(got[0].media["audio"][0]).rate == SAMPLE_RATE


def _wav_bytes(seconds: float = 0.2) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(np.arange(int(SAMPLE_RATE * seconds)) / 5), SAMPLE_RATE, format="WAV")
    return buffer.getvalue()


def test_shards_take_unnamed_wav_entries_and_samples_with_both_media(synth, tmp_path):
    png = (synth / "images" / "train" / "000000.png").read_bytes()
    wav = _wav_bytes()
    both = {
        "messages": [
            {"role": "user", "content": "<image>\n<audio>\nHow many beeps are there?"},
            {"role": "assistant", "content": "1"},
        ]
    }
    audio_only = {"messages": [{"role": "user", "content": "<audio>\nShort?"}, {"role": "assistant", "content": "Y"}]}
    with wds.TarWriter(str(tmp_path / "s.tar"), encoder=False) as writer:
        writer.write({"__key__": "both", "png": png, "wav": wav, "json": json.dumps(both).encode()})
        writer.write({"__key__": "named", "flac": wav, "json": json.dumps({**audio_only, "audio": "flac"}).encode()})
    first, second = iter_shards(tmp_path / "s.tar")
    assert first.media == {"image": [png], "audio": [wav]}
    assert second.media == {"audio": [wav]}
    bad = {**both, "audios": ["wav"], "images": []}
    with wds.TarWriter(str(tmp_path / "bad.tar"), encoder=False) as writer:
        writer.write({"__key__": "k-9", "png": png, "wav": wav, "json": json.dumps(bad).encode()})
    with pytest.raises(DataError, match=r"k-9.*<image>"):
        list(iter_shards(tmp_path / "bad.tar"))


def test_audio_placeholder_count_is_checked_per_modality(tmp_path):
    (tmp_path / "a.wav").write_bytes(_wav_bytes())
    record = {
        "id": "no-audio-token",
        "messages": [{"role": "user", "content": "How many beeps?"}, {"role": "assistant", "content": "1"}],
        "audios": ["a.wav"],
    }
    (tmp_path / "bad.json").write_text(json.dumps([record]))
    with pytest.raises(DataError, match=r"no-audio-token.*0 <audio> placeholder\(s\).*1 audio"):
        read_records(tmp_path / "bad.json")
    missing = {**record, "id": "lost", "messages": [{"role": "user", "content": "<audio>"}], "audios": ["b.flac"]}
    (tmp_path / "lost.json").write_text(json.dumps([missing]))
    with pytest.raises(DataError, match="b.flac"):
        read_records(tmp_path / "lost.json")


def test_cli_synth_writes_audio_when_asked(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(tmp_path / "d"),
                "--train",
                "3",
                "--heldout",
                "2",
                "--modalities",
                "image,audio",
            ]
        )
        == 0
    )
    assert (tmp_path / "d" / "mixed_sft.json").is_file()
    assert (tmp_path / "d" / "audio" / "train" / "000002.flac").is_file()
    assert main(["data", "synth", "--out", str(tmp_path / "e"), "--train", "3", "--modalities", "image,video"]) == 2
    assert "modalities" in capsys.readouterr().err
