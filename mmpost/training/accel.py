"""One ``accelerate.Accelerator`` per run, with the checks accelerate does not make itself."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from mmpost.config.schema import TrainConfig


class LaunchError(RuntimeError):
    """The processes were started in a way that would not train as the user expects."""


def make_accelerator(train: TrainConfig) -> Accelerator:
    """Creates the run's accelerator and checks that every launched process takes part.

    On a machine without CUDA, processes started by ``torchrun`` are joined over gloo
    (``cpu=True``); without it accelerate treats each process as a separate single-process run,
    and every process would silently train alone on its own data.

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
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed)
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO):
        raise LaunchError(
            f"WORLD_SIZE={world} but accelerate runs {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type}); every process would train alone. Launch with "
            "`accelerate launch --multi_gpu --num_processes N -m mmpost train ...` or torchrun, and on CPU set "
            "ACCELERATE_USE_CPU=1"
        )
    return accelerator


def allow_unused_parameters(accelerator: Accelerator, trains_encoders: bool, modalities: int) -> None:
    """Tells DDP, before it wraps the model, when some trained weights may get no gradient in a step;
    otherwise it waits for those gradients forever.

    That happens when encoders train (layers past the feature layer, post-norms) and when a model has
    several modalities (a batch without one modality's media leaves its connector without gradient).
    """
    if trains_encoders or modalities > 1:
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
