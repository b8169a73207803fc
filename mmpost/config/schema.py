"""The run config: one dataclass per component. Every key is documented in its class's Attributes.

``mmpost config keys`` prints this documentation, with each numeric key's allowed range beside its
type; ``mmpost config show CFG --set ...`` prints a resolved config.

Relative paths (``out``, ``from``, data files, and local model folders and files) are resolved against
the folder the command runs in when the config is loaded, so the resolved config a run writes names
the same files from anywhere. Hub ids, ``pkg:`` paths and template text stay as written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmpost.config.fields import path_field, ranged
from mmpost.config.loader import registry_field


@dataclass
class LLMConfig:
    """The language model.

    Attributes:
        path: a transformers causal-LM directory or hub id (``pkg:<package>/<dir>`` for a model shipped
            in a Python package). Not needed when the run starts ``from:`` an earlier run.
        gguf_file: file name of a GGUF checkpoint inside ``path``; transformers dequantizes it on load.
        dtype: dtype of the LLM weights in memory. Keep float32 for training on CPU or with mixed
            precision (``train.precision``); bfloat16 halves memory for frozen LLMs.
        attn_implementation: transformers attention backend: sdpa, eager or flash_attention_2.
        chat_template: a Jinja chat template (the text, or the path of a .jinja file) for tokenizers
            that have none; null uses the tokenizer's own.
        trust_remote_code: allow code from the model directory to run. Off unless you trust it.
    """

    path: str | None = path_field(None, if_exists=True)
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = "sdpa"
    chat_template: str | None = path_field(None, if_exists=True)
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM (peft). Train them with ``train.trainable: [..., llm.lora]``.

    Attributes:
        r: adapter rank; 0 means no LoRA.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: names of the LLM's linear layers to adapt, or ["all-linear"].
    """

    r: int = ranged(0, ge=0)
    alpha: int = ranged(16, gt=0)
    dropout: float = ranged(0.05, ge=0, lt=1)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    """The LMM: an LLM plus, per modality, an encoder and a connector.

    Attributes:
        llm: the language model. With ``from:``, a path here puts this LLM under the earlier model's encoders
            and connectors (a connector that does not give its width is rebuilt fresh).
        encoders: per modality (``image``), a registered encoder: ``{name: hf_vision, path: ...}``.
            Keys of each encoder are listed under "encoder" below.
        connectors: per modality, a registered connector: ``{name: mlp, depth: 2}``.
        lora: LoRA adapters on the LLM.
    """

    llm: LLMConfig = field(default_factory=LLMConfig)
    encoders: dict[str, dict[str, Any]] = registry_field("encoders", many=True, default_factory=dict)
    connectors: dict[str, dict[str, Any]] = registry_field("connectors", many=True, default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataSourceConfig:
    """One dataset.

    Attributes:
        path: a .json / .jsonl file (LLaVA ``conversations`` or ``messages`` records), or webdataset
            shards: a .tar file, a brace pattern (``shards/sft-{000000..000009}.tar``) or a folder of .tar.
        image_root: folder that relative media paths (images and audio) in a JSON file are read from
            (LLaVA's ``--image_folder``); null means the JSON file's own folder.
        max_samples: use at most this many samples (the first ones); 0 means all.
    """

    path: str = path_field("")
    image_root: str | None = path_field(None)
    max_samples: int = ranged(0, ge=0)


@dataclass
class DataConfig:
    """Training and evaluation data.

    Attributes:
        train: the training set.
        eval: the held-out set for evaluation loss and generation accuracy; null skips evaluation.
        max_length: longest token sequence, media tokens included. Longer samples lose text from the
            end, never media tokens; a sample whose media alone do not fit is dropped and counted.
        num_workers: DataLoader worker processes that decode media and tokenize. null (the default) chooses from
            the host: none when training on the CPU (workers compete with the model for its cores; measured: no
            gain, 0.4-0.55 GiB more memory), else up to 4 per process from half the CPU cores.
        max_bad_fraction: stop the run when more than this fraction of samples so far was skipped
            (corrupt media, too long, no answer tokens); judged once 50 samples have been seen.
        packing: align, sft and distill pack each micro-batch's conversations into rows of up to ``max_length``
            tokens (first-fit decreasing), each conversation attending only to itself and its own media, its
            positions starting at 0: the same losses with no padding (the rows run as one row of their real
            tokens, attention sample by sample). Needs the LLM's ``sdpa``, ``eager`` or flash attention and 1-D
            positions (not Qwen2-VL's M-RoPE); not with on-policy distillation or a teacher that reads its own
            batches. The loss is still normalised by the label tokens of the whole step.
        cache_features: a folder where align and sft keep the features of frozen encoders: every training medium
            the folder lacks is encoded once before the first step (each process its share), and every epoch,
            and later runs with the same encoder, weights and preprocessing, read the features memory-mapped
            instead of decoding and encoding the medium; another encoder or preprocessing gets another subfolder.
            Refused when an encoder trains or reads text (InstructBLIP's). null: encode every step.
    """

    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    eval: DataSourceConfig | None = None
    max_length: int = ranged(2048, ge=2)
    num_workers: int | None = ranged(None, ge=0)
    max_bad_fraction: float = ranged(0.01, ge=0, le=1)
    packing: bool = False
    cache_features: str | None = None


@dataclass
class TrainConfig:
    """The optimisation loop shared by all stages.

    Attributes:
        trainable: parts that train: ``connectors``, ``encoders``, ``llm`` (all LLM weights),
            ``llm.lora`` (adapters only), or one modality (``connectors.image``, ``encoders.image``).
            Null takes the stage's default (align: connectors; sft: connectors and llm, or llm.lora
            when ``model.lora.r`` > 0; dpo and grpo: llm, or llm.lora with LoRA).
        lr: peak learning rate.
        part_lr: per-part learning rates overriding ``lr``, by the names of ``trainable``
            (``{connectors: 1e-3, llm: 2e-5}``; LLaVA's ``mm_projector_lr``).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        batch_size: samples per device per micro-batch (dpo: pairs; grpo: prompts, each sampled G times).
        grad_accum: micro-batches per optimizer step.
        max_steps: optimizer steps; 0 means ``epochs`` passes over the data.
        epochs: passes over the training data when ``max_steps`` is 0.
        warmup_ratio: fraction of the steps with linear warmup.
        schedule: learning-rate schedule after warmup.
        max_grad_norm: gradient clipping norm; 0 disables clipping.
        precision: fp32, or bf16 / fp16 mixed precision (autocast with fp32 master weights).
        gradient_checkpointing: recompute LLM activations in the backward pass to save memory.
        compile: compile each LLM decoder layer and encoder block with ``torch.compile`` (regional: one graph per
            kind of layer; the first steps take the compile time). Same losses; whether it is faster depends on
            the device and sizes (``tools/bench.py --ab train.compile=true CONFIG``; on 2 CPU cores, fp32, a
            LLaVA-shaped sft step ran at 0.98x, with 5 % less peak memory).
        keep_freed_memory: on a CPU (Linux, glibc), let ``malloc`` keep the memory that tensors free for the next
            steps' tensors instead of unmapping it and faulting it in again page by page every step
            (``mmpost.training.host_memory``). The process's memory then stays at its peak. On 2 CPU cores a
            LLaVA-shaped sft step ran 1.25x faster with the same peak memory. No effect on a GPU run.
        log_every: steps between metric lines in ``metrics.jsonl``.
        save_every: steps between checkpoints under ``checkpoints/step-N``; 0 saves only ``final/``.
        keep_checkpoints: newest step checkpoints kept; older ones are deleted. 0 keeps all.
        eval_every: steps between evaluations; 0 evaluates only at the end.
        sharding: how the model is spread over several processes: ``ddp`` (a full copy on each), ``fsdp2``
            (parameters, gradients and optimizer state sharded; torch FSDP2, each decoder layer a unit),
            ``deepspeed`` (ZeRO, through the accelerate launcher config), or ``auto``: what the launcher config
            asks for (``configs/accelerate/fsdp2.yaml`` -> fsdp2, ``deepspeed_zero*.yaml`` -> deepspeed), else ddp.
    """

    trainable: list[str] | None = None
    lr: float = ranged(1e-4, gt=0)
    part_lr: dict[str, float] = ranged(default_factory=dict, gt=0)
    weight_decay: float = ranged(0.0, ge=0)
    batch_size: int = ranged(8, ge=1)
    grad_accum: int = ranged(1, ge=1)
    max_steps: int = ranged(0, ge=0)
    epochs: float = ranged(1.0, gt=0)
    warmup_ratio: float = ranged(0.03, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = ranged(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False
    keep_freed_memory: bool = True
    log_every: int = ranged(10, ge=1)
    save_every: int = ranged(0, ge=0)
    keep_checkpoints: int = ranged(2, ge=0)
    eval_every: int = ranged(0, ge=0)
    sharding: Literal["auto", "ddp", "fsdp2", "deepspeed"] = "auto"


@dataclass
class EvalConfig:
    """Evaluation on ``data.eval``.

    Attributes:
        max_samples: evaluate on at most this many held-out samples.
        batch_size: samples per evaluation batch.
        max_new_tokens: generation budget per answer.
        accuracy: also generate answers and report exact-match accuracy against the last assistant
            turn (lower-cased, trailing punctuation ignored), per ``task`` when samples carry one.
    """

    max_samples: int = ranged(300, ge=1)
    batch_size: int = ranged(32, ge=1)
    max_new_tokens: int = ranged(8, ge=1)
    accuracy: bool = True


@dataclass
class RunConfig:
    """A training run: one stage on one model and dataset.

    Attributes:
        stage: the registered stage to run (``align``, ``sft``, ``dpo``, ``grpo`` or ``distill``), with its
            options: ``stage: sft`` or ``stage: {name: dpo, beta: 0.1, ...}`` (each stage's options are listed
            below); loaded as that stage's options dataclass.
        out: the run directory (config.yaml, metrics.jsonl, checkpoints/, final/).
        from_: start from an earlier run directory (its ``final/``), a saved model directory, or ``hf:PATH``, a
            released transformers checkpoint (a folder or hub id of LLaVA-1.5-hf, Qwen2-VL, Qwen2.5-VL, BLIP-2,
            InstructBLIP, Qwen2-Audio; ``mmpost.families``) taken apart into mmpost parts; the ``model`` section
            then only changes it: ``model.llm.path`` swaps the LLM, ``model.encoders`` / ``model.connectors``
            entries replace those parts, ``model.lora`` adds adapters. Written ``from:`` in YAML.
        seed: seed for weights, data order and dropout (numpy takes seeds below 2**32).
        model: the LMM to build when not starting ``from:`` a run.
        data: the datasets.
        train: the optimisation loop.
        eval: evaluation.
    """

    stage: Any = registry_field("stages")
    out: str = path_field("")
    from_: str | None = path_field(None, if_exists=True)
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
