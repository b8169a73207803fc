"""Assembling an LMM, in one place: from a run config (parts named by registry, or ``from:`` an earlier model
with parts swapped and adapters added), from a saved directory, and the part factories of the Python API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mmpost.checksums import verify_manifest
from mmpost.config.schema import LoraConfig, ModelConfig
from mmpost.interfaces import MediaText
from mmpost.model.format import CONFIG_NAME, FORMAT_VERSION, PARTS_NAME, is_model_dir, names_damage, read_json
from mmpost.model.heads import add_head
from mmpost.model.lmm import LMM
from mmpost.model.lora import add_lora, load_adapter


class ModelConfigError(ValueError):
    """A ``model`` section (with or without ``from:``) that does not describe a model."""


def encoder(name: str, **kwargs: Any):
    """Builds the encoder registered as ``name`` (``open_clip``, ``timm``, ``hf_vision``, ``whisper``...)."""
    from mmpost.encoders import ENCODERS

    return ENCODERS.build(name, **kwargs)


def connector(name: str, **kwargs: Any):
    """Builds the connector registered as ``name`` (``linear``, ``mlp``, ``qformer``, ``resampler``, ``xattn``)."""
    from mmpost.connectors import CONNECTORS

    return CONNECTORS.build(name, **kwargs)


def build_lmm(cfg: ModelConfig, start: str | Path | LMM | None = None) -> LMM:
    """The model a run config describes.

    Args:
        cfg: the ``model`` section. Without ``start`` it names the LLM and every part. With ``start``, its
            ``encoders`` / ``connectors`` entries replace those parts of the loaded model (swap a tower or a
            projector between stages; a new modality needs both), and ``lora`` adds adapters.
        start: a saved model directory to start from (a run's ``final/``: ``from:``), or a model already loaded
            (a released checkpoint taken apart by ``mmpost.families``). ``cfg.llm.path`` then puts another LLM
            under its parts.

    Raises:
        ModelConfigError: naming the key that does not fit.
    """
    encoders = {m: encoder(**spec) for m, spec in cfg.encoders.items()}
    connectors = {m: connector(**spec) for m, spec in cfg.connectors.items()}
    if start is None:
        if not encoders:
            raise ModelConfigError("model.encoders is empty: name at least one encoder, or start from: an earlier run")
        return LMM(cfg.llm.path or "", encoders, connectors, lora=cfg.lora, llm_config=cfg.llm)
    model = start if isinstance(start, LMM) else load_lmm(start)
    if cfg.llm.path:
        from mmpost.model.llm import load_llm

        model.set_llm(*load_llm(cfg.llm))
    for modality, part in encoders.items():
        if modality in model.encoders:
            model.set_encoder(modality, part)
        elif modality in connectors:
            model.add_modality(modality, part, connectors.pop(modality))
        else:
            raise ModelConfigError(f"model.encoders.{modality} is new: give model.connectors.{modality} too")
    for modality, part in connectors.items():
        model.set_connector(modality, part)
    if cfg.lora.r > 0 and not model.has_lora:
        model.llm = add_lora(model.llm, cfg.lora)
        model.lora_config = cfg.lora
    return model


def load_lmm(path: str | Path, dtype: torch.dtype | None = None, verify: bool = True) -> LMM:
    """Loads a directory written by ``save_lmm`` (LoRA adapters, if any, stay separate and trainable).

    Args:
        verify: check every file against the directory's ``checksums.json`` first.

    Raises:
        FileNotFoundError: if ``path`` is not an mmpost model directory.
        DamagedFileError: naming a file that differs from what was saved or cannot be read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpost.model.compressed import adopt_loaded

    path = Path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} is not an mmpost model directory (no {CONFIG_NAME})")
    if verify:
        verify_manifest(path, "model")
    config = read_json(path / CONFIG_NAME)
    if config.get("format") != "mmpost" or config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME}: unsupported format {config.get('format')} v{config.get('version')}")
    positions = None
    if "positions" in config:  # first: building the scheme registers the LLM class it needs with transformers
        from mmpost.registry import POSITIONS

        spec = dict(config["positions"])
        positions = POSITIONS.build(spec.pop("name"), **spec)
    with names_damage(path / "llm", "the LLM"):
        llm = AutoModelForCausalLM.from_pretrained(path / "llm", dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path / "llm")
    quantization = adopt_loaded(llm, path / "llm")
    encoders = {m: encoder(**spec) for m, spec in config["encoders"].items()}
    connectors = {m: connector(**spec) for m, spec in config["connectors"].items()}
    media_text = {m: MediaText(**t) for m, t in config["media_text"].items()} if "media_text" in config else None
    model = LMM(
        llm,
        encoders,
        connectors,
        tokenizer=tokenizer,
        media_text=media_text,
        positions=positions,
        typed_chat=bool(config.get("typed_chat", False)),
    )
    model.quantization = quantization
    if config["lora"]:
        with names_damage(path / "llm" / "adapter", "the LoRA adapter"):
            model.llm = load_adapter(llm, path / "llm" / "adapter")
        model.lora_config = LoraConfig(**config["lora"])
    for name, head in config.get("heads", {}).items():
        add_head(model, name, trunk=head.get("trunk", False))
    with names_damage(path / PARTS_NAME, "the encoder and connector weights"):
        parts = load_file(str(path / PARTS_NAME))
    for name, module in (("encoders", model.encoders), ("connectors", model.connectors), ("heads", model.heads)):
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in parts.items() if k.startswith(prefix)}, strict=True)
    return model
