"""Opt-in (``-m slow``): the demo's sft model exported to GGUF and answered by llama.cpp itself.

llama.cpp's tools (``llama-server``) come from ``$MMPOST_LLAMA_CPP`` (a build's bin folder) or are built from source by
``tools/build_llama_cpp.py`` (some minutes on 2 cores; the build is kept in ~/.cache/mmpost for later runs). The f16
export must answer the probes with the source's greedy tokens; the q8_0 export's held-out accuracy on 100 demo
questions must be within 2 points of the source model's on the same questions."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpost.answers import completion_answers
from mmpost.config.schema import DataSourceConfig
from mmpost.data.loader import read_source
from mmpost.data.pipeline import PromptPipeline
from mmpost.export import export, read_report
from mmpost.export.llama_cpp_check import LLAMA_CPP_ENV, SERVER, LlamaServer, find_tool
from mmpost.model.build import load_lmm
from mmpost.model.format import resolve_model_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 100
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llama_cpp_bin() -> Path:
    binary = find_tool(SERVER)
    if binary is not None:
        return binary.parent
    sys.path.insert(0, str(ROOT / "tools"))
    from build_llama_cpp import build

    return build()


def source_answers(model, samples) -> list[str]:
    pipeline = PromptPipeline.for_model(model, max_length=1 << 30)
    answers = []
    for sample in samples:
        batch = pipeline.collate([pipeline.process(sample)])
        with torch.no_grad():
            tokens = model.generate(batch.input_ids, batch.attention_mask, batch.media, NEW_TOKENS)[0].tolist()
        if model.tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(model.tokenizer.eos_token_id)]
        answers.append(model.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers


def test_the_demo_model_answers_alike_in_llama_cpp(demo_sft, llama_cpp_bin, tmp_path, monkeypatch):
    monkeypatch.setenv(LLAMA_CPP_ENV, str(llama_cpp_bin))
    run = demo_sft / "runs" / "sft"
    f16 = export(run, tmp_path / "f16", fmt="gguf", quantize="f16")
    q8 = export(run, tmp_path / "q8", fmt="gguf", quantize="q8_0")
    for folder in (f16, q8):
        report = read_report(folder)
        assert report["engine"]["engine"].startswith("llama.cpp"), report["engine"]
    assert read_report(f16)["engine"]["greedy_agreement"] == "4/4"

    source = demo_sft / "data" / "heldout.jsonl"
    images = str(demo_sft / "data" / "images")
    samples = read_source(DataSourceConfig(path=str(source), image_root=images), "data.eval")
    samples = samples[:QUESTIONS]
    model = load_lmm(resolve_model_dir(run)).eval()
    ours = source_answers(model, [replace(s, messages=s.messages[:-1]) for s in samples])
    files = read_report(q8)["gguf"]["files"]
    theirs = []
    with LlamaServer(llama_cpp_bin / SERVER, q8 / files["model"], q8 / files["mmproj"]) as server:
        for sample in samples:
            ref = sample.media["image"][0]
            image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref).convert("RGB")
            png = io.BytesIO()
            image.save(png, format="PNG")
            question = sample.messages[0]["content"].replace("<image>\n", "")
            tokens = server.answer(png.getvalue(), question, NEW_TOKENS)
            eos = model.tokenizer.eos_token_id
            tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
            theirs.append(model.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    reference = [s.meta["answer"] for s in samples]
    ours_right = sum(completion_answers(a, r) for a, r in zip(ours, reference, strict=True)) / len(samples)
    theirs_right = sum(completion_answers(a, r) for a, r in zip(theirs, reference, strict=True)) / len(samples)
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    figures = {"mmpost": ours_right, "llama.cpp q8_0": theirs_right, "same_answers": same, "questions": len(samples)}
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    print(figures)
    assert abs(theirs_right - ours_right) <= 0.02, figures
