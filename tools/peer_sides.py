"""The two sides of the comparison with TRL (``peer_trl.py``): what TRL is given (its settings from the mmpost
config, the parts frozen like mmpost's, the grpo reward), how the two compute differently, and each side's timed
run, the mmpost child and the TRL child, with the clock and the figures both read."""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def length_reward(completion: str, **fields: Any) -> float:
    """The grpo runs' trivial reward: characters / 100, which varies within a group of a random model's samples."""
    return len(completion) / 100


def trl_length_reward(completions: list, **kwargs: Any) -> list[float]:
    """``length_reward`` as TRL calls a reward: on a batch of conversational completions."""
    return [length_reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]


# ----------------------------------------------------------------- what TRL is given


def trained_parts(cfg) -> list[str]:
    """The parts the mmpost run trains: ``train.trainable``, or its stage's default."""
    from mmpost.stages import build_stage

    return list(cfg.train.trainable or build_stage(cfg).trains)


def trl_settings(cfg, total_steps: int, top_k: int) -> dict[str, Any]:
    """TRL's config keys for the resolved mmpost config ``cfg``; ``top_k`` is what mmpost's sampling uses.

    Raises:
        SystemExit: naming the settings TRL cannot follow.
    """
    from mmpost.data.loader import worker_count

    t, stage = cfg.train, cfg.stage
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refused = []
    if cfg.model.lora.r > 0:
        refused.append("model.lora (not mapped onto a peft config)")
    if cfg.model.llm.path or cfg.model.encoders or cfg.model.connectors:
        refused.append("model parts (--size sets the model)")
    if t.part_lr:
        refused.append("train.part_lr")
    parts = set(trained_parts(cfg)) - {"connectors", "connectors.image", "encoders", "encoders.image", "llm"}
    if parts:
        refused.append(f"train.trainable {sorted(parts)}")
    settings: dict[str, Any] = dict(
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type={"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.schedule],
        warmup_steps=int(round(t.warmup_ratio * total_steps)),  # as mmpost rounds it
        bf16=t.precision == "bf16",  # TRL's default is bf16
        fp16=t.precision == "fp16",
        activation_checkpointing=t.gradient_checkpointing,  # transformers' name for it; TRL's default is on
        dataloader_num_workers=worker_count(cfg.data.num_workers, device),
        max_steps=total_steps,
        seed=cfg.seed,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    if stage.name == "sft":
        settings |= dict(max_length=cfg.data.max_length, train_sampling_strategy="sequential")
    elif stage.name == "dpo":
        if stage.loss_type == "simpo" or stage.label_smoothing > 0 or stage.precompute_reference is not False:
            refused.append("stage.loss_type simpo, stage.label_smoothing > 0 or stage.precompute_reference not false")
        settings |= dict(
            max_length=cfg.data.max_length,
            train_sampling_strategy="sequential",
            loss_type=[stage.loss_type],
            beta=stage.beta,
        )
    else:
        if stage.filter_zero_variance:
            refused.append("stage.filter_zero_variance")
        settings |= dict(
            per_device_train_batch_size=t.batch_size * stage.group_size,  # completions, where mmpost counts prompts
            num_generations=stage.group_size,
            max_completion_length=stage.max_completion_length,
            temperature=stage.temperature,
            top_p=stage.top_p,
            top_k=top_k,
            epsilon=stage.epsilon_low,
            epsilon_high=stage.epsilon_high,
            beta=stage.beta,
            num_iterations=stage.iterations,
            loss_type=stage.aggregation,
            scale_rewards="group" if stage.scale_rewards else "none",
            shuffle_dataset=False,
        )
    if refused:
        raise SystemExit("--peer trl: TRL cannot be given the same settings for " + "; ".join(refused))
    return settings


def differences(stage: str, options: dict[str, Any], packing: bool) -> list[str]:
    """How TRL and mmpost compute the stage differently, by design of each, for the report.

    Args:
        options: the mmpost stage's options (``mmpost.stages.stage_options``).
        packing: whether the mmpost side packs (``data.packing``).
    """
    head = (
        "TRL's fused LM head scores every position of the sequence off CUDA (in chunks of 32k rows) and the label "
        "positions only on CUDA; mmpost computes logits at the label positions only"
    )
    memory = (
        "on a CPU mmpost's process keeps the memory its tensors free for the next steps (train.keep_freed_memory); "
        "TRL's returns it to the system and faults it in again"
    )
    shared = bool(options.get("share_prompt"))  # an option of newer dpo / grpo stages
    if stage == "sft":
        return [
            "loss: both sum the label tokens' cross-entropy and divide by the label tokens of the whole optimizer "
            "step (TRL through num_items_in_batch); the labels are the reply and its end-of-turn tokens on both",
            head + ", and for sft its loss and gradient chunk by chunk of rows, the [N, V] logits never whole",
            "TRL also computes the entropy and top-1 accuracy at every label position in each step",
            "mmpost packs each micro-batch's conversations into rows (data.packing); TRL pads them"
            if packing
            else "both pad each micro-batch to its longest row (TRL has no packing or padding-free for vision data)",
            memory,
        ]
    if stage == "dpo":
        return [
            "reference: a frozen copy of the starting model on both sides, its log-probs computed in every step; "
            "loss: the mean over the step's pairs on both",
            "TRL's LLaVA runs each pair's prompt twice, image included (a chosen and a rejected row); mmpost "
            + (
                "computes the prompt (image and text) once for both answers (stage.share_prompt)"
                if shared
                else "encodes the image once for both rows and runs the prompt's text twice"
            ),
            head,
            memory,
        ]
    return [
        "sampling: TRL repeats each prompt G times and prefills every copy; mmpost "
        + ("prefills it once and gives its KV cache to the G samples" if options["share_prefill"] else "too"),
        "loss forward: TRL runs every completion with its whole prompt, image included; mmpost encodes the image "
        + ("once per prompt and computes the prompt once for its G completions" if shared else "once per prompt"),
        "both sample with top_k 50 (mmpost: transformers' default; TRL: given it), top_p and temperature as set",
        "the completions are sampled on each side, so the first losses need not agree and the lengths differ by "
        "chance (a random model seldom ends early)",
        head,
        memory,
    ]


# ----------------------------------------------------------------- one side's timed run (a process of its own)


def now() -> float:
    """The clock both sides read at the end of a step, after the accelerator's queued work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def figures(plan: dict[str, Any], stamps: list[float], counts: list[float]) -> dict[str, float]:
    """Units per second over the measured steps: ``stamps[k]`` is when step k + 1 ended, ``counts[k]`` what it
    trained on; with the process's peak memory."""
    warmup = plan["warmup"]
    seconds, units = stamps[-1] - stamps[warmup - 1], sum(counts[warmup:])
    if torch.cuda.is_available():
        memory = {"peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    else:
        memory = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    return {"per_s": units / seconds, "measured_s": round(seconds, 3), "measured_units": units} | memory


def run_mmpost(plan: dict[str, Any], out: Path) -> dict[str, Any]:
    """The mmpost side: the stage's run config through the training loop, with bench.py's overrides."""
    from mmpost.cli import quiet_libraries
    from mmpost.config import load_config
    from mmpost.stages import build_stage
    from mmpost.training import metrics

    quiet_libraries()
    total = plan["warmup"] + plan["steps"]
    fixed = [f"out={out}", f"train.max_steps={total}", "train.log_every=1", "train.save_every=0", "train.eval_every=0"]
    cfg = load_config(plan["config"], plan["overrides"] + fixed + ["data.eval=null"])
    stamps, lines = [], []
    write = metrics.MetricsLog.write

    def stamped(self, record):  # the loop writes a step's line as the step ends: the step's clock
        write(self, record)
        if "loss" in record:
            stamps.append(now())
            lines.append(record)

    metrics.MetricsLog.write = stamped
    build_stage(cfg).run(cfg)
    per_step = plan["samples_per_step"] * plan["units_per_sample"]
    if plan["stage"] == "sft":  # both rates share one interval: their ratio is the step's tokens per sample
        counts = [r["tokens_per_s"] / r["samples_per_s"] * per_step for r in lines]
    else:
        counts = [per_step] * len(lines)
    result = {"first": {"loss": lines[0]["loss"]}, "skipped": lines[-1]["data/skipped"]}
    if plan["stage"] == "dpo":
        result["first"]["logps_chosen"] = lines[0]["logps/chosen"]
    if plan["stage"] == "grpo":
        result["completion_length"] = statistics.fmean(r["completion_length"] for r in lines[plan["warmup"] :])
    return result | figures(plan, stamps, counts)


def run_trl(plan: dict[str, Any], out: Path) -> dict[str, Any]:
    """The TRL side: its trainer for the stage on the LLaVA export, the samples in mmpost's order."""
    import datasets
    import trl
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    stage = plan["stage"]
    model = LlavaForConditionalGeneration.from_pretrained(plan["hf"], dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(plan["hf"])
    freeze_like_mmpost(model, plan["parts"])
    records = json.loads(Path(plan["trl_data"]).read_text())
    dataset = datasets.Dataset.from_list([records[i] for i in plan["order"]])
    dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image()))
    config_cls, trainer_cls = {
        "sft": (trl.SFTConfig, trl.SFTTrainer),
        "dpo": (trl.DPOConfig, trl.DPOTrainer),
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
    }[stage]
    stamps, counts, logged, tokens = [], [], [], [0]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(now())
            counts.append(tokens[0] if stage == "sft" else plan["samples_per_step"] * plan["units_per_sample"])
            tokens[0] = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append(dict(logs))

    class Counted(trainer_cls):
        def training_step(self, model, inputs, *rest, **kwargs):  # each micro-batch, in the main process
            if stage == "sft":
                tokens[0] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *rest, **kwargs)

    trainer = Counted(
        model=model,
        args=config_cls(output_dir=str(out), **plan["trl"]),
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[Clock()],
        **({"reward_funcs": [trl_length_reward]} if stage == "grpo" else {}),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer.train()
    result = {
        "first": {"loss": logged[0]["loss"]},
        "trainable_parameters": trainable,
        "activation_checkpointing": bool(model.is_gradient_checkpointing),
    }
    if stage == "dpo":
        result["first"]["logps_chosen"] = logged[0]["logps/chosen"]
    if stage == "grpo":
        result["completion_length"] = statistics.fmean(r["completions/mean_length"] for r in logged[plan["warmup"] :])
    return result | figures(plan, stamps, counts)


def freeze_like_mmpost(model, parts: list[str]) -> None:
    """Leaves trainable in TRL's LLaVA model only the parts the mmpost run trains."""
    modules = {
        "connectors": [model.model.multi_modal_projector],
        "encoders": [model.model.vision_tower],
        "llm": [model.model.language_model, model.lm_head],
    }
    model.requires_grad_(False)
    for part in parts:
        for module in modules[part.split(".")[0]]:
            module.requires_grad_(True)
