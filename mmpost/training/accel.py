"""One ``accelerate.Accelerator`` per run, with the checks accelerate does not make itself."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType

from mmpost.config.schema import TrainConfig


class LaunchError(RuntimeError):
    """The processes were started in a way that would not train as the user expects."""


def make_accelerator(train: TrainConfig, sharding: str = "ddp") -> Accelerator:
    """Creates the run's accelerator and checks that every launched process takes part.

    On a machine without CUDA, processes started by ``torchrun`` are joined over gloo
    (``cpu=True``); without it accelerate treats each process as a separate single-process run,
    and every process would silently train alone on its own data.

    Args:
        sharding: the run's sharding (``mmpost.training.sharding.requested``): under ``fsdp2`` mmpost shards the
            model itself, so a launcher config's FSDP request must not also make accelerate wrap it; under
            ``deepspeed`` DeepSpeed accumulates ``train.grad_accum`` micro-batches per update.

    Raises:
        LaunchError: if ``WORLD_SIZE`` says several processes but accelerate sees one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = not torch.cuda.is_available()
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[train.precision]
    # Several runs may share a Python process (the demo, a notebook): each gets its own precision and
    # accumulation state instead of inheriting the previous run's, while the process group stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    if sharding == "fsdp2":
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    accumulation = {"gradient_accumulation_steps": train.grad_accum} if sharding == "deepspeed" else {}
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, **accumulation)
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO):
        raise LaunchError(
            f"WORLD_SIZE={world} but accelerate runs {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type}); every process would train alone. Launch with "
            "`accelerate launch --multi_gpu --num_processes N -m mmpost train ...` or torchrun, and on CPU set "
            "ACCELERATE_USE_CPU=1"
        )
    return accelerator
