"""File writing shared by the synthetic data generators (``write.py``, ``audio.py``, ``rl.py``).

Everything here writes deterministic bytes: JSON with a fixed layout, tar shards with ``mtime=0`` and
pre-encoded entries. ``clear_previous`` removes an earlier output by its manifest, so a smaller or
narrower run never leaves stale files behind for a directory reader to pick up.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import webdataset as wds

MANIFEST = "synth.json"

# The media of one split as drawn: (labels, ref, encoded bytes) per item.
Drawn = list[tuple[Any, str, bytes]]


def balanced(tasks: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """``n`` tasks, as equal in number as ``n`` allows, in a shuffled order."""
    order = [tasks[i % len(tasks)] for i in range(n)]
    rng.shuffle(order)
    return order


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def write_shards(
    out: Path,
    folder: str,
    records: list[dict[str, Any]],
    media: list[bytes],
    modality: str,
    ext: str,
    shard_size: int,
    prefix: str = "sft",
) -> list[str]:
    """Writes messages records with one medium each as shards of ``<id>.<ext>`` + ``<id>.json``.

    The json is the record with its ``"<modality>s"`` refs, if any, replaced by ``[ext]``, the extension key of
    the tar entry, as its last key: ``{"id", "messages", ..., "<modality>s": [ext]}``. Other keys (``task``,
    ``answer``, ``chosen``, ...) stay as they are.

    Returns:
        The shard names relative to ``out``: ``<folder>/<prefix>-000000.tar`` ...
    """
    (out / folder).mkdir(exist_ok=True)
    refs_key = f"{modality}s"
    names = []
    for k, start in enumerate(range(0, len(records), shard_size)):
        name = f"{folder}/{prefix}-{k:06d}.tar"
        # mtime=0 and pre-encoded bytes (encoder=False) keep the tar byte-identical across runs.
        with wds.TarWriter(str(out / name), encoder=False, mtime=0) as writer:
            chunk = zip(records[start : start + shard_size], media[start : start + shard_size], strict=True)
            for record, blob in chunk:
                meta = {**{n: v for n, v in record.items() if n != refs_key}, refs_key: [ext]}
                writer.write({"__key__": record["id"], ext: blob, "json": json.dumps(meta).encode("utf-8")})
        names.append(name)
    return names


def clear_previous(out: Path) -> None:
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
    folders = set()
    for entry in files.values():
        for name in [entry] if isinstance(entry, str) else entry:
            (out / name).unlink(missing_ok=True)
            folders.update(parent for parent in (out / name).parents if out in parent.parents)
    manifest_path.unlink()
    # Folders left empty go too (deepest first), so an image-only run after a full one leaves no bare audio/.
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
