"""Black-box (sequence-level) distillation data: the teacher answers prompts, and its answers become sft data.

This is how DeepSeek-R1's small models were made (Kim & Rush 2016 call it sequence-level KD): it needs
neither the teacher's logits nor its tokenizer, so the student may be any model. ``mmpost distill-data``
reads conversations (JSON / JSONL or shards), drops each one's final assistant turn if it has one, lets the
teacher answer, and writes messages records that ``data.train`` of an sft run reads.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmpost.config.schema import DataSourceConfig
from mmpost.data.chat import Skipped
from mmpost.data.loader import read_source
from mmpost.data.pipeline import PromptPipeline
from mmpost.data.sample import DataError, Sample
from mmpost.data.sources import iter_shards
from mmpost.model.build import load_lmm
from mmpost.model.format import resolve_model_dir
from mmpost.model.lmm import LMM

log = logging.getLogger("mmpost")
MEDIA_KEYS = {"image": "images", "audio": "audios"}


def prompt_of(sample: Sample) -> Sample:
    """``sample`` without its final assistant turn: what the teacher answers."""
    messages = sample.messages
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return Sample(sample.id, messages, sample.media, sample.meta, sample.source)


def media_refs(sample: Sample, media_dir: Path) -> dict[str, list[str]]:
    """The sample's media as paths for a JSON record; media held as bytes (from shards) are written to files."""
    out: dict[str, list[str]] = {}
    for modality, refs in sample.media.items():
        paths = []
        for n, ref in enumerate(refs):
            if isinstance(ref, bytes):
                media_dir.mkdir(parents=True, exist_ok=True)
                path = media_dir / f"{sample.id.replace('/', '_')}-{modality}-{n}.bin"
                path.write_bytes(ref)
                ref = path
            paths.append(str(Path(ref).resolve()))
        out[MEDIA_KEYS[modality]] = paths
    return out


@torch.no_grad()
def write_teacher_answers(
    teacher: LMM | str | Path,
    source: DataSourceConfig,
    out: str | Path,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 0.0,
    max_samples: int = 0,
    max_length: int = 2048,
) -> dict[str, Any]:
    """Writes ``out`` (JSONL, messages records with absolute media paths) with the teacher's answers.

    Args:
        temperature: 0 answers greedily; above 0 samples at that temperature.
        max_samples: answer at most this many prompts; 0 answers all.

    Returns:
        counts: ``{"written", "skipped", "empty"}``.
    """
    out = Path(out)
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a directory; name the .jsonl file to write")
    if not isinstance(teacher, LMM):
        teacher = load_lmm(resolve_model_dir(teacher, what="teacher"))
    teacher.eval()
    samples = read_source(source, "--data")
    stream = iter(samples) if samples is not None else iter_shards(source.path)
    if max_samples > 0:
        stream = itertools.islice(stream, max_samples)
    pipeline = PromptPipeline.for_model(teacher, max_length)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    counts = {"written": 0, "skipped": 0, "empty": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    with out.open("w") as f, tqdm(desc="teacher answers", unit="sample", total=len(samples or []) or None) as bar:
        while chunk := list(itertools.islice(stream, batch_size)):
            prompts = [prompt_of(s) for s in chunk]
            items = [pipeline.process(p) for p in prompts]
            for item in items:
                if isinstance(item, Skipped):
                    log.warning("distill-data: skipped %s (%s)", item.where, item.reason)
            kept = [p for p, item in zip(prompts, items, strict=True) if not isinstance(item, Skipped)]
            counts["skipped"] += len(chunk) - len(kept)
            bar.update(len(chunk))
            if not kept:
                continue
            batch = pipeline.collate(items).to(device)
            tokens = teacher.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens, **sampling)
            for prompt, row in zip(kept, tokens, strict=True):
                answer = teacher.tokenizer.decode(row, skip_special_tokens=True).strip()
                if not answer:
                    counts["empty"] += 1
                    continue
                record = {"id": prompt.id, "messages": [*prompt.messages, {"role": "assistant", "content": answer}]}
                record |= media_refs(prompt, out.parent / (out.stem + "_media"))
                record |= {k: v for k, v in prompt.meta.items() if k not in ("messages", "conversations")}
                f.write(json.dumps(record) + "\n")
                counts["written"] += 1
    if counts["written"] == 0:
        raise DataError(f"the teacher answered none of the prompts of {source.path}; see the warnings above")
    log.info("distill-data: %s -> %s", counts, out)
    return counts
