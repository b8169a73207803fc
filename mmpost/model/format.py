"""mmpost's own model format: a self-describing directory that loads without the training config (writing it
here; reading it is ``mmpost.model.build.load_lmm``).

::

    DIR/mmpost.json          names every part: encoder / connector registry names and their specs,
                             the LoRA config when adapters are kept unmerged
    DIR/parts.safetensors    encoder, connector and scalar-head weights (``encoders.<modality>.*``, ``connectors.*``,
                             ``heads.<name>.*``: ``mmpost.model.heads``)
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

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mmpost.checksums import DamagedFileError, write_manifest
from mmpost.interfaces import PLACEHOLDERS
from mmpost.model.lora import merged_base_state_dict, save_adapter

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


def base_llm_state_dict(model: torch.nn.Module, merge_lora: bool) -> dict[str, torch.Tensor]:
    """The base LLM's weights of an ``LMM`` under transformers' own names, with LoRA deltas added when merging."""
    return merged_base_state_dict(model.llm, merge_lora)


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


def save_lmm(model: torch.nn.Module, path: str | Path, merge_lora: bool = False) -> Path:
    """Writes ``model``, an ``LMM``, to ``path`` (replacing a previous model directory there); returns the path.

    Typed as a module: the LMM imports this module to save itself, and this module does not import it back.
    """
    from mmpost.connectors import CONNECTORS
    from mmpost.encoders import ENCODERS

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
    default = set(model.media_text) == set(PLACEHOLDERS) and all(
        t.text == t.token == PLACEHOLDERS[m] for m, t in model.media_text.items()
    )
    if not default:  # a released model's own media tokens, and only those
        config["media_text"] = {m: asdict(t) for m, t in model.media_text.items()}
    if model.positions is not None:
        config["positions"] = model.positions.spec()
    if model.typed_chat:
        config["typed_chat"] = True
    if len(model.heads):
        config["heads"] = {name: {"dim": h.dim, "trunk": hasattr(h, "decoder")} for name, h in model.heads.items()}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    parts = {f"encoders.{k}": v for k, v in model.encoders.state_dict().items()}
    parts |= {f"connectors.{k}": v for k, v in model.connectors.state_dict().items()}
    parts |= {f"heads.{k}": v for k, v in model.heads.state_dict().items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in parts.items()}, str(tmp / PARTS_NAME))
    base = model.base_llm
    if model.quantization is not None:
        from mmpost.model.compressed import save_compressed

        llm = fresh_copy(base, base_llm_state_dict(model, merge_lora=True), clone=model.quantization.layers)
        save_compressed(llm, tmp / "llm", model.quantization)
    else:
        base.save_pretrained(tmp / "llm", state_dict=base_llm_state_dict(model, merge_lora))
    model.tokenizer.save_pretrained(tmp / "llm")
    if keep_adapter:
        save_adapter(model.llm, tmp / "llm" / "adapter")
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


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DamagedFileError(f"{path} cannot be read ({err}); the file is damaged") from None
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path} holds {type(data).__name__}, not an mmpost model config; the file is damaged")
    return data


@contextlib.contextmanager
def names_damage(path: Path, what: str):
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
