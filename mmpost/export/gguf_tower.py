"""The ``mmproj`` GGUF of a LLaVA-1.5-style model (its CLIP or SigLIP tower and projector), and what the two GGUF
files share: reading the transformers LLaVA directory one tensor at a time, and writing a planned file tensor by tensor.

The file is what llama.cpp's CLIP graph reads for projector type ``mlp`` (``tools/mtmd/clip.cpp``, the LLaVA graph in
``tools/mtmd/models/llava.cpp``), as llama.cpp's own LLaVA converter writes it
(``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py``); the tower's tensor names come from the gguf package's
MMPROJ table. Choices, and where the runtime departs from mmpost:

- Feature layer. mmpost's features are ``hidden_states[f]`` (0 is the embeddings output; a negative ``f`` counts from
  the end, ``L + 1 + f`` for an L-block tower). The file holds blocks ``0 .. f-1`` only, with
  ``clip.vision.block_count = f`` and ``clip.vision.feature_layer = [f]``: with the array set the graph runs exactly
  ``f`` blocks and takes their output, whatever its default for a file without one.
- No post-layernorm (``v.post_ln`` would be applied after the last block run, and LLaVA's features have none) and no
  SigLIP pooling head. CLIP brings its pre-layernorm ``v.pre_ln`` and class embedding ``v.class_embd``; SigLIP has
  neither, but a patch-embedding bias. The graph drops the CLS output whenever ``v.class_embd`` exists, so a CLIP
  tower whose CLS token mmpost keeps (select strategy ``full``) cannot be written.
- Projector. clip.cpp's ``mlp`` projector is ``mm.0``, GELU, ``mm.2``; the gguf table's ``multi_modal_projector``
  entry gives another model's ``mm.1`` / ``mm.2``, so these two are named by index. Biases are always written (the
  graph adds them unconditionally): zeros for a projector without. A ``linear`` projector (no activation,
  ``y = A x + c``) is written as the 2-layer MLP computing the same map, ``mm.0 = [A; -A]``, ``mm.2 = [I, -I]``, since
  ``GELU(z) - GELU(-z) = z`` for the erf and the tanh GELU alike; its hidden width doubles.
- ggml's GELU is the tanh approximation, where mmpost's ``mlp`` uses the erf one (about 1e-3 apart on the
  projector's activations). The tower's activation is ``clip.use_gelu`` for SigLIP's tanh GELU (and for an erf GELU,
  which ggml approximates the same way), and the graph's default, quick GELU, for CLIP.
- Preprocessing keys are the image size, mean and std. llama.cpp pads an image to a square and resizes it, where
  the transformers CLIP processor resizes the short side and center-crops: the same pixels for square images.
- Storage as llama.cpp's converters choose it: matrices and the patch convolution in f16, vectors and the
  position embeddings in f32.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mmpost.families.base import ExportError

F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
# tools/mtmd/clip-impl.h: KEY_FEATURE_LAYERS (the gguf package has no constant for it) and PROJECTOR_TYPE_MLP
FEATURE_LAYER_KEY = "clip.vision.feature_layer"
PROJECTOR_TYPE = "mlp"
TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# the tower's hidden_act -> the clip.cpp key that selects it (None: its default, quick GELU)
ACTIVATIONS = {
    "quick_gelu": None,
    "gelu": gguf.Keys.ClipVision.USE_GELU,
    "gelu_pytorch_tanh": gguf.Keys.ClipVision.USE_GELU,
    "gelu_new": gguf.Keys.ClipVision.USE_GELU,
    "silu": gguf.Keys.ClipVision.USE_SILU,
}
# a checkpoint's key prefixes -> the part they belong to, and the spelling the gguf tables know
LLM_PREFIXES = {
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "lm_head.": "lm_head.",
}
TOWER_PREFIXES = (
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
)
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
TOWER_TABLE_PREFIX = "vision_tower.vision_model."


@dataclass(frozen=True)
class Tensor:
    """One tensor of a planned GGUF file.

    Attributes:
        name: its GGUF name.
        shape: numpy order (ggml's ``ne`` reversed).
        qtype: how it is stored.
        load: reads it as float32 with ``shape``, once the file's header is written.
    """

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


class Checkpoint:
    """A transformers LLaVA directory: its config, processor settings and safetensors tensors, sorted into the LLM's,
    the tower's and the projector's (each under the spelling the gguf tables know) and read one at a time.

    Raises:
        ExportError: for a directory without ``config.json`` or safetensors, a quantized one, or a tensor of no part.
    """

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = directory
        if not (directory / "config.json").is_file():
            raise ExportError(f"{directory}: no config.json; expected a transformers LLaVA directory")
        self.config: dict[str, Any] = json.loads((directory / "config.json").read_text())
        if self.config.get("model_type") != "llava":
            raise ExportError(f"{directory} holds a {self.config.get('model_type')} model, not a LLaVA one")
        if self.config.get("quantization_config"):
            raise ExportError(f"{directory} holds quantized weights; the GGUF export reads float ones")
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{directory}: no safetensors weights")
        self._file: dict[str, Path] = {}
        for path in files:
            with safe_open(path, framework="pt") as handle:
                self._file |= dict.fromkeys(handle.keys(), path)
        self.llm, self.tower, self.projector = {}, {}, {}  # table spelling -> checkpoint key
        for key in self._file:
            if (name := _respell(key, LLM_PREFIXES)) is not None:
                self.llm[name] = key
            elif (name := _respell(key, dict.fromkeys(TOWER_PREFIXES, TOWER_TABLE_PREFIX))) is not None:
                self.tower[name] = key
            elif (name := _respell(key, dict.fromkeys(PROJECTOR_PREFIXES, ""))) is not None:
                self.projector[name] = key
            else:
                raise ExportError(f"{directory}: tensor {key} belongs to no LLaVA part (LLM, vision tower, projector)")

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self._file[key], framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def load(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self._file[key], framework="pt") as handle:
            return handle.get_tensor(key).float().numpy()

    def image_processor(self) -> dict[str, Any]:
        """The processor's image settings (``processor_config.json``, or ``preprocessor_config.json``)."""
        processor, image = self.directory / "processor_config.json", self.directory / "preprocessor_config.json"
        if processor.is_file():
            return json.loads(processor.read_text())["image_processor"]
        if image.is_file():
            return json.loads(image.read_text())
        raise ExportError(f"{self.directory}: no processor_config.json or preprocessor_config.json (image mean / std)")


def _respell(key: str, prefixes: dict[str, str]) -> str | None:
    for prefix, replacement in prefixes.items():
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return None


def storage_type(name: str, shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    """How ``convert_hf_to_gguf.py`` stores a tensor (``prepare_tensors`` in ``conversion/base.py``): vectors and
    norms in f32, matrices in f16, or in Q8_0 for ``quant`` q8_0 where the row length is a multiple of its block."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return F32
    if quant == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q8_0][0] == 0:
        return Q8_0
    return F16


def write_file(path: Path, arch: str, metadata: Callable[[gguf.GGUFWriter], None], tensors: list[Tensor]) -> None:
    """Writes a GGUF file: ``metadata`` adds its keys, then the tensors are read, converted and written one by one,
    so that no more than one is held in memory."""
    writer = gguf.GGUFWriter(path, arch)
    metadata(writer)
    for tensor in tensors:
        if tensor.qtype in (F32, F16):
            dtype = np.dtype(np.float32 if tensor.qtype == F32 else np.float16)
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, int(np.prod(tensor.shape)) * dtype.itemsize)
        else:
            stored = gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype)
            writer.add_tensor_info(
                tensor.name, stored, np.dtype(np.uint8), int(np.prod(stored)), raw_dtype=tensor.qtype
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        data = tensor.load()
        if data.shape != tensor.shape:
            raise ExportError(f"{tensor.name}: read {data.shape}, planned {tensor.shape}")
        writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), tensor.qtype))
    writer.close()


def feature_depth(config: dict[str, Any]) -> int:
    """The non-negative hidden-state index the LLaVA config's ``vision_feature_layer`` names: the blocks to run."""
    layer, blocks = config["vision_feature_layer"], config["vision_config"]["num_hidden_layers"]
    return layer if layer >= 0 else blocks + 1 + layer


def tower_problem(config: dict[str, Any]) -> str | None:
    """What of a LLaVA config's tower and projector the mmproj file cannot hold; None when it holds them all."""
    vision = config["vision_config"]
    kind = TOWERS.get(vision.get("model_type"))
    if kind is None:
        return f"a {vision.get('model_type')} tower; llama.cpp's LLaVA graph runs CLIP and SigLIP ones"
    layer, blocks = config.get("vision_feature_layer"), vision["num_hidden_layers"]
    if not isinstance(layer, int) or not -(blocks + 1) <= layer <= blocks:
        return f"vision feature layer {layer}; the mmproj file names one hidden state of the {blocks}-block tower"
    strategy = config.get("vision_feature_select_strategy")
    if strategy != ("default" if kind == "clip" else "full"):
        return (
            f"select strategy {strategy!r} on a {kind} tower: llama.cpp's LLaVA graph drops the CLS token of a tower "
            "that has one (CLIP: 'default', drop_cls) and keeps every token of one without (SigLIP: 'full')"
        )
    if vision.get("hidden_act") not in ACTIVATIONS:
        return f"tower activation {vision.get('hidden_act')}; llama.cpp's CLIP graph runs {', '.join(ACTIVATIONS)}"
    if config.get("projector_hidden_act") not in ("gelu", "linear"):
        return f"projector activation {config.get('projector_hidden_act')}; the mlp projector is linear or GELU"
    return None


def tower_tensors(checkpoint: Checkpoint) -> list[Tensor]:
    """The tower's tensors the graph reads, up to the feature layer, then the projector's."""
    config = checkpoint.config
    depth, blocks = feature_depth(config), config["vision_config"]["num_hidden_layers"]
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, blocks)
    tensors = []
    for spelled, key in checkpoint.tower.items():
        own = spelled[len(TOWER_TABLE_PREFIX) :]
        block = re.match(r"encoder\.layers\.(\d+)\.", own)
        if own.startswith(("post_layernorm.", "head.")) or (block and int(block.group(1)) >= depth):
            continue  # features are taken before these
        found = table.get_type_and_name(spelled, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportError(f"{key}: no tensor of llama.cpp's CLIP graph holds it")
        kind, name = found
        shape = checkpoint.shape(key)
        qtype = F32 if kind == gguf.MODEL_TENSOR.V_ENC_EMBD_POS else storage_type(name, shape, "f16")
        tensors.append(Tensor(name, shape, qtype, partial(checkpoint.load, key)))
    return tensors + projector_tensors(checkpoint)


def projector_tensors(checkpoint: Checkpoint) -> list[Tensor]:
    """``mm.0`` and ``mm.2``: LLaVA's linear_1 and linear_2, or for a linear projector the GELU pair computing it."""
    keys = checkpoint.projector
    hidden, in_dim = checkpoint.shape(keys["linear_1.weight"])
    width = checkpoint.shape(keys["linear_2.weight"])[0]

    def weight(layer: int) -> np.ndarray:
        return checkpoint.load(keys[f"linear_{layer}.weight"])

    def bias(layer: int) -> np.ndarray:  # a bias-free projector adds zeros
        key = keys.get(f"linear_{layer}.bias")
        return checkpoint.load(key) if key else np.zeros(hidden if layer == 1 else width, dtype=np.float32)

    @cache
    def affine() -> tuple[np.ndarray, np.ndarray]:  # y = A x + c, what linear_2(linear_1(x)) computes
        return weight(2) @ weight(1), weight(2) @ bias(1) + bias(2)

    def doubled(part: int) -> np.ndarray:  # [A; -A] or [c; -c]
        return np.concatenate([affine()[part], -affine()[part]])

    if checkpoint.config["projector_hidden_act"] == "gelu":
        first = ((hidden, in_dim), partial(weight, 1), (hidden,), partial(bias, 1))
        second = ((width, hidden), partial(weight, 2), (width,), partial(bias, 2))
    else:
        eye = np.eye(width, dtype=np.float32)
        first = ((2 * width, in_dim), partial(doubled, 0), (2 * width,), partial(doubled, 1))
        second = ((width, 2 * width), lambda: np.concatenate([eye, -eye], 1), (width,), partial(np.zeros, width))
    tensors = []
    for index, (weight_shape, load_weight, bias_shape, load_bias) in ((0, first), (2, second)):
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=index)
        tensors.append(Tensor(f"{name}.weight", weight_shape, F16, load_weight))
        tensors.append(Tensor(f"{name}.bias", bias_shape, F32, load_bias))
    return tensors


def mmproj_metadata(checkpoint: Checkpoint, name: str) -> Callable[[gguf.GGUFWriter], None]:
    """The keys clip.cpp's loader reads for a vision tower with an ``mlp`` projector."""
    config = checkpoint.config
    vision, image = config["vision_config"], checkpoint.image_processor()
    text_width = checkpoint.shape(checkpoint.projector["linear_2.weight"])[0]  # the LLM's

    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(name)
        writer.add_description("image encoder and projector for LLaVA")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_clip_has_vision_encoder(True)
        writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
        writer.add_clip_projector_type(PROJECTOR_TYPE)
        writer.add_vision_projection_dim(text_width)
        writer.add_vision_image_size(vision["image_size"])
        writer.add_vision_patch_size(vision["patch_size"])
        writer.add_vision_embedding_length(vision["hidden_size"])
        writer.add_vision_feed_forward_length(vision["intermediate_size"])
        writer.add_vision_head_count(vision["num_attention_heads"])
        writer.add_vision_attention_layernorm_eps(vision["layer_norm_eps"])
        writer.add_vision_block_count(feature_depth(config))
        writer.add_array(FEATURE_LAYER_KEY, [feature_depth(config)])  # int32, as clip.cpp reads it
        writer.add_vision_image_mean([float(v) for v in image["image_mean"]])
        writer.add_vision_image_std([float(v) for v in image["image_std"]])
        if (key := ACTIVATIONS[vision["hidden_act"]]) is not None:
            writer.add_bool(key, True)

    return add


def mmproj_plan(checkpoint: Checkpoint, name: str) -> tuple[Callable[[gguf.GGUFWriter], None], list[Tensor]]:
    """The mmproj file's metadata and tensors (for ``write_file``) of a checkpoint whose ``tower_problem`` is None."""
    return mmproj_metadata(checkpoint, name), tower_tensors(checkpoint)
