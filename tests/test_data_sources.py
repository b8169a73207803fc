"""The synthetic data generator and the readers: what a user relies on when pointing a stage at data."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmpost.data.sample import DataError
from mmpost.data.sources import iter_shards, read_records
from mmpost.synthetic.scenes import COLOURS, NUMBER_WORDS, SHAPES
from mmpost.synthetic.write import synthesize

NUM_TRAIN, NUM_HELDOUT, SHARD_SIZE = 60, 30, 20
WORD_NUMBERS = {word: n for n, word in NUMBER_WORDS.items()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT, shard_size=SHARD_SIZE, seed=3, progress=False)
    return out


def _png(path: Path, colour=(200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _blobs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean mask, as pixel lists (so diagonal contact joins two shapes)."""
    seen = np.zeros_like(mask)
    blobs = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, blob = [start], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        blobs.append(blob)
    return blobs


def _analyse(path: Path) -> tuple[str, str, int]:
    """Reads (colour, shape, count) back from the pixels of a synthetic image."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    background = pixels[0, 0]  # shapes keep a one-pixel margin, so the corner is background
    foreground = np.any(pixels != background, axis=-1)
    colours = {tuple(int(c) for c in p) for p in pixels[foreground]}
    assert len(colours) == 1, f"{path}: one colour expected, found {colours}"
    (rgb,) = colours
    (colour,) = [name for name, value in COLOURS.items() if value == rgb]
    blobs = _blobs(foreground)
    shapes = set()
    for blob in blobs:
        ys, xs = zip(*blob, strict=True)
        height, width = max(ys) - min(ys) + 1, max(xs) - min(xs) + 1
        assert 12 <= height <= 18 and 12 <= width <= 18, f"{path}: a {width}x{height} shape"
        fill = len(blob) / (height * width)  # square 1, circle ~0.79, triangle ~0.5
        shapes.add("square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle")
    assert len(shapes) == 1, f"{path}: one shape type expected, found {shapes}"
    return colour, shapes.pop(), len(blobs)


def test_synthesize_writes_the_documented_layout(synth):
    manifest = json.loads((synth / "synth.json").read_text())
    files = manifest["files"]
    assert files["shards"] == [f"shards/sft-{k:06d}.tar" for k in range(NUM_TRAIN // SHARD_SIZE)]
    assert len(files["images"]) == NUM_TRAIN + NUM_HELDOUT
    assert "images/train/000000.png" in files["images"] and "images/heldout/000000.png" in files["images"]
    for name in [
        files["align"],
        files["sft"],
        files["heldout"],
        files["heldout_captions"],
        *files["shards"],
        *files["images"],
    ]:
        assert (synth / name).is_file(), name
    assert manifest["counts"]["sft"] == NUM_TRAIN and manifest["counts"]["heldout"] == NUM_HELDOUT
    assert manifest["params"]["seed"] == 3


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(synth, tmp_path):
    synthesize(
        tmp_path / "again", num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT, shard_size=SHARD_SIZE, seed=3, progress=False
    )
    names = json.loads((synth / "synth.json").read_text())["files"]
    for name in ["align.json", "sft.json", "heldout.jsonl", *names["shards"], *names["images"]]:
        assert (synth / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    synthesize(tmp_path / "other", num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT, seed=4, progress=False)
    assert (synth / "align.json").read_bytes() != (tmp_path / "other" / "align.json").read_bytes()


def test_synthesize_refuses_a_foreign_directory_and_replaces_its_own_output(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="synth.json"):
        synthesize(tmp_path, num_train=3, num_heldout=0, progress=False)
    out = tmp_path / "data"
    synthesize(out, num_train=6, num_heldout=3, shard_size=2, progress=False)
    synthesize(out, num_train=4, num_heldout=3, shard_size=2, progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["sft-000000.tar", "sft-000001.tar"]
    assert len(list((out / "images" / "train").iterdir())) == 4


def test_captions_say_what_the_pixels_show(synth):
    for record in json.loads((synth / "align.json").read_text()):
        number, colour, shape = record["conversations"][1]["value"].rstrip(".").split()
        assert record["conversations"][1]["value"] == record["conversations"][1]["value"].lower()
        assert shape.rstrip("s") in SHAPES and (shape.endswith("s") == (number != "one"))
        assert _analyse(synth / "images" / record["image"]) == (colour, shape.rstrip("s"), WORD_NUMBERS[number])


def test_caption_prompts_vary_and_place_the_image_on_either_side(synth):
    prompts = [r["conversations"][0]["value"] for r in json.loads((synth / "align.json").read_text())]
    assert all(p.count("<image>") == 1 and (p.startswith("<image>\n") or p.endswith("\n<image>")) for p in prompts)
    assert any(p.startswith("<image>") for p in prompts) and any(p.endswith("<image>") for p in prompts)
    assert len({p.replace("<image>", "").strip() for p in prompts}) >= 3


def test_sft_answers_match_the_pixels(synth):
    for record in json.loads((synth / "sft.json").read_text()):
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and 2 <= len(turns) <= 6
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        colour, shape, count = _analyse(synth / "images" / record["image"])
        expected = {"colour": f"{colour.capitalize()}.", "shape": f"{shape.capitalize()}.", "count": str(count)}
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            text = question["value"]
            task = "count" if "many" in text else "colour" if ("colour" in text or "color" in text) else "shape"
            assert answer["value"] == expected[task], (record["id"], question["value"])


def test_heldout_questions_are_balanced_and_correct(synth):
    lines = [json.loads(line) for line in (synth / "heldout.jsonl").read_text().splitlines()]
    assert len(lines) == NUM_HELDOUT
    assert Counter(line["task"] for line in lines) == {"colour": 10, "shape": 10, "count": 10}
    assert len({line["images"][0] for line in lines}) == NUM_HELDOUT
    for line in lines:
        colour, shape, count = _analyse(synth / "images" / line["images"][0])
        assert line["answer"] == {"colour": colour, "shape": shape, "count": str(count)}[line["task"]]
        assert line["messages"][0]["content"].startswith("<image>\n")
        assert line["messages"][1]["content"] in (f"{line['answer'].capitalize()}.", line["answer"])
    train = {(synth / "images" / "train" / f"{i:06d}.png").read_bytes() for i in range(NUM_TRAIN)}
    assert not any((synth / "images" / line["images"][0]).read_bytes() in train for line in lines)


@pytest.mark.parametrize("name", ["align.json", "sft.json", "heldout.jsonl", "heldout_captions.json"])
def test_read_records_reads_every_synthesized_file(synth, name):
    samples = read_records(synth / name, image_root=synth / "images")
    assert len(samples) == (NUM_TRAIN if name in ("align.json", "sft.json") else NUM_HELDOUT)
    for sample in samples:
        assert {m["role"] for m in sample.messages} == {"user", "assistant"}
        (image,) = sample.media["image"]
        assert isinstance(image, Path) and image.is_absolute() and image.is_file()
        assert sample.source == str(synth / name)
    if name == "heldout.jsonl":
        assert {s.meta["task"] for s in samples} == {"colour", "shape", "count"}
        assert all(s.id.startswith("heldout-") and s.meta["answer"] for s in samples)


def test_read_records_takes_the_literal_llava_format(tmp_path):
    # Shaped like blip_laion_cc_sbu_558k.json and llava_v1_5_mix665k.json, text-only record included.
    records = [
        {
            "id": "004539375",
            "image": "00453/004539375.jpg",
            "conversations": [
                {"from": "human", "value": "Give a short and clear explanation of the subsequent image.\n<image>"},
                {"from": "gpt", "value": "a wooden chair standing in a garden"},
            ],
        },
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the bus?"},
                {"from": "gpt", "value": "The bus is white with a red stripe."},
                {"from": "human", "value": "Where is it parked?"},
                {"from": "gpt", "value": "Beside a brick building."},
            ],
        },
        {
            "id": "i6IyJda_0",
            "model": "",
            "conversations": [
                {"from": "human", "value": "Write a haiku about rain."},
                {"from": "gpt", "value": "Soft rain on the roof"},
            ],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    images = tmp_path / "image_folder"
    _png(images / "00453/004539375.jpg")
    _png(images / "coco/train2017/000000033471.jpg")

    caption, chat, text_only = read_records(tmp_path / "llava.json", image_root=images)
    assert caption.id == "004539375" and caption.media["image"] == [images / "00453/004539375.jpg"]
    assert caption.messages[0]["role"] == "user" and caption.messages[1]["role"] == "assistant"
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[3]["content"] == "Beside a brick building."
    assert text_only.media == {} and text_only.meta == {"model": ""}


def test_read_records_takes_jsonl_messages_with_a_list_of_images(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.png")
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>\n<image>\nSame colour?"},
                {"role": "assistant", "content": "Yes."},
            ],
            "images": ["a.png", "sub/b.png"],
            "task": "compare",
        },
        {"id": 7, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    first, second = read_records(tmp_path / "data.jsonl")
    assert first.id == "0" and first.meta == {"task": "compare"}
    assert first.media["image"] == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    assert first.messages[0] == {"role": "system", "content": "Be brief."}
    assert second.id == "7" and second.media == {}


def test_placeholder_mismatch_names_the_sample(tmp_path):
    _png(tmp_path / "a.png")
    record = {
        "id": "two-tokens",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
    }
    (tmp_path / "bad.json").write_text(json.dumps([record]))
    with pytest.raises(DataError, match="two-tokens") as info:
        read_records(tmp_path / "bad.json")
    assert "bad.json" in str(info.value)


def test_missing_image_names_the_sample_and_path(tmp_path):
    _png(tmp_path / "here.png")
    records = [
        {
            "id": "ok",
            "image": "here.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A."}],
        },
        {
            "id": "lost",
            "image": "gone/nowhere.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "B."}],
        },
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(DataError) as info:
        read_records(tmp_path / "data.json")
    assert str(tmp_path / "gone" / "nowhere.png") in str(info.value) and "'lost'" in str(info.value)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_records(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('[{"id": "x", "text": "hello"}]', "neither 'conversations'"),
        ('[{"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}]', "'robot'"),
        ('[{"id": "x", "messages": [{"role": "human", "content": "hi"}]}]', "'human'"),
        ('{"id": "x"}', "JSON list"),
        ('[{"id": "x",', "invalid JSON"),
    ],
)
def test_bad_records_raise_data_error_naming_the_problem(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DataError, match=match):
        read_records(tmp_path / "bad.json")


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        read_records(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("how", ["directory", "pattern", "list"])
def test_shards_hold_the_sft_samples(synth, how):
    urls = {
        "directory": synth / "shards",
        "pattern": str(synth / "shards" / "sft-{000000..000002}.tar"),
        "list": sorted((synth / "shards").iterdir()),
    }[how]
    expected = {s.id: s for s in read_records(synth / "sft.json", image_root=synth / "images")}
    got = list(iter_shards(urls))
    assert [s.id for s in got] == list(expected)
    for sample in got:
        assert sample.messages == expected[sample.id].messages
        (png,) = sample.media["image"]
        assert isinstance(png, bytes) and png == expected[sample.id].media["image"][0].read_bytes()
        assert Image.open(io.BytesIO(png)).size == (64, 64)


class _ShardIds(torch.utils.data.IterableDataset):
    def __init__(self, urls):
        self.urls = urls

    def __iter__(self):
        for sample in iter_shards(self.urls):
            yield sample.id


def test_dataloader_workers_each_take_their_own_shards(synth):
    loader = torch.utils.data.DataLoader(_ShardIds(str(synth / "shards")), batch_size=None, num_workers=2)
    counts = Counter(loader)
    assert len(counts) == NUM_TRAIN and set(counts.values()) == {1}


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def _png_bytes(colour=(0, 0, 230)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_shard_placeholder_mismatch_names_shard_and_key(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "<image><image> Which?"}, {"role": "assistant", "content": "A"}],
        "images": ["png"],
    }
    _write_shard(tmp_path / "bad.tar", [{"__key__": "k-17", "png": _png_bytes(), "json": json.dumps(record).encode()}])
    with pytest.raises(DataError, match="k-17") as info:
        list(iter_shards(tmp_path / "bad.tar"))
    assert "bad.tar" in str(info.value)


def test_shard_with_several_images_and_llava_json(tmp_path):
    llava = {
        "id": "multi",
        "image": ["0.png", "1.png"],
        "conversations": [{"from": "human", "value": "<image> then <image>: same?"}, {"from": "gpt", "value": "No."}],
    }
    unnamed = {"messages": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Red."}]}
    red, blue = _png_bytes((220, 0, 0)), _png_bytes((0, 0, 230))
    _write_shard(
        tmp_path / "s.tar",
        [
            {"__key__": "multi", "0.png": red, "1.png": blue, "json": json.dumps(llava).encode()},
            {"__key__": "single", "jpg": red, "json": json.dumps(unnamed).encode()},
        ],
    )
    multi, single = iter_shards([tmp_path / "s.tar"])
    assert multi.media["image"] == [red, blue] and multi.messages[1]["role"] == "assistant"
    assert single.id == "single" and single.media["image"] == [red]


def test_missing_shard_is_named_before_reading(tmp_path):
    _write_shard(tmp_path / "sft-000008.tar", [{"__key__": "a", "json": b'{"messages": []}'}])
    with pytest.raises(FileNotFoundError, match="sft-000009.tar"):
        iter_shards(str(tmp_path / "sft-{000008..000009}.tar"))


def test_corrupt_shard_raises_unless_the_handler_skips_it(tmp_path):
    record = {"messages": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Blue."}]}
    _write_shard(tmp_path / "good.tar", [{"__key__": "fine", "png": _png_bytes(), "json": json.dumps(record).encode()}])
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(Exception, match="broken.tar"):
        list(iter_shards(tmp_path))
    with pytest.warns(UserWarning):
        assert [s.id for s in iter_shards(tmp_path, handler=wds.warn_and_continue)] == ["fine"]


@pytest.mark.parametrize("source", ["file", "bytes"])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped_white(tmp_path, source):
    from mmpost.data.media import decode_image

    gradient = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)  # a grey ramp, 16 bits deep
    deep, shallow = tmp_path / "deep.png", tmp_path / "shallow.png"
    Image.fromarray(gradient).save(deep)
    Image.fromarray(np.rint(gradient / 257.0).astype(np.uint8)).save(shallow)
    assert Image.open(deep).mode.startswith("I;16")
    got = decode_image(deep if source == "file" else deep.read_bytes())
    want = decode_image(shallow)
    assert got.mode == "RGB" and got.size == want.size
    difference = np.abs(np.asarray(got, dtype=np.float32) - np.asarray(want, dtype=np.float32)) / 255.0
    assert difference.max() <= 1 / 255 and np.asarray(got).mean() < 200  # not a white image


def test_reward_pairs_reject_what_a_policy_samples_off_its_data(synth):
    """The reward model's pairs: the true reply against each kind of wrong one, never itself, on the images and
    questions of dpo's pairs."""
    manifest = json.loads((synth / "synth.json").read_text())
    pairs = json.loads((synth / manifest["files"]["reward_pairs"]).read_text())
    dpo = json.loads((synth / "pairs.json").read_text())
    assert len(pairs) == len(dpo) == NUM_TRAIN
    assert {p["rejected_kind"] for p in pairs} == {"wrong", "other_task", "unseen", "repeated", "empty"}
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert [(p["images"], p["task"], p["chosen"]) for p in pairs] == [
        (p["images"], p["task"], p["chosen"]) for p in dpo
    ]
    assert sum(1 for _ in open(synth / manifest["files"]["reward_pairs_heldout"])) == NUM_HELDOUT
