"""Exports for serving; every export is reloaded and checked against the source before it is reported.

- ``mmpost``: mmpost's own format with LoRA merged; reloads with ``mmpost.load``.
- ``hf``: transformers' ``LlavaForConditionalGeneration`` layout (see ``hf_llava``); reloads with
  ``AutoModelForImageTextToText`` / ``AutoProcessor``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from mmpost.export.check import check_hf_export, check_mmpost_export
from mmpost.export.hf_llava import ExportError, export_llava
from mmpost.model.io import load_lmm, resolve_model_dir
from mmpost.model.lmm import LMM

__all__ = ["ExportError", "export"]
log = logging.getLogger("mmpost")


def export(model: LMM | str | Path, out: str | Path, fmt: str = "mmpost", force: bool = False) -> Path:
    """Writes ``model`` (a model, saved directory or run) to ``out`` in format ``fmt`` and verifies it.

    Raises:
        FileExistsError: if ``out`` is not empty and ``force`` is False.
        ExportError: if the model's parts do not fit ``fmt``, or the reloaded export disagrees with
            the source (``out`` is then removed).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to replace it")
    if fmt not in ("mmpost", "hf"):
        raise ExportError(f"unknown export format {fmt!r}; use mmpost or hf")
    if not isinstance(model, LMM):
        model = load_lmm(resolve_model_dir(model))
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch.no_grad():
            if fmt == "hf":
                export_llava(model, tmp)
                report = check_hf_export(model, tmp)
            else:
                model.save(tmp, merge_lora=True)
                report = check_mmpost_export(model, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("export %s verified: %s", fmt, report)
    return out
