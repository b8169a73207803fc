"""mmpost's own model format: a self-describing directory that loads without the training config.

::

    DIR/mmpost.json          names every part: encoder / connector registry names and their specs,
                             the LoRA config when adapters are kept unmerged
    DIR/parts.safetensors    encoder and connector weights (``encoders.<modality>.*``, ``connectors.*``)
    DIR/llm/                 the base LLM and tokenizer as transformers ``save_pretrained`` writes them;
                             a quantized LLM in the compressed-tensors format (``mmpost.quant``)
    DIR/llm/adapter/         peft LoRA adapter, when LoRA is kept unmerged
    DIR/checksums.json       size and SHA-256 of every file above, checked on load (``mmpost.checksums``)

The LLM is kept in transformers' own layout so any transformers tool can read it. A directory is
written under a temporary name and renamed into place, so a crash never leaves a half-written
model where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmpost.checksums import DamagedFileError, verify_manifest, write_manifest
from mmpost.config.schema import LoraConfig

if TYPE_CHECKING:
    from mmpost.model.lmm import LMM

CONFIG_NAME = "mmpost.json"
PARTS_NAME = "parts.safetensors"
FORMAT_VERSION = 1


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def resolve_model_dir(path: str | Path, what: str = "model") -> Path:
    """The model directory ``path`` names: a saved model, or a run directory (its ``final/``).

    Raises:
        FileNotFoundError: naming ``what`` (the config key or argument) when ``path`` is neither.
    """
    path = Path(path)
    if is_model_dir(path):
        return path
    if is_model_dir(path / "final"):
        return path / "final"
    if (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{what}: {path} is a run that has not finished (no final/); use one of its checkpoints, "
            f"e.g. {path / 'checkpoints' / 'step-N' / 'model'}"
        )
    raise FileNotFoundError(
        f"{what}: {path} is not a run directory (no config.yaml and final/) nor a saved mmpost model"
    )


def base_llm_state_dict(model: LMM, merge_lora: bool) -> dict[str, torch.Tensor]:
    """The base LLM's weights under transformers' own names, with LoRA deltas added when merging.

    Computed without touching the live model (peft's ``merge_and_unload`` would change it in place).
    """
    state = model.base_llm.state_dict()
    clean = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    if merge_lora and model.has_lora:
        from peft.tuners.lora import LoraLayer

        for name, module in model.base_llm.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    key = f"{name}.weight"
                    clean[key] = clean[key] + module.get_delta_weight(adapter).to(clean[key].dtype)
    return clean


def fresh_copy(base: torch.nn.Module, state: dict[str, torch.Tensor], clone: Iterable[str] = ()) -> torch.nn.Module:
    """A new model of ``base``'s class and config holding ``state``'s tensors (shared, not copied, except
    the weights of the modules named in ``clone``), for writers that rebuild a model's layers."""
    with torch.device("meta"):
        fresh = type(base)(copy.deepcopy(base.config))
    prefixes = tuple(f"{name}." for name in clone)
    state = {k: v.detach().clone() if k.startswith(prefixes) else v for k, v in state.items()}
    fresh.load_state_dict(state, strict=True, assign=True)
    fresh.tie_weights()
    fresh.generation_config = copy.deepcopy(base.generation_config)
    return fresh.eval()


def save_lmm(model: LMM, path: str | Path, merge_lora: bool = False) -> Path:
    """Writes ``model`` to ``path`` (replacing a previous model directory there) and returns the path."""
    from connectors import CONNECTORS
    from encoders import ENCODERS

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep_adapter = model.has_lora and not merge_lora
    config = {
        "format": "mmpost",
        "version": FORMAT_VERSION,
        "encoders": {m: {"name": ENCODERS.name_of(type(e)), **e.spec()} for m, e in model.encoders.items()},
        "connectors": {m: {"name": CONNECTORS.name_of(type(c)), **c.spec()} for m, c in model.connectors.items()},
        "lora": asdict(model.lora_config) if keep_adapter and model.lora_config else None,
    }
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    parts = {f"encoders.{k}": v for k, v in model.encoders.state_dict().items()}
    parts |= {f"connectors.{k}": v for k, v in model.connectors.state_dict().items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in parts.items()}, str(tmp / PARTS_NAME))
    base = model.base_llm
    if model.quantization is not None:
        from mmpost.quant.compressed import save_compressed

        llm = fresh_copy(base, base_llm_state_dict(model, merge_lora=True), clone=model.quantization.layers)
        save_compressed(llm, tmp / "llm", model.quantization)
    else:
        base.save_pretrained(tmp / "llm", state_dict=base_llm_state_dict(model, merge_lora))
    model.tokenizer.save_pretrained(tmp / "llm")
    if keep_adapter:
        model.llm.save_pretrained(tmp / "llm" / "adapter")
    write_manifest(tmp)
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)  # a kill from here on leaves either the old or the new directory under `path`'s name
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def load_lmm(path: str | Path, dtype: torch.dtype | None = None, verify: bool = True) -> LMM:
    """Loads a directory written by ``save_lmm`` (LoRA adapters, if any, stay separate and trainable).

    Args:
        verify: check every file against the directory's ``checksums.json`` first.

    Raises:
        FileNotFoundError: if ``path`` is not an mmpost model directory.
        DamagedFileError: naming a file that differs from what was saved or cannot be read.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from connectors import CONNECTORS
    from encoders import ENCODERS
    from mmpost.model.lmm import LMM
    from mmpost.quant.compressed import adopt_loaded

    path = Path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} is not an mmpost model directory (no {CONFIG_NAME})")
    if verify:
        verify_manifest(path, "model")
    config = _read_json(path / CONFIG_NAME)
    if config.get("format") != "mmpost" or config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_NAME}: unsupported format {config.get('format')} v{config.get('version')}")
    with _names_damage(path / "llm", "the LLM"):
        llm = AutoModelForCausalLM.from_pretrained(path / "llm", dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path / "llm")
    quantization = adopt_loaded(llm)
    encoders = {m: ENCODERS.build(**spec) for m, spec in config["encoders"].items()}
    connectors = {m: CONNECTORS.build(**spec) for m, spec in config["connectors"].items()}
    model = LMM(llm, encoders, connectors, tokenizer=tokenizer)
    model.quantization = quantization
    if config["lora"]:
        with _names_damage(path / "llm" / "adapter", "the LoRA adapter"):
            model.llm = PeftModel.from_pretrained(llm, path / "llm" / "adapter", is_trainable=True)
        model.lora_config = LoraConfig(**config["lora"])
    with _names_damage(path / PARTS_NAME, "the encoder and connector weights"):
        parts = load_file(str(path / PARTS_NAME))
    for name, module in (("encoders", model.encoders), ("connectors", model.connectors)):
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in parts.items() if k.startswith(prefix)}, strict=True)
    return model


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DamagedFileError(f"{path} cannot be read ({err}); the file is damaged") from None
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path} holds {type(data).__name__}, not an mmpost model config; the file is damaged")
    return data


@contextlib.contextmanager
def _names_damage(path: Path, what: str):
    """Turns a loader's failure on damaged bytes (safetensors' header errors, JSON errors) into an error naming
    ``path``; a missing file stays a FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        if isinstance(err, DamagedFileError):
            raise
        raise DamagedFileError(
            f"{path}: {what} cannot be loaded ({type(err).__name__}: {err}); is it damaged?"
        ) from None
