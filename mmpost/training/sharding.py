"""How a run spreads the model over its processes, decided and carried out in this one module.

``train.sharding`` chooses (``auto`` by default):

- ``none``: one process;
- ``ddp``: a full copy on every process, gradients all-reduced (accelerate's DDP wrapper); ``auto`` with several
  processes;
- ``fsdp2``: parameters, gradients and optimizer state sharded across the processes with torch's FSDP2
  (``fully_shard``), applied here; ``auto`` when the launcher config asks for FSDP
  (``configs/accelerate/fsdp2.yaml``);
- ``deepspeed``: DeepSpeed ZeRO through accelerate, for users who run it already; ``auto`` when the launcher config
  asks for it (``configs/accelerate/deepspeed_zero*.yaml``).

Why mmpost applies FSDP2 itself, as torchtitan and torchtune do, instead of accelerate's FSDP plugin: accelerate
picks FSDP only for GPU-like devices, so the plugin's path cannot run on a CPU machine, while ``fully_shard`` on a
CPU device mesh over gloo is the same code that runs on GPUs over NCCL. accelerate still launches the processes,
holds the precision settings and shards the data.

FSDP2 units: every decoder layer of the LLM is one; encoders and connectors stay in the root unit with the
embeddings and the head. Encoders and connectors run only when their medium is in the batch, so as units of their
own their all-gathers would not match across processes whose batches differ; gradients a process did not compute
are reduced as zeros (``set_reduce_scatter_unused_params``). Frozen copies (the reference of dpo / grpo, the
teacher of distill) are sharded the same way. Generation and evaluation run with every unit unsharded
(``gathered``): each process then works alone on its own prompts, as under DDP.

Checkpoints under FSDP2 hold the whole model (gathered to the main process, the same ``model/`` as ever) and the
sharded model and optimizer state (``sharded/``, torch.distributed.checkpoint), from which ``--resume`` restores
exactly; ``final/`` is written from the whole model, so a run trained sharded saves and exports like any other.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpost.model.lmm import LMM

log = logging.getLogger("mmpost")

SHARDED_DIR = "sharded"


class ShardingError(ValueError):
    """A sharding choice that this launch or this model cannot run."""


def requested(kind: str) -> str:
    """``train.sharding`` with ``auto`` resolved by the launcher's settings (``none`` / ``ddp`` follow from the
    number of processes later)."""
    if kind != "auto":
        return kind
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2"
    return "ddp"


class Sharding:
    """The run's choice and everything that depends on it.

    Args:
        kind: ``none``, ``ddp``, ``fsdp2`` or ``deepspeed`` (``requested`` resolved ``auto``).
        accelerator: the run's accelerator.
        precision: ``train.precision``.
    """

    def __init__(self, kind: str, accelerator, precision: str = "fp32") -> None:
        if kind == "ddp" and accelerator.num_processes == 1:
            kind = "none"
        if kind == "fsdp2" and precision == "fp16":
            raise ShardingError("train.sharding=fsdp2 trains in fp32 or bf16; set train.precision=bf16")
        if kind == "deepspeed":
            from accelerate.utils import DistributedType

            if accelerator.distributed_type != DistributedType.DEEPSPEED:
                raise ShardingError(
                    "train.sharding=deepspeed needs the DeepSpeed launcher config: accelerate launch --config_file "
                    "configs/accelerate/deepspeed_zero3.yaml -m mmpost train ... (and pip install deepspeed)"
                )
        self.kind, self.accelerator, self.precision = kind, accelerator, precision
        self.skeletons: dict[int, LMM] = {}  # the main process's weightless copy of each sharded model, for saving

    @property
    def shards_state(self) -> bool:
        """True when each process holds only a part of the model and optimizer state."""
        return self.kind in ("fsdp2", "deepspeed")

    # ----------------------------------------------------------------- wrapping

    def shard(self, model: LMM) -> LMM:
        """FSDP2: shards ``model`` in place (every decoder layer a unit, the rest the root unit); else nothing."""
        if self.kind != "fsdp2":
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        acc = self.accelerator
        if acc.is_main_process:
            self.skeletons[id(model)] = weightless_copy(model)
        mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        options: dict[str, Any] = {"mesh": mesh}
        if self.precision == "bf16" and acc.device.type == "cuda":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model.to(acc.device)
        for layer in model.base_llm.get_decoder().layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)
        if hasattr(model, "set_reduce_scatter_unused_params"):
            model.set_reduce_scatter_unused_params(True, recurse=True)
        # FSDP2 takes the first module whose forward runs for its root; generation calls the decoder layers
        # directly, so the root is fixed here, before any forward (torch has no public call for it)
        model._get_fsdp_state()._lazy_init()
        return model

    def frozen(self, model: LMM) -> LMM:
        """A frozen copy (reference, teacher), sharded like the policy under FSDP2."""
        self.shard(model)
        if self.kind == "fsdp2":
            # FSDP2 forgets the order its units ran forward at the end of a backward; a model that never runs
            # backward forgets it after each forward instead
            model.register_forward_hook(lambda module, args, output: module.reset_iter_state())
        return model

    def prepare(self, model: LMM, optimizer, unused_parameters: bool) -> tuple[nn.Module, Any]:
        """The module every loss calls and the optimizer, as the accelerator runs them.

        Args:
            unused_parameters: some trained weights may get no gradient in a step (DDP must be told).
        """
        acc = self.accelerator
        if self.kind == "fsdp2":  # the model is sharded already; accelerate keeps the optimizer only
            return model, acc.prepare(optimizer)
        if self.kind == "ddp" and unused_parameters:
            from accelerate.utils import DistributedDataParallelKwargs

            acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        wrapped, optimizer = acc.prepare(model, optimizer)
        if self.kind == "deepspeed" and acc.is_main_process:
            self.skeletons[id(wrapped)] = weightless_copy(model)
        return wrapped, optimizer

    # ----------------------------------------------------------------- steps

    def accumulating(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward: gradients are synchronised on the last only."""
        if self.kind == "fsdp2":
            return _gradient_sync(model, last)
        if last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        """The accelerator's backward. The loss is already normalised over the whole step; DeepSpeed divides by
        its accumulation steps again, which this undoes."""
        if self.kind == "deepspeed":
            loss = loss * self.accelerator.gradient_accumulation_steps
        self.accelerator.backward(loss)

    def clip(self, parameters: list[nn.Parameter], max_norm: float) -> float | None:
        """Clips the gradients' global norm and returns it (None under DeepSpeed, which clips itself)."""
        if self.kind == "deepspeed":
            return None
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm over every shard
            norm = norm.full_tensor()
        return float(norm)

    @contextlib.contextmanager
    def gathered(self, *models: nn.Module) -> Iterator[None]:
        """Every FSDP2 unit of ``models`` unsharded for the duration (generation, evaluation): forwards then need no
        communication, so each process may run its own number of them. Every process must enter it together."""
        if self.kind != "fsdp2":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        roots = [model for model in models if isinstance(model, FSDPModule)]
        units = [m for root in roots for m in root.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)
            for root in roots:
                # FSDP2 prefetches in backward by the order its units ran forward; forget the order of these
                # forwards, which differ from process to process, so that the next backward's prefetches match
                root.reset_iter_state()

    # ----------------------------------------------------------------- saving

    def save_whole(self, model: LMM, path: Path) -> None:
        """Writes ``model`` as one mmpost model directory from the main process (under FSDP2 its shards are gathered
        there, on the CPU, and nowhere else). Every process must call it."""
        acc = self.accelerator
        if self.kind == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if acc.is_main_process:
                self._save_into_skeleton(model, full, path)
            return
        if self.kind == "deepspeed":
            state = acc.get_state_dict(model)  # ZeRO-3 gathers the 16-bit weights on the main process
            if acc.is_main_process:
                self._save_into_skeleton(model, state, path)
            return
        if acc.is_main_process:
            acc.unwrap_model(model).save(path)

    def _save_into_skeleton(self, model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
        skeleton = self.skeletons[id(model)]
        skeleton.load_state_dict(state, assign=True)
        skeleton.base_llm.tie_weights()
        skeleton.save(path)
        self.skeletons[id(model)] = weightless_copy(skeleton)  # frees the gathered tensors

    def save_state(self, folder: Path, model: nn.Module, optimizer) -> dict[str, Any]:
        """Writes what a resume needs of the model and optimizer beyond the whole model: every process its shard
        (FSDP2: ``folder/sharded``; DeepSpeed: the engine's checkpoint there). Every process must call it.

        Returns:
            what goes into ``trainer.pt`` instead (the whole optimizer state when it is not sharded).
        """
        if self.kind == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optimizer_state = get_state_dict(model, optimizer.optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / SHARDED_DIR))
            return {}
        if self.kind == "deepspeed":
            model.save_checkpoint(str(folder / SHARDED_DIR))
            return {}
        return {"optimizer": optimizer.state_dict()}

    def load_state(self, folder: Path, model: nn.Module, optimizer, trainer: dict[str, Any]) -> None:
        """Restores the model and optimizer state ``save_state`` wrote."""
        if self.kind == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optimizer_state = get_state_dict(model, optimizer.optimizer)
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))
            set_state_dict(model, optimizer.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])  # fmt: skip
            return
        if self.kind == "deepspeed":
            model.load_checkpoint(str(folder / SHARDED_DIR))
            return
        if "optimizer" not in trainer:
            raise ShardingError(f"{folder} was written by a sharded run: resume it with the same train.sharding")
        optimizer.load_state_dict(trainer["optimizer"])

    def local_bytes(self, model: nn.Module, optimizer) -> dict[str, int]:
        """Bytes of parameters and of optimizer state this process holds (its shards under FSDP2)."""

        def size(t: torch.Tensor) -> int:
            local = t.to_local() if hasattr(t, "to_local") else t
            return local.numel() * local.element_size()

        params = sum(size(p) for p in model.parameters())
        states = sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        return {"parameters": params, "optimizer_state": states}


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(sync, recurse=True)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True, recurse=True)


def weightless_copy(model: LMM) -> LMM:
    """A copy of ``model``'s structure (modules, names, configs, tokenizer) whose tensors are on the meta device:
    the main process loads gathered weights into it to write a whole model, without a second copy in memory."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)
