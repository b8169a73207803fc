"""``mmpost plan``: the memory one GPU needs for a run, computed from the model configs without loading weights.

Every part is built on PyTorch's meta device (shapes, no data): the LLM from its ``config.json``, the encoders and
connectors from their specs (a saved model's ``mmpost.json``, or the run config's ``model`` section). Per GPU:

- parameters, in the LLM's dtype (``model.llm.dtype``; float32 master weights under mixed precision), whole under
  ``ddp`` and DeepSpeed ZeRO-2, divided by the processes under ``fsdp2`` and ZeRO-3;
- gradients of what trains, float32; divided under ``fsdp2`` and ZeRO-2/3;
- optimizer state: AdamW's two float32 moments (and one step count per tensor); divided under sharding;
- a frozen reference (dpo, grpo and rloo with ``beta`` > 0, unless it is the policy with fresh LoRA adapters off) or a
  teacher (distill), sharded like the policy;
- under ``fsdp2`` the root unit (embeddings, head, encoders, connectors) and two decoder layers gathered at once;
- activations of one micro-batch of ``train.batch_size`` sequences of ``data.max_length`` tokens (two rows per
  pair in dpo, ``group_size`` per prompt in grpo and rloo): 34 · tokens · hidden bytes per decoder layer in 16 bits
  (Korthikanti et al. 2022, attention scores not stored: SDPA / flash attention), twice that in float32; with
  gradient checkpointing the layer inputs (2 · tokens · hidden bytes each) plus one layer's; plus the float32
  logits at the label positions (all tokens, an upper bound) and their gradient.

Activations are an estimate; parameters, gradients and optimizer state are exact counts (``tests/test_sharding.py``
checks them against what a two-process run holds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmpost.config import RunConfig
from mmpost.families import HF_PREFIX
from mmpost.model.build import connector, encoder
from mmpost.model.format import CONFIG_NAME, resolve_model_dir

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30
SHARDINGS = ("ddp", "fsdp2", "zero2", "zero3")


@dataclass
class Shapes:
    """Parameter counts of one model's parts, and the LLM's shape."""

    llm: int
    embeddings: int  # input embeddings plus an untied head
    layer: int  # one decoder layer
    layers: int
    hidden: int
    vocab: int
    encoders: int
    connectors: int
    lora: int
    tensors: dict[str, int]  # parameter tensors per part (optimizer step counts)


def meta_llm(config: dict[str, Any]):
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = config.pop("model_type")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config))


def llm_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of an LLM directory (weights are not needed)."""
    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"plan: {file} is missing; point model.llm.path at a folder with the LLM's config.json "
            "(configs/llava/shapes/ has the shapes of the LLaVA recipes)"
        )
    return json.loads(file.read_text())


def part_specs(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, dict], dict[str, dict], int]:
    """(LLM config, encoder specs, connector specs, LoRA rank) of the run's model, from ``from:`` or ``model``."""
    encoders, connectors, lora = dict(cfg.model.encoders), dict(cfg.model.connectors), cfg.model.lora.r
    if cfg.from_ is not None and cfg.from_.startswith(HF_PREFIX):
        raise ValueError(
            f"plan: from: {cfg.from_} is a released checkpoint; plan sizes mmpost models: save it once with "
            f"mmpost.from_pretrained('{cfg.from_[len(HF_PREFIX) :]}').save(DIR) and plan with from: DIR"
        )
    if cfg.from_ is not None:
        saved = resolve_model_dir(cfg.from_, what="from")
        spec = json.loads((saved / CONFIG_NAME).read_text())
        encoders, connectors = spec["encoders"] | encoders, spec["connectors"] | connectors
        lora = lora or (spec["lora"] or {}).get("r", 0)
        return llm_config(str(saved / "llm")), encoders, connectors, lora
    config = llm_config(cfg.model.llm.path or "")
    config["vocab_size"] = vocab_with_placeholders(cfg.model.llm.path, config["vocab_size"])
    return config, encoders, connectors, lora


def vocab_with_placeholders(path: str, vocab: int) -> int:
    """The LLM's vocabulary once the LMM has added its media placeholders (``mmpost.model.llm.prepare_tokenizer``),
    when the tokenizer is there to tell; a saved mmpost model has them already."""
    from transformers import AutoTokenizer

    from mmpost.interfaces import PLACEHOLDERS

    folder = Path(path).expanduser()
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return vocab
    tokenizer = AutoTokenizer.from_pretrained(folder)
    missing = [p for p in PLACEHOLDERS.values() if p not in tokenizer.get_vocab()]
    return max(vocab, len(tokenizer) + len(missing))


def meta_encoder(spec: dict[str, Any]):
    """An encoder built on the meta device; an ``hf_vision`` tower named by ``path`` is built from its config."""
    spec = dict(spec)
    if spec.get("name") == "hf_vision" and spec.get("path"):
        spec["config"] = json.loads((Path(spec.pop("path")).expanduser() / "config.json").read_text())
        spec["config"] = spec["config"].get("vision_config", spec["config"])
    with torch.device("meta"):
        return encoder(**spec)


def shapes(cfg: RunConfig, lora_targets: list[str] | None = None) -> Shapes:
    llm_cfg, encoder_specs, connector_specs, rank = part_specs(cfg)
    llm = meta_llm(dict(llm_cfg))
    decoder_layers = llm.get_decoder().layers
    hidden = llm.get_input_embeddings().embedding_dim
    embeddings = llm.get_input_embeddings().weight.numel()
    head = llm.get_output_embeddings()
    if head is not None and head.weight is not llm.get_input_embeddings().weight:
        embeddings += head.weight.numel()
    encoders = connectors = 0
    tensors = {"llm": sum(1 for _ in llm.parameters()), "encoders": 0, "connectors": 0}
    for modality, spec in encoder_specs.items():
        part = meta_encoder(spec)
        encoders += sum(p.numel() for p in part.parameters())
        tensors["encoders"] += sum(1 for _ in part.parameters())
        with torch.device("meta"):
            con = connector(**connector_specs[modality])
            kwargs = {"num_layers": len(decoder_layers)} if "num_layers" in con.build.__code__.co_varnames else {}
            con.build(part.output_dim, hidden, **kwargs)
        connectors += sum(p.numel() for p in con.parameters())
        tensors["connectors"] += sum(1 for _ in con.parameters())
    lora = adapted = 0
    if rank:
        targets = set(lora_targets or cfg.model.lora.target_modules)
        for name, module in llm.named_modules():
            short = name.rsplit(".", 1)[-1]
            if (
                isinstance(module, torch.nn.Linear)
                and short != "lm_head"
                and ("all-linear" in targets or short in targets)
            ):
                lora += rank * (module.in_features + module.out_features)
                adapted += 1
    tensors["lora"] = 2 * adapted  # lora_A and lora_B of each adapted layer
    return Shapes(
        llm=sum(p.numel() for p in llm.parameters()),
        embeddings=embeddings,
        layer=sum(p.numel() for p in decoder_layers[0].parameters()),
        layers=len(decoder_layers),
        hidden=hidden,
        vocab=llm.get_input_embeddings().num_embeddings,
        encoders=encoders,
        connectors=connectors,
        lora=lora,
        tensors=tensors,
    )


def trained_parameters(cfg: RunConfig, s: Shapes) -> tuple[int, int]:
    """(parameters, parameter tensors) that train, as ``mmpost.training.trainable.resolve_parts`` picks them."""
    from mmpost.registry import STAGES

    parts = cfg.train.trainable or [
        "llm.lora" if p == "llm" and s.lora else p for p in STAGES.get(cfg.stage.name).trains
    ]
    count = tensors = 0
    for part in parts:
        head = part.split(".")[0]
        if part == "llm.lora":
            count, tensors = count + s.lora, tensors + s.tensors.get("lora", 0)
        elif head in ("llm", "encoders", "connectors"):
            count += {"llm": s.llm, "encoders": s.encoders, "connectors": s.connectors}[head]
            tensors += s.tensors[head]
    return count, tensors


def frozen_copy(cfg: RunConfig, s: Shapes, trained: int) -> int:
    """Parameters of the reference or teacher the stage holds besides the policy."""
    stage = cfg.stage
    if stage.name == "distill":
        teacher = type(cfg)(stage=stage, from_=stage.teacher)
        t = shapes(teacher)
        return t.llm + t.encoders + t.connectors
    needs_reference = (stage.name == "dpo" and stage.needs_reference) or (
        stage.name in ("grpo", "rloo") and stage.beta > 0
    )
    fresh_adapters = cfg.model.lora.r > 0 and trained == s.lora  # added in this stage: the policy, adapters off
    if not needs_reference or fresh_adapters:
        return 0
    return s.llm + s.encoders + s.connectors


def plan(cfg: RunConfig, gpus: int, sharding: str) -> dict[str, float]:
    """Bytes per GPU by what they hold, and in all (the report ``mmpost plan`` prints)."""
    s = shapes(cfg)
    param_bytes = BYTES[cfg.model.llm.dtype]
    total = s.llm + s.encoders + s.connectors + s.lora
    trained, trained_tensors = trained_parameters(cfg, s)
    if sharding not in SHARDINGS:
        raise ValueError(f"plan: --sharding must be one of {', '.join(SHARDINGS)}; got {sharding!r}")
    shards_params = sharding in ("fsdp2", "zero3")
    shards_grads = sharding in ("fsdp2", "zero2", "zero3")
    n_params, n_state = (gpus if shards_params else 1), (gpus if shards_grads else 1)
    rows = 2 if cfg.stage.name == "dpo" else getattr(cfg.stage, "group_size", 1)
    tokens = cfg.train.batch_size * rows * cfg.data.max_length
    act_bytes = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    per_layer = 34 * tokens * s.hidden * act_bytes // 2
    logits = 2 * tokens * s.vocab * 4
    report = {
        "parameters": total * param_bytes / n_params,
        "gradients": trained * 4 / n_state,
        # two float32 moments, sharded, and a float32 step count per tensor, on every process
        "optimizer_state": 2 * trained * 4 / n_state + trained_tensors * 4,
        "reference_or_teacher": frozen_copy(cfg, s, trained) * param_bytes / n_params,
        "gathered_units": 0.0,
        "activations": s.layers * per_layer + logits,
        "activations_checkpointed": s.layers * 2 * tokens * s.hidden * act_bytes + per_layer + logits,
    }
    if sharding == "fsdp2":
        root = s.embeddings + s.encoders + s.connectors
        report["gathered_units"] = (root + 2 * s.layer) * param_bytes * (gpus - 1) / gpus
    checkpointed = cfg.train.gradient_checkpointing
    keys = [k for k in report if k != ("activations" if checkpointed else "activations_checkpointed")]
    report["total"] = sum(report[k] for k in keys)
    return report


def print_plan(cfg: RunConfig, gpus: int, sharding: str) -> dict[str, float]:
    report = plan(cfg, gpus, sharding)
    checkpointed = cfg.train.gradient_checkpointing
    print(f"{cfg.stage.name} on {gpus} GPU(s), sharding {sharding}, micro-batch {cfg.train.batch_size} x "
          f"{cfg.data.max_length} tokens, precision {cfg.train.precision}, per GPU:")  # fmt: skip
    for key, value in report.items():
        mark = ""
        if key == ("activations_checkpointed" if checkpointed else "activations"):
            mark = "   (counted)"
        elif key.startswith("activations"):
            mark = "   (with train.gradient_checkpointing " + ("off)" if checkpointed else "on)")
        print(f"  {key:<26}{readable(value):>12}{mark}")
    return report


def readable(size: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"
