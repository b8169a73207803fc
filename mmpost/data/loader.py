"""DataLoaders for a run: reading a source, sharding batches across processes, resuming mid-epoch.

JSON data is a map-style dataset (exact resume: the sampler skips batches without loading them);
webdataset shards are an iterable one, split across processes and workers by webdataset.

Map-style (JSON) data uses ``EpochBatchSampler``: a seeded permutation per epoch, cut into global
batches of ``batch_size x world_size``; process ``r`` takes slice ``r`` of each. A 2 x 4 run therefore
sees exactly the samples of a 1 x 8 run, and resuming at batch ``k`` skips ``k`` batches without
loading them.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from mmpost.config.schema import DataSourceConfig
from mmpost.data.batches import Batch
from mmpost.data.chat import Skipped
from mmpost.data.pipeline import Pipeline
from mmpost.data.sample import DataError, Sample


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


def worker_count(configured: int | None, device: torch.device) -> int:
    """``data.num_workers``, or when it is null: 0 on the CPU, else up to 4 per local process from half the cores."""
    if configured is not None:
        return configured
    if device.type == "cpu":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(4, max(1, (os.cpu_count() or 2) // (2 * local)))


def make_loader(
    samples: list[Sample] | None,
    pipeline: Pipeline,
    *,
    batch_size: int,
    shards: str = "",
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    shuffle: bool = False,
    num_workers: int = 0,
) -> tuple[DataLoader, EpochBatchSampler | None]:
    """A DataLoader over ``samples`` (map-style), or over the webdataset ``shards`` when ``samples`` is None.

    Args:
        pipeline: turns samples into one kind of batch (``mmpost.data.pipeline``).
        batch_size: samples per process per batch.
        rank, world: this process and the number of processes (each takes its slice of every global batch).
        seed: the data order's seed (epoch ``e`` of a shuffled run uses ``seed + e``).
        shuffle: a new permutation every epoch, dropping the last incomplete global batch (training); otherwise
            the samples in order, every process getting its rest (evaluation).
        num_workers: DataLoader worker processes.
    """
    # Its own generator: each new iterator draws a worker base seed, and drawing it from the global RNG
    # would shift dropout masks after a resume (which creates an iterator mid-epoch).
    workers: dict[str, Any] = dict(num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    if num_workers > 0:
        workers["multiprocessing_context"] = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
        workers["worker_init_fn"] = leave_signals_to_the_main_process
    if samples is not None:
        sampler = EpochBatchSampler(len(samples), batch_size, rank, world, seed, shuffle, drop_last=shuffle)
        dataset = ListDataset(samples, pipeline.process)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=pipeline.collate, **workers), sampler
    from mmpost.data.sources import iter_shards

    dataset = ShardDataset(lambda: iter_shards(shards), pipeline.process)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=pipeline.collate, **workers), None


def leave_signals_to_the_main_process(_worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: the main process stops the run (``mmpost.training.interrupt``).
    A Ctrl-C reaches the whole process group and would otherwise kill the workers under the main process's feet."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class ListDataset(torch.utils.data.Dataset):
    """Map-style dataset over samples read from JSON / JSONL."""

    def __init__(self, samples: Sequence[Sample], process: Callable[[Sample], Any]) -> None:
        self.samples = list(samples)
        self.process = process

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.process(self.samples[index])


class ShardDataset(torch.utils.data.IterableDataset):
    """Iterable dataset over webdataset shards (split across processes and workers by webdataset)."""

    def __init__(self, make_iter: Callable[[], Iterator[Sample]], process: Callable[[Sample], Any]) -> None:
        self.make_iter = make_iter
        self.process = process

    def __iter__(self) -> Iterator[dict[str, Any] | Skipped]:
        for sample in self.make_iter():
            yield self.process(sample)


class StandIn:
    """A one-sample batch of the training data, for a process whose micro-batch lost every sample.

    Processes under DDP must run the same forwards and backwards; such a process runs this batch with its loss
    weighted by 0. It is the first usable sample of the loader's dataset, found on first use and kept.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.batch: Batch | None = None

    def __call__(self) -> Batch:
        if self.batch is None:
            dataset = self.loader.dataset
            items = (dataset[i] for i in range(len(dataset))) if isinstance(dataset, ListDataset) else iter(dataset)
            item = next((x for x in items if not isinstance(x, Skipped)), None)
            if item is None:
                raise DataError("no sample of data.train is usable: every one was skipped (see train.log)")
            self.batch = self.loader.collate_fn([item])
        return self.batch
