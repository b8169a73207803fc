"""Held-out evaluation: token loss, and exact-match accuracy of greedy answers.

Each process evaluates its shard of the held-out set; sums are reduced across processes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from accelerate.utils import send_to_device

from mmpost.model.lmm import LMM


def normalize_answer(text: str) -> str:
    """Lower-cased, outer whitespace and trailing punctuation removed, inner whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?;: ")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = batch[key].to(device)
    out["media"] = send_to_device(batch["media"], device)  # tensors, or dicts of them for audio
    return out


@torch.no_grad()
def eval_loss(model: LMM, batches: Iterable[dict[str, Any]], accelerator) -> float:
    """Mean token cross-entropy over the held-out answers (all processes' tokens weigh equally)."""
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        if not batch["ids"]:
            continue
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            out = model(batch["input_ids"], batch["attention_mask"], batch["media"], labels=batch["labels"])
        totals += torch.tensor([out.loss_sum.item(), out.num_tokens], dtype=torch.float64, device=totals.device)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


@torch.no_grad()
def eval_accuracy(
    model: LMM, batches: Iterable[dict[str, Any]], accelerator, max_new_tokens: int, tasks: Sequence[str] = ()
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Greedy answers vs. references: overall and per-task accuracy, plus a few examples.

    Args:
        tasks: every task name of the whole held-out set (the same list on every process).
    """
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    examples = []
    for batch in batches:
        if not batch["ids"]:
            continue
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            new = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], max_new_tokens)
        answers = model.tokenizer.batch_decode(new, skip_special_tokens=True)
        for answer, reference, task in zip(answers, batch["references"], batch["tasks"], strict=True):
            ok = int(normalize_answer(answer) == normalize_answer(reference))
            for key in ("", task) if task else ("",):
                hits[key][0] += ok
                hits[key][1] += 1
            if len(examples) < 3:
                examples.append({"answer": answer, "reference": reference})
    keys = ["", *sorted(set(tasks) - {""})]
    counts = torch.tensor([hits[k] for k in keys], dtype=torch.float64, device=accelerator.device).reshape(-1, 2)
    counts = accelerator.reduce(counts, reduction="sum")
    result = {}
    for key, (n_ok, n) in zip(keys, counts.tolist(), strict=True):
        if n > 0:
            result["eval/accuracy" + (f"/{key}" if key else "")] = n_ok / n
    return result, examples
