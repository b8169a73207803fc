"""Released multimodal models in and out: a transformers checkpoint taken apart into mmpost parts, and an
mmpost model re-assembled into the transformers class whose layout its parts fit.

::

    model = mmpost.from_pretrained("path/to/llava-1.5-7b-hf")   # or, in a run config, from: hf:path/to/...
    mmpost export run/ --format hf --out served/                  # the family is chosen from the parts

One module per family; each names the ``config.json`` architectures it reads (``Family.architectures``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmpost.families.base import CheckpointError, ExportError, Family, read_config
from mmpost.registry import Registry

if TYPE_CHECKING:
    from mmpost.model.lmm import LMM

# The spelling of a released checkpoint where a saved mmpost model or run is expected (``from: hf:PATH``).
HF_PREFIX = "hf:"

FAMILIES = Registry("released model family")
FAMILIES.add("llava", "mmpost.families.llava:Llava")
FAMILIES.add("qwen2_vl", "mmpost.families.qwen2_vl:Qwen2VL")
FAMILIES.add("blip2", "mmpost.families.blip2:Blip2")
FAMILIES.add("instructblip", "mmpost.families.blip2:InstructBlip")
FAMILIES.add("qwen2_audio", "mmpost.families.qwen2_audio:Qwen2Audio")

# config.json architecture -> family
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
    "Blip2ForConditionalGeneration": "blip2",
    "InstructBlipForConditionalGeneration": "instructblip",
    "Qwen2AudioForConditionalGeneration": "qwen2_audio",
}

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "HF_PREFIX",
    "CheckpointError",
    "ExportError",
    "family_for",
    "from_pretrained",
    "open_model",
]


def family(name: str) -> Family:
    return FAMILIES.get(name)()


def from_pretrained(path: str | Path) -> LMM:
    """The mmpost model of a released transformers checkpoint (a ``save_pretrained`` directory, a ``pkg:``
    folder, or a hub id that is cached or reachable), its class read from ``config.json``.

    Raises:
        CheckpointError: for a class mmpost does not take apart (the supported ones are named), or a checkpoint
            with missing tensors (named).
        FileNotFoundError: if ``path`` does not exist.
    """
    from mmpost.weights import locate_pretrained

    text = str(path)
    text = text[len(HF_PREFIX) :] if text.startswith(HF_PREFIX) else text
    where = locate_pretrained(text, "from")
    directory = Path(where) if Path(where).exists() else _download(where)
    config = read_config(directory)
    architectures = config.get("architectures") or []
    known = [a for a in architectures if a in ARCHITECTURES]
    if not known:
        raise CheckpointError(
            f"{text}: a {', '.join(architectures) or config.get('model_type', 'model without architectures')}; "
            f"mmpost imports {', '.join(sorted(ARCHITECTURES))}"
        )
    return family(ARCHITECTURES[known[0]]).load(directory, known[0])


def open_model(source: str | Path, what: str = "model") -> LMM:
    """The model ``source`` names: a run (its ``final/``), a saved mmpost model, or ``hf:PATH`` (a released one)."""
    from mmpost.model.build import load_lmm
    from mmpost.model.format import resolve_model_dir

    if str(source).startswith(HF_PREFIX):
        return from_pretrained(source)
    return load_lmm(resolve_model_dir(source, what=what))


def family_for(model: LMM) -> Family:
    """The family whose transformers layout ``model``'s parts fit.

    Raises:
        ExportError: naming, for every family, what does not fit, and the mmpost format as the way out.
    """
    reasons = []
    for name in FAMILIES.names():
        candidate = family(name)
        why = candidate.why_not(model)
        if why is None:
            return candidate
        reasons.append(f"{candidate.class_names}: {why}")
    raise ExportError(
        "no transformers class holds this model's parts; --format hf needs one of\n  - "
        + "\n  - ".join(reasons)
        + "\nExport with --format mmpost instead (mmpost.load reads any parts)"
    )


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # the hub answered but cannot serve it: no such repo, gated, ...
        raise FileNotFoundError(f"from: {repo_id} could not be fetched from the hub ({err})") from None
