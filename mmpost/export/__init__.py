"""Exports for serving; every export is reloaded and checked against the source before it is reported.

- ``mmpost``: mmpost's own format with LoRA merged; reloads with ``mmpost.load`` for any parts.
- ``hf``: the transformers class whose layout the parts fit (``mmpost.families``: LLaVA, Qwen2-VL /
  Qwen2.5-VL, BLIP-2, Qwen2-Audio), with its processor; reloads with the transformers Auto classes. A model
  that fits none is refused with what each class would need.

- ``gguf``: llama.cpp's two files, the LLM (``model-<quant>.gguf``) and the tower with its projector
  (``mmproj-f16.gguf``), for LLaVA-style models (``mmpost.export.gguf_llm``); written from the checked LLaVA
  layout, read back, and answered by llama.cpp's ``llama-server`` on the probes where its tools are found
  (``mmpost.export.llama_cpp_check``). ``quantize`` is then ``f16`` (default), ``q8_0`` or ``q4_k_m``.

With ``quantize`` (formats ``mmpost`` and ``hf``), the quantize pass (``mmpost.quant``) runs first and the LLM
is written in the compressed-tensors format, which transformers (with ``compressed-tensors`` installed) and vLLM
load. The report (also written to ``export_report.json``) gives the reloaded export's agreement with the model it
came from, the quantized model's agreement with the float one, and the size on disk.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from mmpost.config.schema import DataSourceConfig
from mmpost.export.check import agreement, answers_text, check_hf_export, check_mmpost_export, outputs, probes
from mmpost.families import HF_PREFIX, ExportError, family_for, from_pretrained
from mmpost.model.build import load_lmm
from mmpost.model.format import resolve_model_dir
from mmpost.model.lmm import LMM

__all__ = ["ExportError", "export", "read_report"]
log = logging.getLogger("mmpost")
REPORT_NAME = "export_report.json"


def export(
    model: LMM | str | Path,
    out: str | Path,
    fmt: str = "mmpost",
    force: bool = False,
    quantize: Any = None,
    calib: str | Path | DataSourceConfig | None = None,
    llama_cpp: str | Path | None = None,
) -> Path:
    """Writes ``model`` (a model, saved directory or run) to ``out`` in format ``fmt``, verifies it, writes
    the report to ``out/export_report.json`` and returns ``out``.

    Args:
        quantize: a preset (``w4a16-gptq``), a YAML file of quantize keys, or ``QuantizeOptions``; None
            exports the weights as they are.
        calib: calibration data for gptq (a data source, a .json / .jsonl file, shards, or a run config whose
            training data to use); by default the training data of the run ``model`` names.
        llama_cpp: for ``gguf``, a llama.cpp build's bin folder (``llama-server``, ``llama-quantize``); by
            default ``$MMPOST_LLAMA_CPP``, else ``PATH``.

    Raises:
        FileExistsError: if ``out`` is not empty and ``force`` is False.
        ExportError: if the model's parts do not fit ``fmt``, or the reloaded export disagrees with
            the source (``out`` is then removed).
    """
    out = Path(out)
    if fmt not in ("mmpost", "hf", "gguf"):
        raise ExportError(f"unknown export format {fmt!r}; use mmpost, hf or gguf")
    gguf_quant = None
    if fmt == "gguf":
        from mmpost.export.gguf_llm import QUANTS, check_gguf_parts

        gguf_quant, quantize = quantize or "f16", None
        if gguf_quant not in QUANTS:
            kinds = ", ".join(QUANTS)
            raise ExportError(f"--format gguf quantizes with llama.cpp's types: {kinds}, not {gguf_quant!r}")
    source_dir = None
    if isinstance(model, LMM):
        check_out(out, None, force)
    elif str(model).startswith(HF_PREFIX):  # a released checkpoint, re-exported (quantized, say) as it is
        check_out(out, Path(str(model)[len(HF_PREFIX) :]), force)
        model = from_pretrained(model)
    else:
        source_dir = resolve_model_dir(model)
        check_out(out, Path(model), force)
        model = load_lmm(source_dir)
    model.eval()
    if gguf_quant is not None:
        check_gguf_parts(model)
    family = family_for(model) if fmt in ("hf", "gguf") else None  # before a long quantize pass
    probe_list = probes(model)
    report: dict[str, Any] = {"format": fmt}
    if quantize is not None:
        figures, expected = quantize_for_export(model, quantize, calib, source_dir, probe_list)
        report |= figures
    else:
        expected = outputs(model, probe_list)
    # what a serving engine must answer: the probe images are probe_image(i), 64 px (tools/vllm_check.py)
    answers = answers_text(model, expected)
    report["probes"] = [
        {"image": i, "prompt": p.prompt, "answer": a} for i, (p, a) in enumerate(zip(probe_list, answers, strict=True))
    ]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch.no_grad():
            if gguf_quant is not None:
                report |= export_gguf(model, family, tmp, gguf_quant, probe_list, expected, llama_cpp)
            elif family is not None:
                family.export(model, tmp)
                report["layout"] = json.loads((tmp / "config.json").read_text())["architectures"][0]
                report["reload"] = check_hf_export(
                    model, family, tmp, probe_list, hf_expected(model, probe_list, expected, report)
                )
            else:
                model.save(tmp, merge_lora=True)
                report["reload"] = check_mmpost_export(model, tmp, probe_list, expected)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from mmpost.model.compressed import disk_sizes

    report["size"] = disk_sizes(tmp)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("export %s verified: %s", fmt, json.dumps(report))
    return out


def export_gguf(model: LMM, family, tmp: Path, quant: str, probe_list, expected, llama_cpp) -> dict[str, Any]:
    """The GGUF pair in ``tmp``, written from the LLaVA layout once transformers reloads that as the source, then
    read by llama.cpp where its tools are found; returns the report's entries."""
    from mmpost.export.gguf_llm import write_gguf
    from mmpost.export.llama_cpp_check import check_in_llama_cpp

    layout = tmp / "llava"
    family.export(model, layout)
    report = {"layout": "LlavaForConditionalGeneration (the GGUF files' source, not kept)"}
    report["reload"] = check_hf_export(model, family, layout, probe_list, expected)
    report["gguf"] = write_gguf(layout, tmp, quant, Path(llama_cpp) if llama_cpp else None)
    shutil.rmtree(layout)
    report["engine"] = check_in_llama_cpp(model, tmp, report["gguf"], probe_list, expected, llama_cpp)
    return report


def check_out(out: Path, source: Path | None, force: bool) -> None:
    """Refuses an ``out`` that is a file, is not empty (without ``force``), or would overwrite the source: one
    that is the source, holds it or lies inside it (``--force`` would delete the run being exported).

    Raises:
        FileExistsError: naming ``out`` and why.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; name a directory for the export")
    if source is not None:
        src, dst = source.resolve(), out.resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            where = "is" if dst == src else ("holds" if dst in src.parents else "lies inside")
            raise FileExistsError(
                f"--out {out} {where} the model being exported ({source}); choose a folder outside it"
            )
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to replace it")


def read_report(out: str | Path) -> dict[str, Any]:
    """The report an export wrote beside its weights."""
    return json.loads((Path(out) / REPORT_NAME).read_text())


def hf_expected(model: LMM, probe_list, expected: list, report: dict[str, Any]) -> list:
    """What transformers' reload must reproduce: ``expected``, or for an FP8 KV cache the model's outputs with a
    float cache, since transformers 5 does not quantize the KV cache of a compressed-tensors checkpoint (its
    attention takes ``cache``, compressed-tensors 0.20 looks for ``past_key_values``); vLLM reads the scales. The
    report says so, with how far the float cache moves the probes."""
    state = model.quantization
    if state is None or not state.kv_scales or reload_quantizes_kv(model.base_llm):
        return expected
    state.reinstall(model.base_llm, kv=False)
    try:
        float_cache = outputs(model, probe_list)
    finally:
        state.reinstall(model.base_llm, kv=True)
    moved, _ = agreement(expected, float_cache)
    report["kv_cache"] = {
        "scales": len(state.kv_scales),
        "checked_by": "vLLM only: transformers computes the reload with a float KV cache",
        "fp8_vs_float_cache": moved,
    }
    return float_cache


def reload_quantizes_kv(llm) -> bool:
    """Whether compressed-tensors recognises the LLM's attention as one whose KV cache it quantizes on a reload (it
    looks for a ``past_key_values`` argument: transformers before the rename to ``cache``)."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module

    from mmpost.model.quantized import attention_modules

    return any(is_cached_attention_module(m) for m in attention_modules(llm).values())


def quantize_for_export(model: LMM, spec: Any, calib, source_dir: Path | None, probe_list) -> tuple[dict, list]:
    """Runs the quantize pass on ``model``; returns how far it moved from the float model, and the quantized
    model's outputs on the probes (what the export must reproduce)."""
    from mmpost.quant import calibration_samples, load_options, quantize

    options = load_options(spec)
    samples = calibration_samples(options, calib, source_dir) if options.calibrated else None
    float_outputs = outputs(model, probe_list)
    report = quantize(model, options, samples)
    quantized_outputs = outputs(model, probe_list)
    moved, _ = agreement(float_outputs, quantized_outputs)
    return {"quantization": report.summary(), "quantized_vs_float": moved}, quantized_outputs
