"""Checksum manifests: every file of a saved model or checkpoint, with its size and SHA-256.

A checkpoint can be damaged after it was written (a bad disk, a copy cut short, a stray edit), and a
damaged tensor loads without complaint: training then resumes from the wrong weights. Every directory
mmpost saves (``save_lmm``, checkpoints) gets ``checksums.json``, written last; ``verify_manifest``
reads every file again and names the first one whose size or hash differs.

::

    {"algorithm": "sha256", "files": {"model/parts.safetensors": {"size": 1234, "sha256": "..."}, ...}}
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

MANIFEST_NAME = "checksums.json"
_CHUNK = 1 << 20

log = logging.getLogger("mmpost")


class DamagedFileError(ValueError):
    """A saved file whose content differs from what was written, or that cannot be read; names the file."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, skip: tuple[str, ...] = ()) -> Path:
    """Writes ``folder/checksums.json`` over every file below ``folder``.

    Args:
        skip: relative folder names whose files are left out (they carry a manifest of their own).
    """
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME or rel.split("/")[0] in skip:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    target = folder / MANIFEST_NAME
    target.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    return target


def verify_manifest(folder: str | Path, what: str) -> bool:
    """Checks every file that ``folder/checksums.json`` lists.

    Args:
        what: what the folder is, for messages ("checkpoint", "model").

    Returns:
        False when the folder has no manifest (written before manifests existed), True when every file matches.

    Raises:
        DamagedFileError: naming the first missing, resized or changed file, or an unreadable manifest.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        log.warning("%s %s has no %s: its files cannot be checked", what, folder, MANIFEST_NAME)
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedFileError(f"{manifest} is damaged ({err}); the {what} cannot be checked") from None
    for rel, expected in files.items():
        path = folder / rel
        if not path.is_file():
            raise DamagedFileError(f"{what} {folder} is incomplete: {path} is missing")
        if path.stat().st_size != expected["size"] or file_digest(path) != expected["sha256"]:
            raise DamagedFileError(
                f"{path} is damaged: its content differs from what was written (size or SHA-256 in {manifest}); "
                f"the {what} cannot be trusted"
            )
    return True
