"""Loads an ``--format hf`` export in vLLM and compares its greedy answers on the probe images with the ones the
export report recorded from mmpost's model (float, or the quantized model for a quantized export).

    python tools/vllm_check.py EXPORT [EXPORT ...] [--json out.json]

vLLM needs a GPU. The probes are those of every export check (``mmpost.export.check``): the pictures
``probe_image(i)`` at 64 px and the prompts in ``export_report.json``, each as one user turn with the image before
the question, rendered by the export's own processor chat template and given to vLLM with the image as its
multimodal input; ``temperature 0`` and the report's number of new tokens. An export passes when every probe's
answer is the report's. Exit status 0 when all exports pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def probe_requests(export: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """vLLM requests for the probes of ``export`` and the answers its report recorded."""
    from transformers import AutoProcessor

    from mmpost.export.check import probe_image

    report = json.loads((export / "export_report.json").read_text())
    processor = AutoProcessor.from_pretrained(export)
    requests, answers = [], []
    for probe in report["probes"]:
        content = [{"type": "image"}, {"type": "text", "text": probe["prompt"]}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        requests.append({"prompt": prompt, "multi_modal_data": {"image": probe_image(probe["image"])}})
        answers.append(probe["answer"])
    return requests, answers


def compare(expected: list[str], got: list[str]) -> dict[str, Any]:
    same = sum(a == b for a, b in zip(expected, got, strict=True))
    pairs = [{"mmpost": a, "vllm": b} for a, b in zip(expected, got, strict=True)]
    return {"greedy_agreement": f"{same}/{len(expected)}", "passed": same == len(expected), "answers": pairs}


def check(export: Path) -> dict[str, Any]:
    import gc

    import torch
    from vllm import LLM, SamplingParams

    from mmpost.export.check import PROBE_NEW_TOKENS

    requests, expected = probe_requests(export)
    llm = LLM(model=str(export), max_model_len=2048, gpu_memory_utilization=0.4, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=PROBE_NEW_TOKENS)
    got = [out.outputs[0].text.strip() for out in llm.generate(requests, params)]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {"export": str(export)} | compare(expected, got)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = []
    for export in args.exports:
        results.append(check(export))
        print(f"{export}: {results[-1]['greedy_agreement']} probe answers equal to the report's")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
