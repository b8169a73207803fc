"""GGUF export for llama.cpp's multimodal runtime (libmtmd; ``llama-server``): the LLM file and the ``mmproj`` file.

The input is the transformers LLaVA directory ``mmpost.families.llava`` writes; ``write_gguf`` turns it into
``model-<quant>.gguf`` (the LLM, llama.cpp architecture ``llama`` or ``qwen2``) and ``mmproj-f16.gguf`` (the CLIP /
SigLIP tower and projector, ``mmpost.export.gguf_tower``). ``check_gguf_parts`` refuses, before any work, a model
whose parts llama.cpp cannot represent. Tensor names come from the gguf package's tables
(``gguf.get_tensor_name_map``), keys from its writer; the choices follow llama.cpp's ``convert_hf_to_gguf.py``
(``conversion/base.py``, ``conversion/llama.py``):

- Llama's Q and K rows are reordered (``LlamaModel.permute``): transformers' rotary embedding pairs the two halves
  of a head (``rotate_half``), ggml's for the ``llama`` architecture pairs adjacent rows. Qwen2's rope pairs halves
  in ggml too, so its weights are written as they are.
- f16 stores matrices in f16 and vectors in f32; q8_0 stores matrices in Q8_0 (``gguf.quants``, in numpy) where the
  row length is a multiple of 32, f16 otherwise; q4_k_m is llama.cpp's ``llama-quantize`` run on the f16 file (the
  k-quant mixes are not in the gguf package). The mmproj file is f16 in every case.
- The tokenizer is byte-level BPE (``tokenizer.ggml.model = gpt2``): the vocabulary in id order, added tokens typed
  CONTROL (special) or USER_DEFINED, the merges and special ids through ``gguf.SpecialVocab``. ``tokenizer.ggml.pre``
  names the split before BPE, which llama.cpp re-creates by name (``src/llama-vocab.cpp``). llama.cpp's converter finds
  the name by hashing a probe text's tokens against released tokenizers, which a locally trained one never matches,
  so it is read from the pre-tokenizer's structure: mmpost's tokenizers split with a bare ``ByteLevel`` step, GPT-2's
  regex, which llama.cpp runs for ``gpt-2``; Llama-3's, Qwen2's and SmolLM's splits are recognised too.
- The chat template is the tokenizer's, which reads string content, as llama.cpp renders it: the exported processor's
  template is the same behind a prologue for typed content, which is dropped. llama.cpp puts an image where the
  prompt has its media marker, ``<__media__>``; mmpost's data puts one as ``<image>\\n`` before the question, so a
  llama.cpp prompt reads ``<__media__>\\nQuestion``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from mmpost.export.gguf_tower import F32, Checkpoint, Tensor, mmproj_plan, storage_type, tower_problem, write_file
from mmpost.export.llama_cpp_check import LLAMA_CPP_ENV, find_tool
from mmpost.families.base import ExportError

if TYPE_CHECKING:
    from mmpost.model.lmm import LMM
    from mmpost.registry import Registry

QUANTS = ("f16", "q8_0", "q4_k_m")
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
MMPROJ_FILE = "mmproj-f16.gguf"
QUANTIZE_BINARY = "llama-quantize"
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
# tokenizer.json Split regexes (before a regex-free ByteLevel step) -> tokenizer.ggml.pre running the same split
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _REST: "llama-bpe",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _REST: "qwen2",
}


def write_gguf(hf_dir: Path, out: Path, quantize: str = "f16", llama_cpp: Path | None = None) -> dict[str, Any]:
    """Writes ``out/model-<quantize>.gguf`` and ``out/mmproj-f16.gguf`` from the LLaVA directory ``hf_dir``.

    Args:
        hf_dir: what ``mmpost.families.llava`` exports (``LlavaForConditionalGeneration`` safetensors, config,
            tokenizer, processor).
        out: the folder to write to (created if needed).
        quantize: ``f16``, ``q8_0`` or ``q4_k_m``.
        llama_cpp: a llama.cpp build's bin folder, for ``q4_k_m``; by default ``$MMPOST_LLAMA_CPP``, else ``PATH``.

    Returns:
        ``{"format": "gguf", "quantize": ..., "files": {"model": name, "mmproj": name}, "bytes": {name: size}}``.

    Raises:
        ExportError: for an unknown ``quantize``, ``q4_k_m`` without ``llama-quantize``, parts llama.cpp cannot
            represent, or ``llama-quantize`` failing; all but the last before anything is written.
    """
    if quantize not in QUANTS:
        raise ExportError(f"unknown GGUF quantization {quantize!r}; use {', '.join(QUANTS)}")
    quantizer = find_llama_quantize(llama_cpp) if quantize == "q4_k_m" else None
    hf_dir, out = Path(hf_dir), Path(out)
    checkpoint = Checkpoint(hf_dir)
    for why in (tower_problem(checkpoint.config), llm_problem(text_config(checkpoint.config))):
        if why is not None:
            raise ExportError(f"{hf_dir}: the GGUF export cannot carry {why}")
    llm = llm_plan(checkpoint, "f16" if quantizer is not None else quantize, out.resolve().name)
    mmproj = mmproj_plan(checkpoint, out.resolve().name)
    arch = gguf.MODEL_ARCH_NAMES[ARCHES[text_config(checkpoint.config)["model_type"]]]
    model_file = f"model-{quantize}.gguf"
    out.mkdir(parents=True, exist_ok=True)
    if quantizer is None:
        write_file(out / model_file, arch, *llm)
    else:
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            f16 = Path(scratch) / "model-f16.gguf"
            write_file(f16, arch, *llm)
            run_llama_quantize(quantizer, f16, out / model_file, "Q4_K_M")
    write_file(out / MMPROJ_FILE, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], *mmproj)
    files = {"model": model_file, "mmproj": MMPROJ_FILE}
    sizes = {name: (out / name).stat().st_size for name in files.values()}
    return {"format": "gguf", "quantize": quantize, "files": files, "bytes": sizes}


def check_gguf_parts(model: LMM) -> None:
    """Refuses a model whose parts llama.cpp's multimodal runtime cannot represent: a media path other than one
    ``hf_vision`` tower with a ``linear`` or 2-layer ``mlp`` connector (a Q-Former, a resampler, gated cross-attention,
    an audio tower, a timm or open_clip tower, several modalities), or an LLM the GGUF export does not write.

    Raises:
        ExportError: naming the part, why, and the formats that carry it.
    """
    found = unfit_part(model)
    if found is not None:
        part, why = found
        raise ExportError(f"--format gguf cannot carry {part}: {why}. {carriers(model)}")


def unfit_part(model: LMM) -> tuple[str, str] | None:
    """The first part of ``model`` llama.cpp cannot represent and why; None when there is none."""
    from mmpost.connectors import CONNECTORS
    from mmpost.connectors.projection import MLPConnector
    from mmpost.encoders import ENCODERS
    from mmpost.encoders.hf_vision import HFVisionEncoder

    if model.quantization is not None:
        return "a quantized LLM", "llama.cpp quantizes from float weights (export the float model with --quantize)"
    if model.modalities != ["image"]:
        others = [f"the {m} encoder {registered(ENCODERS, enc)}" for m, enc in model.encoders.items() if m != "image"]
        why = f"an mmproj file holds one image tower (this model's modalities: {', '.join(model.modalities) or 'none'})"
        return ", ".join(others) or "a model without media", why
    encoder, connector = model.encoders["image"], model.connectors["image"]
    if not isinstance(encoder, HFVisionEncoder):
        return f"the image encoder {registered(ENCODERS, encoder)}", "llama.cpp runs transformers CLIP / SigLIP towers"
    if not isinstance(connector, MLPConnector) or connector.depth > 2:
        depth = f" of depth {connector.depth}" if isinstance(connector, MLPConnector) else ""
        part = f"the image connector {registered(CONNECTORS, connector)}{depth}"
        return part, "llama.cpp's LLaVA projector is a linear map or a 2-layer GELU mlp"
    if model.positions is not None:
        return "the LLM's position scheme", "llama.cpp's LLaVA models number positions 0, 1, 2, ..."
    tower = {  # the LLaVA config mmpost.families.llava writes for these parts
        "vision_config": encoder.model.config.to_dict(),
        "vision_feature_layer": encoder.feature_layer,
        "vision_feature_select_strategy": "default" if encoder.drop_cls else "full",
        "projector_hidden_act": "gelu" if connector.depth == 2 else "linear",
    }
    if (why := tower_problem(tower)) is not None:
        return "the image tower", why
    if (why := llm_problem(model.base_llm.config.to_dict())) is not None:
        return "the LLM", why
    return None


def registered(registry: Registry, part: Any) -> str:
    from mmpost.registry import RegistryError

    try:
        return f"'{registry.name_of(type(part))}' ({type(part).__name__})"
    except RegistryError:
        return type(part).__name__


def carriers(model: LMM) -> str:
    from mmpost.families import family_for

    try:
        family = family_for(model)
    except ExportError:
        return "Export it with --format mmpost, which carries any parts (no transformers class of --format hf does)"
    return f"Export it with --format hf (as {family.class_names}) or --format mmpost, which carry it"


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def rope_of(text: dict[str, Any]) -> dict[str, Any]:
    """The LLM's rope settings (transformers 5 ``rope_parameters`` or the older ``rope_scaling`` / ``rope_theta``)."""
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope.setdefault("rope_theta", text.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def llm_problem(text: dict[str, Any]) -> str | None:
    """What of an LLM config the GGUF export cannot write; None when it can."""
    kind = text.get("model_type")
    if kind not in ARCHES:
        return f"a {kind} LLM (the GGUF export writes {' and '.join(ARCHES)} ones)"
    scaling = rope_of(text)["rope_type"]
    if scaling not in ("default", "linear") + (("llama3",) if kind == "llama" else ()):
        return f"{scaling} rope scaling on a {kind} LLM"
    if text.get("use_sliding_window"):
        return "sliding-window attention"
    return None


def llm_plan(checkpoint: Checkpoint, quant: str, name: str) -> tuple[Callable[[gguf.GGUFWriter], None], list[Tensor]]:
    """The LLM file's metadata and tensors, read and checked before anything is written."""
    text = text_config(checkpoint.config)
    arch = ARCHES[text["model_type"]]
    heads, hidden = text["num_attention_heads"], text["hidden_size"]
    kv_heads, head_dim = text.get("num_key_value_heads") or heads, text.get("head_dim") or hidden // heads
    rope = rope_of(text)
    tokenizer = tokenizer_metadata(checkpoint, text["vocab_size"])
    table = gguf.get_tensor_name_map(arch, text["num_hidden_layers"])
    tied = checkpoint.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in checkpoint.llm:
        raise ExportError(f"{checkpoint.directory}: untied embeddings but no lm_head weight")
    tensors = []
    for spelled, key in checkpoint.llm.items():
        if spelled.endswith("rotary_emb.inv_freq") or (tied and spelled == "lm_head.weight"):
            continue  # llama.cpp computes the first and reuses token_embd for a missing output
        found = table.get_type_and_name(spelled, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportError(f"{key}: no tensor of llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} graph holds it")
        kind, gguf_name = found
        load = partial(checkpoint.load, key)
        if arch == gguf.MODEL_ARCH.LLAMA and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            load = partial(rope_pairs, load, heads if kind == gguf.MODEL_TENSOR.ATTN_Q else kv_heads)
        shape = checkpoint.shape(key)
        tensors.append(Tensor(gguf_name, shape, storage_type(gguf_name, shape, quant), load))
    if rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(text)
        rope_freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        tensors.append(Tensor(rope_freqs, factors.shape, F32, lambda: factors))

    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_block_count(text["num_hidden_layers"])
        writer.add_context_length(text["max_position_embeddings"])
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(text["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(text["rms_norm_eps"]))
        writer.add_vocab_size(text["vocab_size"])
        writer.add_file_type(FILE_TYPES[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer(writer)

    return add, tensors


def rope_pairs(load: Callable[[], np.ndarray], heads: int) -> np.ndarray:
    """The rows of a Q or K projection (or bias) reordered so that ggml's adjacent-pair rope computes what
    transformers' half-pair rope does: within each head, rows ``i`` and ``i + d/2`` become rows ``2i`` and ``2i+1``."""
    rows = load()  # [heads * d, ...]
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def llama3_rope_factors(text: dict[str, Any]) -> np.ndarray:
    """``rope_freqs``: the divisor of each rotary frequency under Llama-3 rope scaling, a tensor in llama.cpp where
    transformers computes it from the config (``generate_extra_tensors`` in ``conversion/llama.py``)."""
    rope = rope_of(text)
    dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    wavelength = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    smooth = (context / wavelength - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, between))
    return factors.astype(np.float32)


def tokenizer_metadata(checkpoint: Checkpoint, vocab_size: int) -> Callable[[gguf.GGUFWriter], None]:
    """The tokenizer's keys, read and checked now: tokens in id order with their types, the pre-tokenizer's name, and
    the merges, special ids and chat template (``gguf.SpecialVocab``)."""
    path = checkpoint.directory / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{checkpoint.directory}: no tokenizer.json; the GGUF export writes BPE tokenizers")
    spec = json.loads(path.read_text())
    if spec["model"].get("type") != "BPE":
        raise ExportError(f"{path}: a {spec['model'].get('type')} tokenizer; the GGUF export writes BPE ones")
    tokens, types = vocabulary(spec, vocab_size)
    pre = pre_tokenizer_name(spec, path)
    special = gguf.SpecialVocab(checkpoint.directory, load_merges=True, n_vocab=vocab_size)
    image_id = checkpoint.config.get("image_token_index", checkpoint.config.get("image_token_id"))
    special.chat_template = string_content(special.chat_template, None if image_id is None else tokens[image_id])
    special.add_special_token.setdefault("bos", False)  # as transformers: only a post-processor adds one

    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    return add


def vocabulary(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with their llama.cpp types; ids the tokenizer lacks below ``vocab_size`` are padding."""
    normal = {index: token for token, index in spec["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    if max([*normal, *added]) >= vocab_size:
        raise ExportError(f"the tokenizer has ids beyond the LLM's {vocab_size} embeddings")
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            content = added[index]["content"]
            control = added[index]["special"] or (content.startswith("<|") and content.endswith("|>"))
            tokens.append(content)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        elif index in normal:
            tokens.append(normal[index])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


def pre_tokenizer_name(spec: dict[str, Any], path: Path) -> str:
    """The ``tokenizer.ggml.pre`` whose split llama.cpp runs as ``spec``'s pre-tokenizer does."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    if byte_level and not byte_level.get("add_prefix_space", False):
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex and steps[0].get("pattern", {}).get("Regex") in SPLITS:
            return SPLITS[steps[0]["pattern"]["Regex"]]
    raise ExportError(
        f"{path}: pre-tokenizer {json.dumps(pre)} matches none llama.cpp re-creates by name; the GGUF export "
        "knows GPT-2's byte-level split (mmpost's tokenizers), SmolLM's, Llama-3's and Qwen2's"
    )


def string_content(template: Any, image_token: str | None) -> Any:
    """The template without the typed-content prologue ``mmpost.families.base.typed_content_template`` puts in front
    of an exported processor's template (a template without it is kept as it is)."""
    from mmpost.families.base import typed_content_template

    if not isinstance(template, str) or image_token is None:
        return template
    prologue = typed_content_template("", {"image": image_token})
    return template[len(prologue) :] if template.startswith(prologue) else template


def find_llama_quantize(llama_cpp: Path | None) -> Path:
    """llama.cpp's ``llama-quantize`` (``mmpost.export.llama_cpp_check.find_tool``).

    Raises:
        ExportError: when there is none, saying how to name one.
    """
    found = find_tool(QUANTIZE_BINARY, llama_cpp)
    if found is None:
        folder = llama_cpp if llama_cpp is not None else os.environ.get(LLAMA_CPP_ENV)
        where = f"not in {folder}" if folder else f"not on PATH, and {LLAMA_CPP_ENV} is unset"
        raise ExportError(
            f"--quantize q4_k_m runs llama.cpp's {QUANTIZE_BINARY} on the f16 file, and there is none ({where}). "
            f"Name a llama.cpp build's bin folder (llama_cpp=, or {LLAMA_CPP_ENV}), put {QUANTIZE_BINARY} on PATH, "
            "or use --quantize f16 or q8_0, which need no llama.cpp"
        )
    return found


def run_llama_quantize(binary: Path, source: Path, target: Path, kind: str) -> None:
    """``llama-quantize source target kind``.

    Raises:
        ExportError: with the end of its output, when it fails.
    """
    done = subprocess.run([str(binary), str(source), str(target), kind], capture_output=True, text=True)
    if done.returncode != 0 or not target.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ExportError(f"{binary} {kind} failed (exit {done.returncode}): " + " / ".join(tail))
