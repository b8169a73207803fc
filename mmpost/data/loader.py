"""DataLoaders for a run: reading a source, sharding batches across processes, resuming mid-epoch.

Map-style (JSON) data uses ``EpochBatchSampler``: a seeded permutation per epoch, cut into global
batches of ``batch_size x world_size``; process ``r`` takes slice ``r`` of each. A 2 x 4 run therefore
sees exactly the samples of a 1 x 8 run, and resuming at batch ``k`` skips ``k`` batches without
loading them.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from mmpost.config.schema import DataConfig, DataSourceConfig
from mmpost.data.chat import ChatEncoder, Skipped
from mmpost.data.dataset import Collator, ListDataset, SampleProcessor, ShardDataset
from mmpost.data.sample import DataError, Sample
from mmpost.model.lmm import LMM


def is_json_source(path: str) -> bool:
    return Path(path).suffix in (".json", ".jsonl")


def read_source(cfg: DataSourceConfig, what: str) -> list[Sample] | None:
    """Samples of a JSON / JSONL source (validated up front), or None for webdataset shards."""
    from mmpost.data.sources import read_records

    if not cfg.path:
        raise FileNotFoundError(f"{what}.path is empty: name a .json / .jsonl file or webdataset shards")
    if not is_json_source(cfg.path):
        return None
    samples = read_records(cfg.path, image_root=cfg.image_root)
    return samples[: cfg.max_samples] if cfg.max_samples > 0 else samples


class EpochBatchSampler(Sampler[list[int]]):
    """This process's batches of one epoch, from a per-epoch seeded permutation.

    Args:
        num_samples: dataset size.
        batch_size: samples per process per batch.
        rank, world: this process and the number of processes.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        shuffle: permute (training) or keep order (evaluation).
        drop_last: drop the last incomplete global batch (training), or give every process its rest.
    """

    def __init__(
        self, num_samples: int, batch_size: int, rank: int, world: int, seed: int, shuffle: bool, drop_last: bool
    ) -> None:
        self.n, self.batch_size, self.rank, self.world = num_samples, batch_size, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        per_step = self.batch_size * self.world
        return self.n // per_step if self.drop_last else math.ceil(self.n / per_step)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        per_step = self.batch_size * self.world
        for g in range(self.start_batch, self.batches_per_epoch()):
            chunk = order[g * per_step : (g + 1) * per_step]
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if mine:
                yield mine


def make_pipeline(model: LMM, max_length: int, mode: str) -> tuple[SampleProcessor, Collator]:
    """The per-sample processor and the batch collator for ``model``'s tokenizer and encoders.

    Args:
        mode: "train", "generate" or "prompt" (see ``SampleProcessor``); prompts are left-padded.
    """
    chat = ChatEncoder(model.tokenizer, model.placeholder_ids, max_length)
    processors = {m: e.preprocessor() for m, e in model.encoders.items()}
    side = "right" if mode == "train" else "left"
    return SampleProcessor(chat, processors, model.media_tokens, mode), Collator(
        model.tokenizer.pad_token_id, processors, side
    )


def make_loader(
    samples: list[Sample] | None,
    source: DataSourceConfig,
    model: LMM,
    data: DataConfig,
    batch_size: int,
    mode: str,
    rank: int,
    world: int,
    seed: int,
    shuffle: bool,
    pipeline: Any = None,
) -> tuple[DataLoader, EpochBatchSampler | None]:
    """A DataLoader over ``samples`` (map-style) or over ``source``'s shards when ``samples`` is None.

    ``pipeline`` (with ``process`` and ``collate``) replaces ``model``'s own, e.g. to prepare each sample
    for a distillation teacher too.
    """
    process, collate = make_pipeline(model, data.max_length, mode)
    if pipeline is not None:
        process, collate = pipeline.process, pipeline.collate
    # Its own generator: each new iterator draws a worker base seed, and drawing it from the global RNG
    # would shift dropout masks after a resume (which creates an iterator mid-epoch).
    workers = dict(num_workers=data.num_workers, generator=torch.Generator().manual_seed(seed))
    if data.num_workers > 0:
        workers["multiprocessing_context"] = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
        workers["worker_init_fn"] = leave_signals_to_the_main_process
    if samples is not None:
        sampler = EpochBatchSampler(len(samples), batch_size, rank, world, seed, shuffle, drop_last=shuffle)
        loader = DataLoader(ListDataset(samples, process), batch_sampler=sampler, collate_fn=collate, **workers)
        return loader, sampler
    from mmpost.data.sources import iter_shards

    dataset = ShardDataset(lambda: iter_shards(source.path), process)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, **workers), None


def leave_signals_to_the_main_process(_worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: the main process stops the run (``mmpost.training.interrupt``).
    A Ctrl-C reaches the whole process group and would otherwise kill the workers under the main process's feet."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class StandIn:
    """A one-sample batch of the training data, for a process whose micro-batch lost every sample.

    Processes under DDP must run the same forwards and backwards; such a process runs this batch with its loss
    weighted by 0. It is the first usable sample of the loader's dataset, found on first use and kept.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.batch: dict[str, Any] | None = None

    def __call__(self) -> dict[str, Any]:
        if self.batch is None:
            dataset = self.loader.dataset
            items = (dataset[i] for i in range(len(dataset))) if isinstance(dataset, ListDataset) else iter(dataset)
            item = next((x for x in items if not isinstance(x, Skipped)), None)
            if item is None:
                raise DataError("no sample of data.train is usable: every one was skipped (see train.log)")
            self.batch = self.loader.collate_fn([item])
        return self.batch
