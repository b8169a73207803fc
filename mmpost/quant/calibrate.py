"""GPTQ calibration: samples run through the whole LMM, and what each linear layer of the LLM receives.

Multimodal calibration feeds the conversations as training and serving do: the encoder and connector
turn the media into tokens and the LLM's layers see them among the text. Text-only calibration (what
LLaMA-Factory and most GPTQ scripts do for multimodal models) strips media and placeholders from the
same samples, so the two can be compared on equal text.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from mmpost.config.schema import DataSourceConfig
from mmpost.data.batches import ConversationBatch
from mmpost.data.chat import Skipped
from mmpost.data.loader import read_source
from mmpost.data.pipeline import ConversationPipeline
from mmpost.data.sample import PLACEHOLDERS, Sample
from mmpost.data.sources import iter_shards
from mmpost.model.lmm import LMM

log = logging.getLogger("mmpost")


def text_only(sample: Sample) -> Sample:
    """``sample`` without its media and without their placeholders in the text."""
    messages = []
    for message in sample.messages:
        content = message["content"]
        for token in PLACEHOLDERS.values():
            content = content.replace(token + "\n", "").replace(token, "")
        messages.append({**message, "content": content.strip()})
    return replace(sample, messages=messages, media={})


def calibration_batches(
    model: LMM, samples: list[Sample], num_samples: int, batch_size: int, max_length: int, text: bool = False
) -> list[ConversationBatch]:
    """Collated full conversations (prompt and answer), the first ``num_samples`` usable ones."""
    pipeline = ConversationPipeline.for_model(model, max_length)
    process, collate = pipeline.process, pipeline.collate
    items = []
    for sample in samples:
        if len(items) == num_samples:
            break
        item = process(text_only(sample) if text else sample)
        if isinstance(item, Skipped):
            log.warning("calibration: skipped %s (%s)", sample.where(), item.reason)
            continue
        items.append(item)
    if not items:
        raise ValueError("calibration: no usable sample (all were skipped); see the warnings above")
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


@dataclass
class InputStats:
    """What one linear layer received over the calibration set (real tokens only, padding excluded).

    Attributes:
        hessian: sum of ``x xᵀ`` over its input rows, float32.
        abs_max: per input channel, the largest ``|x|`` (SmoothQuant).
        abs_sum: per input channel, the sum of ``|x|`` (AWQ's mean activation is ``abs_sum / rows``).
        weighted_abs_sum: with row weights given, the sum of each row's ``|x|`` times its weight.
        weight_sum: the sum of those weights.
        rows: input rows (tokens) seen.
        media_rows: of those, rows at media-token positions.
    """

    hessian: torch.Tensor
    abs_max: torch.Tensor
    abs_sum: torch.Tensor
    weighted_abs_sum: torch.Tensor
    weight_sum: float = 0.0
    rows: int = 0
    media_rows: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per channel, each row weighed by its weight when row weights were given."""
        if self.weight_sum > 0:
            return self.weighted_abs_sum / self.weight_sum
        return self.abs_sum / max(self.rows, 1)


@dataclass
class ParentInputs:
    """A module's calibration calls, to run it again on the same inputs: per batch its arguments and which of its
    output positions are real tokens."""

    module: nn.Module
    calls: list[tuple[tuple, dict, torch.Tensor]]

    @torch.no_grad()
    def replay(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per call (one per calibration batch), the module's output ``[B, T, D]`` and the real-token mask."""
        outs = []
        for args, kwargs, keep in self.calls:
            out = self.module(*args, **kwargs)
            outs.append((out[0] if isinstance(out, tuple) else out, keep))
        return outs


class _Stop(Exception):
    """Ends a calibration forward once the layer of interest has run."""


@torch.no_grad()
def layer_inputs(
    model: LMM,
    batches: list[dict],
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    parents: list[nn.Module] = (),
    row_weights: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[dict[str, InputStats], list[ParentInputs]]:
    """Runs ``batches`` through the whole LMM up to decoder layer ``layer`` and gathers the inputs of its
    ``linears``, and the calls of ``parents`` (modules inside the layer) for replaying them. Earlier layers are
    already quantized when the pass goes layer by layer, so each layer compensates the error of those before it.
    ``row_weights``: per linear, per batch ``[B, T]`` weights of its input rows for ``InputStats.abs_mean``."""
    row_weights = row_weights or {}
    placeholder_ids = torch.tensor(list(model.placeholder_ids.values()))
    device = next(model.parameters()).device
    stats = {
        name: InputStats(
            torch.zeros(m.in_features, m.in_features, device=device),
            torch.zeros(m.in_features, device=device),
            torch.zeros(m.in_features, device=device),
            torch.zeros(m.in_features, device=device),
        )
        for name, m in linears.items()
    }
    cached = [ParentInputs(p, []) for p in parents]
    current: dict[str, torch.Tensor] = {}

    def gather(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            rows = args[0][current["keep"]].float()
            entry = stats[name]
            entry.hessian += rows.T @ rows
            magnitude = rows.abs()
            entry.abs_max = torch.maximum(entry.abs_max, magnitude.amax(dim=0)) if len(rows) else entry.abs_max
            entry.abs_sum += magnitude.sum(dim=0)
            if name in row_weights:
                weights = row_weights[name][current["index"]].to(rows.device)[current["keep"]]
                entry.weighted_abs_sum += weights @ magnitude
                entry.weight_sum += float(weights.sum())
            entry.rows += rows.shape[0]
            entry.media_rows += int(current["media"].sum())

        return hook

    def record(parent: ParentInputs):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            parent.calls.append((args, dict(kwargs), current["keep"]))

        return hook

    def stop(module: nn.Module, args: tuple, output) -> None:
        raise _Stop

    handles = [m.register_forward_pre_hook(gather(name)) for name, m in linears.items()]
    handles += [p.module.register_forward_pre_hook(record(p), with_kwargs=True) for p in cached]
    handles.append(layer.register_forward_hook(stop))
    try:
        for index, batch in enumerate(batches):
            batch = batch.to(device)
            current["index"] = index
            current["keep"] = batch.attention_mask.bool()
            current["media"] = torch.isin(batch.input_ids, placeholder_ids.to(device)) & current["keep"]
            try:
                model.hidden_states(batch.input_ids, batch.attention_mask, batch.media)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats, cached


def calibration_samples(options, calib: str | Path | DataSourceConfig | None, source_dir: Path | None) -> list[Sample]:
    """The calibration conversations: ``calib`` (a data source, a data file, shards, or a run config whose
    training data to use), else ``options.calib``, else the training data of the run ``source_dir`` belongs to.

    Raises:
        ValueError: when none of these names any data.
    """
    from mmpost.config import load_config

    source = options.calib
    if isinstance(calib, DataSourceConfig):
        source = calib
    elif calib is not None:
        calib = str(calib)
        is_config = calib.endswith((".yaml", ".yml"))
        source = load_config(calib).data.train if is_config else DataSourceConfig(path=calib)
    elif not source.path and source_dir is not None and (source_dir.parent / "config.yaml").is_file():
        source = load_config(source_dir.parent / "config.yaml").data.train
        log.info("calibration: the run's training data, %s", source.path)
    if not source.path:
        raise ValueError(
            f"{options.method_label()} needs calibration samples: pass --calib DATA (a .json / .jsonl file, shards, "
            "or a run config), or export a run directory, whose training data is then used"
        )
    samples = read_source(source, "calib")
    if samples is None:
        samples = list(itertools.islice(iter_shards(source.path), options.num_samples))
    return samples
