"""tools/vllm_check.py without vLLM: its requests (the export's own chat template, the probe images) answered by
transformers give the answers the export report recorded, so the comparison it makes in vLLM is like for like."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmpost.export import export, read_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from vllm_check import compare, probe_requests  # noqa: E402


def test_the_requests_answered_by_transformers_equal_the_report(make_model, tmp_path):
    torch.manual_seed(0)
    out = export(make_model("mlp"), tmp_path / "hf", fmt="hf")
    requests, expected = probe_requests(out)
    assert len(requests) == len(read_report(out)["probes"]) == 4
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    got = []
    for request in requests:
        inputs = processor(text=request["prompt"], images=request["multi_modal_data"]["image"], return_tensors="pt")
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        got.append(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    result = compare(expected, got)
    assert result["passed"], result
    assert not compare(expected, [*got[:-1], got[-1] + " x"])["passed"]
