"""Readers that turn data files into ``Sample``s: JSON / JSONL records and webdataset shards.

One record parser serves every source. It takes the two record shapes in use:

- LLaVA: ``{"id", "image": str | [str] (absent for text-only), "conversations": [{"from", "value"}]}``
  with ``from`` in human / gpt / system, as in ``blip_laion_cc_sbu_558k.json`` and
  ``llava_v1_5_mix665k.json``;
- messages: ``{"id", "messages": [{"role", "content"}], "images": [str], "audios": [str]}`` with ``role`` in
  user / assistant / system.

Either media key (``image`` / ``images``, and likewise for any modality in ``PLACEHOLDERS``) is accepted in
either shape, and a sample may hold several modalities; every other key goes to ``Sample.meta``. In a JSON
file a media ref is a path relative to the media root (``image_root``, for audio too); in a shard it is the
extension key of one of the sample's tar entries (``"png"``, ``"flac"``, or ``"0.png"``, ``"1.png"`` for
several), in placeholder order, and the medium stays raw bytes: decoding, and skipping and counting corrupt
media, belong to the dataset.

What can be checked without decoding media is checked while reading, so a bad file fails before training
starts: record shape, roles, placeholder counts, and the existence of every image file a JSON file names.
Shards are only read as they stream, so their samples are checked one at a time.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from mmpost.data.sample import PLACEHOLDERS, DataError, Sample

_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
# Extensions a shard entry may have to count as a medium when the json does not name its entries.
_MEDIA_EXTENSIONS = {"image": ("jpg", "jpeg", "png", "webp", "bmp"), "audio": ("flac", "wav")}
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

Resolver = Callable[[str, str], "Path | bytes"]


def read_records(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Reads a ``.json`` list or a ``.jsonl`` file of LLaVA or messages records.

    Args:
        path: the data file.
        image_root: the folder media refs are relative to; default: the data file's folder.

    Returns:
        One ``Sample`` per record, media as absolute ``Path``s, ids from ``id`` or else the record's index.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        DataError: on invalid JSON, an unknown record shape or role, a placeholder count that differs from the
            number of media, or media files that do not exist (all are looked up before returning).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    root = Path(os.path.abspath(path.parent if image_root is None else Path(image_root).expanduser()))
    source = str(path)

    def resolve(modality: str, ref: str) -> Path:
        return Path(os.path.abspath(root / ref))  # an absolute ref stays as it is

    samples = []
    for index, place, record in _load_records(path):
        sample = _parse_record(record, default_id=str(index), place=place, source=source, resolve=resolve)
        sample.check_placeholders()
        samples.append(sample)
    _check_media_exist(samples, path, root)
    return samples


def iter_shards(
    urls: str | Path | Iterable[str | Path],
    handler: Callable[[Exception], bool] = wds.reraise_exception,
) -> Iterator[Sample]:
    """Streams the samples of webdataset shards, split across processes and DataLoader workers.

    Each shard sample is ``<key>.json`` (a LLaVA or messages record) plus its media entries; the record's
    ``images`` (or ``image``) lists the extension keys of those entries in placeholder order, and ``audios``
    (``audio``) likewise. A record that names none of a modality, beside a single entry of it (``.png``,
    ``.flac``, ...), gets that entry. Shards, not samples, are divided: process
    ``rank`` of ``world_size`` takes every ``world_size``-th shard and DataLoader worker ``w`` of ``n`` every
    ``n``-th of those, so each sample comes out once per pass; with fewer shards than processes x workers some
    workers idle, and shard counts that are a multiple of that product keep the load even.

    Args:
        urls: a shard path or URL, a brace pattern (``"shards/sft-{000000..000003}.tar"``), a directory of
            ``.tar`` files, or a list of these.
        handler: webdataset's handler for errors while reading a tar (``wds.warn_and_continue`` skips a bad
            shard); errors in a sample's json always raise.

    Returns:
        An iterator of ``Sample``s whose media are raw bytes. Call it inside the DataLoader worker (in an
        ``IterableDataset.__iter__``) so that the worker split applies.

    Raises:
        FileNotFoundError: when a local shard does not exist (checked on call, before any reading).
        DataError: when ``urls`` names no shard, when there are fewer shards than processes, or (while
            iterating) on a sample with no json, an invalid record or a placeholder count mismatch.
    """
    shards = _expand_shards(urls)

    def generate() -> Iterator[Sample]:
        _, world_size, _, _ = pytorch_worker_info()
        if world_size > len(shards):
            # A process with no shard would leave the others waiting at their next collective.
            raise DataError(f"{len(shards)} shard(s) for {world_size} processes; write at least one shard per process")
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(shards),
            wds.split_by_node,
            wds.split_by_worker,
            partial(_read_tars, handler=handler),
            partial(group_by_keys, handler=handler),
        )
        for raw in pipeline:
            yield _shard_sample(raw)

    return generate()


def _load_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Yields (index, place for messages, record) from a .json list or a .jsonl file."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
        for index, record in enumerate(records):
            yield index, f"record {index} of {path}", record
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            index = 0
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {line_no}: invalid JSON ({e.msg}); one object per line") from None
                yield index, f"line {line_no} of {path}", record
                index += 1
    else:
        raise DataError(f"{path}: expected a .json list or a .jsonl file of records, not {suffix or 'no suffix'!r}")


def _parse_record(record: Any, *, default_id: str, place: str, source: str, resolve: Resolver) -> Sample:
    """Turns one LLaVA or messages record into a Sample; ``place`` says where it is, for messages."""
    if not isinstance(record, dict):
        raise DataError(f"{place}: expected a JSON object, found a {type(record).__name__}")
    sample_id = str(record["id"]) if "id" in record else default_id
    where = f"sample {sample_id!r} ({place})"

    if "conversations" in record and "messages" in record:
        raise DataError(f"{where}: has both 'conversations' and 'messages'; keep one")
    if "conversations" in record:
        turns, role_key, text_key, roles = record["conversations"], "from", "value", _LLAVA_ROLES
    elif "messages" in record:
        turns, role_key, text_key, roles = record["messages"], "role", "content", _MESSAGE_ROLES
    else:
        raise DataError(
            f"{where}: neither 'conversations' (LLaVA) nor 'messages' among its keys {sorted(record)}; "
            "see mmpost/data/sources.py for the two record formats"
        )
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of turns")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(f"{where}: turn {k} should be an object with {role_key!r} and {text_key!r}")
        role = roles.get(turn[role_key])
        if role is None:
            raise DataError(f"{where}: turn {k} has {role_key} {turn[role_key]!r}; expected one of {sorted(roles)}")
        if not isinstance(turn[text_key], str):
            raise DataError(f"{where}: turn {k}'s {text_key!r} should be a string with placeholders for media")
        messages.append({"role": role, "content": turn[text_key]})

    media: dict[str, list[Path | bytes]] = {}
    media_keys = {"id", "conversations", "messages"}
    for modality in PLACEHOLDERS:
        present = [key for key in (modality, f"{modality}s") if key in record]
        media_keys.update(present)
        if len(present) == 2:
            raise DataError(f"{where}: has both {present[0]!r} and {present[1]!r}; keep one")
        if not present or record[present[0]] is None:
            continue
        refs = record[present[0]]
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not all(isinstance(ref, str) for ref in refs):
            raise DataError(f"{where}: {present[0]!r} should be a string or a list of strings")
        if refs:
            media[modality] = [resolve(modality, ref) for ref in refs]
    meta = {key: value for key, value in record.items() if key not in media_keys}
    return Sample(id=sample_id, messages=messages, media=media, meta=meta, source=source)


def _check_media_exist(samples: list[Sample], path: Path, root: Path) -> None:
    """Raises DataError naming the missing media files, if any; one directory listing per folder."""
    # Listing each folder once is far cheaper than a stat per file on network file systems, where LLaVA's
    # 665k records name a few folders many times over.
    wanted: dict[Path, list[tuple[Sample, Path]]] = defaultdict(list)
    for sample in samples:
        for refs in sample.media.values():
            for ref in refs:
                wanted[ref.parent].append((sample, ref))
    missing = []
    for folder, items in wanted.items():
        try:
            names = set(os.listdir(folder))
        except OSError:
            names = set()
        # A name absent from the listing is stat'ed too, for case-insensitive file systems.
        missing += [(s, ref) for s, ref in items if ref.name not in names and not ref.exists()]
    if missing:
        examples = "; ".join(f"sample {s.id!r}: {ref}" for s, ref in missing[:5])
        raise DataError(
            f"{path}: {len(missing)} media file(s) do not exist, e.g. {examples}. "
            f"Refs are resolved against {root}; pass image_root= if the media live elsewhere"
        )


def _expand_shards(urls: str | Path | Iterable[str | Path]) -> list[str]:
    """Expands patterns and directories into a shard list, checking local shards exist."""
    items = [urls] if isinstance(urls, (str, Path)) else list(urls)
    shards: list[str] = []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.name.endswith(_SHARD_SUFFIXES))
            if not found:
                raise DataError(f"{item}: no shard files ({', '.join(_SHARD_SUFFIXES)}) in this directory")
            shards += found
        else:
            shards += expand_urls(item)
    if not shards:
        raise DataError(f"no shards in {urls!r}")
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shard(s) do not exist, e.g. {missing[0]}")
    return shards


def _read_tars(shards: Iterable[dict[str, str]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Yields the files of each shard, then webdataset's end-of-shard marker; closes each shard when done."""
    # webdataset's own opener (the one WebDataset uses) leaves closing a shard to the garbage collector.
    for shard in shards:
        try:
            stream = gopen(shard["url"])
        except Exception as e:
            if handler(e):
                continue
            break
        try:
            yield from tar_file_expander([{"url": shard["url"], "stream": stream}], handler=handler)
        finally:
            stream.close()


def _shard_sample(raw: dict[str, Any]) -> Sample:
    """Turns one webdataset sample (``__key__``, ``__url__``, one entry per extension) into a Sample."""
    key, url = raw["__key__"], raw["__url__"]
    place = f"key {key!r} of shard {url}"
    if "json" not in raw:
        entries = sorted(k for k in raw if not k.startswith("__"))
        raise DataError(f"{place}: no .json entry (entries: {entries}); each sample needs a <key>.json record")
    try:
        record = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{place}: its .json is not valid JSON ({e})") from None
    if isinstance(record, dict):
        for modality, extensions in _MEDIA_EXTENSIONS.items():
            if modality in record or f"{modality}s" in record:
                continue
            unnamed = sorted(k for k in raw if k.rsplit(".", 1)[-1] in extensions)
            if len(unnamed) == 1:
                record = {**record, f"{modality}s": unnamed}
            elif unnamed:
                raise DataError(
                    f"{place}: {len(unnamed)} {modality} entries {unnamed} but its json does not say their order; "
                    f"list them in its {modality + 's'!r} field in placeholder order"
                )

    def resolve(modality: str, ref: str) -> bytes:
        entry = raw.get(ref.lower())  # webdataset lower-cases entry extensions
        if not isinstance(entry, bytes):
            entries = sorted(k for k in raw if not k.startswith("__"))
            raise DataError(f"{place}: its json names {modality} entry {ref!r}, but the sample has only {entries}")
        return entry

    sample = _parse_record(record, default_id=key, place=place, source=url, resolve=resolve)
    try:
        sample.check_placeholders()
    except DataError as e:
        if sample.id == key:
            raise
        raise DataError(f"{e} (shard key {key!r})") from None
    return sample
