"""GGUF export for llama.cpp: the LLM and mmproj files, read back with the gguf package's reader, hold the keys and
tensors llama.cpp's loaders ask for (names from the package's own tables, shapes as llama.cpp's loaders create them),
the source weights, and a tower and projector that compute, run as llama.cpp's LLaVA graph runs them, what mmpost's do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import mmpost
from mmpost.export.gguf_llm import LLAMA_CPP_ENV, check_gguf_parts, llama3_rope_factors, pre_tokenizer_name, write_gguf
from mmpost.families import family_for
from mmpost.families.base import ExportError

T, LLM, VISION = gguf.MODEL_TENSOR, gguf.Keys.LLM, gguf.Keys.ClipVision
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# tower fixture -> its connector and options, and the feature layer
TOWERS = {"clip": ("mlp", {"depth": 2}, -2), "siglip": ("linear", {}, -1)}
# transformers Llama names -> the gguf package's tensor kinds (llama.cpp's LLM_ARCH_LLAMA tensors)
BLOCK = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.down_proj": T.FFN_DOWN,
    "mlp.up_proj": T.FFN_UP,
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, llm_dir, clip_dir, siglip_dir, one_thread):
    """Per tower: the model, its folder (``hf/``, the LLaVA export, and one GGUF folder per quantization)."""
    paths, done = {"clip": clip_dir, "siglip": siglip_dir}, {}
    for tower, (connector, options, layer) in TOWERS.items():
        torch.manual_seed(0)
        encoder = mmpost.encoder("hf_vision", path=str(paths[tower]), feature_layer=layer)
        model = mmpost.LMM(
            llm=str(llm_dir), encoders={"image": encoder}, connectors={"image": mmpost.connector(connector, **options)}
        )
        root = tmp_path_factory.mktemp(tower)
        with torch.no_grad():
            family_for(model.eval()).export(model, root / "hf")
        for quant in ("f16", "q8_0") if tower == "clip" else ("f16",):
            assert write_gguf(root / "hf", root / quant, quant)["files"] == {
                "model": f"model-{quant}.gguf",
                "mmproj": "mmproj-f16.gguf",
            }
        done[tower] = model, root
    return done


def read(path: Path) -> tuple[gguf.GGUFReader, dict, dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    return reader, {key: field.contents() for key, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


def llm_names(config) -> dict[str, str]:
    """transformers parameter name -> GGUF tensor name, from the package's name constants."""
    names = {
        "model.embed_tokens.weight": gguf.TENSOR_NAMES[T.TOKEN_EMBD],
        "model.norm.weight": gguf.TENSOR_NAMES[T.OUTPUT_NORM],
    }
    for i in range(config.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}.weight": gguf.TENSOR_NAMES[kind].format(bid=i) for hf, kind in BLOCK.items()}
    return {hf: f"{name}.weight" for hf, name in names.items()}


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """ggml's adjacent rope pairs back to transformers' half pairs."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llm_file_holds_the_keys_and_tensors_llama_cpp_loads(exports, quant):
    model, root = exports["clip"]
    config = model.base_llm.config
    _, fields, tensors = read(root / quant / f"model-{quant}.gguf")
    d, ff, heads, kv, vocab = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
    )
    head_dim = d // heads
    keys = {
        gguf.Keys.General.ARCHITECTURE: "llama",
        gguf.Keys.General.FILE_TYPE: FILE_TYPES[quant],
        LLM.BLOCK_COUNT: config.num_hidden_layers,
        LLM.CONTEXT_LENGTH: config.max_position_embeddings,
        LLM.EMBEDDING_LENGTH: d,
        LLM.FEED_FORWARD_LENGTH: ff,
        LLM.VOCAB_SIZE: vocab,
        gguf.Keys.Attention.HEAD_COUNT: heads,
        gguf.Keys.Attention.HEAD_COUNT_KV: kv,
        gguf.Keys.Rope.DIMENSION_COUNT: head_dim,
        gguf.Keys.Rope.FREQ_BASE: pytest.approx(config.rope_parameters["rope_theta"]),
        gguf.Keys.Attention.LAYERNORM_RMS_EPS: pytest.approx(config.rms_norm_eps),
    }
    assert {key.format(arch="llama"): fields[key.format(arch="llama")] for key in keys} == {
        key.format(arch="llama"): value for key, value in keys.items()
    }
    # shapes in ggml order, as llama.cpp's llama loader creates them; tied embeddings: no output.weight
    block = {
        T.ATTN_NORM: [d],
        T.ATTN_Q: [d, heads * head_dim],
        T.ATTN_K: [d, kv * head_dim],
        T.ATTN_V: [d, kv * head_dim],
        T.ATTN_OUT: [heads * head_dim, d],
        T.FFN_NORM: [d],
        T.FFN_GATE: [d, ff],
        T.FFN_DOWN: [ff, d],
        T.FFN_UP: [d, ff],
    }
    expected = {
        f"{gguf.TENSOR_NAMES[T.TOKEN_EMBD]}.weight": [d, vocab],
        f"{gguf.TENSOR_NAMES[T.OUTPUT_NORM]}.weight": [d],
    }
    for i in range(config.num_hidden_layers):
        expected |= {f"{gguf.TENSOR_NAMES[kind].format(bid=i)}.weight": shape for kind, shape in block.items()}
    assert {T.TOKEN_EMBD, T.OUTPUT_NORM, *block} <= set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA])
    assert {name: [int(n) for n in t.shape] for name, t in tensors.items()} == expected
    matrix = gguf.GGMLQuantizationType.F16 if quant == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert {t.tensor_type for t in tensors.values() if len(t.shape) == 1} == {gguf.GGMLQuantizationType.F32}
    assert {t.tensor_type for t in tensors.values() if len(t.shape) == 2} == {matrix}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llm_weights_round_trip_with_q_and_k_in_ggml_rope_order(exports, quant):
    model, root = exports["clip"]
    config = model.base_llm.config
    state = {k: v.float().numpy() for k, v in model.base_llm.state_dict().items()}
    _, _, tensors = read(root / quant / f"model-{quant}.gguf")
    for hf, name in llm_names(config).items():
        stored = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(state[hf].shape)
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf else config.num_key_value_heads
            assert not np.array_equal(stored, state[hf].astype(np.float16).astype(np.float32))
            stored = unpermute(stored, heads)
        if tensors[name].tensor_type == gguf.GGMLQuantizationType.Q8_0:
            blocks = np.abs(state[hf]).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # Q8_0's scale per block
            error = np.abs(stored - state[hf]).reshape(-1, 32)
            assert (error <= 0.57 * blocks + 1e-7).all(), name  # half a step, and the scale rounded to f16
        elif tensors[name].tensor_type == gguf.GGMLQuantizationType.F16:
            np.testing.assert_array_equal(stored, state[hf].astype(np.float16).astype(np.float32), err_msg=name)
        else:
            np.testing.assert_array_equal(stored, state[hf], err_msg=name)


def rotate_halves(x: np.ndarray, angles: np.ndarray) -> np.ndarray:  # transformers: rotate_half
    half = x.shape[-1] // 2
    cos, sin = np.cos(np.concatenate([angles, angles])), np.sin(np.concatenate([angles, angles]))
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def rotate_pairs(x: np.ndarray, angles: np.ndarray) -> np.ndarray:  # ggml LLAMA_ROPE_TYPE_NORM: (2i, 2i+1)
    out, even, odd = np.empty_like(x), x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
    out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
    return out


def test_permuted_q_and_k_give_transformers_attention_scores_under_ggml_rope(exports):
    model, root = exports["clip"]
    config = model.base_llm.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    _, _, tensors = read(root / "f16" / "model-f16.gguf")
    state = model.base_llm.state_dict()
    angles = config.rope_parameters["rope_theta"] ** -(np.arange(0, head_dim, 2) / head_dim)
    x = np.random.default_rng(0).standard_normal(config.hidden_size)

    def scores(q_rows, k_rows, rotate):  # query at position 7 against a key at position 3, per head
        q = rotate((q_rows @ x).reshape(heads, head_dim), 7 * angles)
        k = rotate((k_rows @ x).reshape(kv, head_dim), 3 * angles)
        return (q * np.repeat(k, heads // kv, axis=0)).sum(-1)

    ours = [tensors[f"blk.0.attn_{p}.weight"].data.astype(np.float64) for p in "qk"]
    theirs = [state[f"model.layers.0.self_attn.{p}_proj.weight"].half().double().numpy() for p in "qk"]
    np.testing.assert_allclose(scores(*ours, rotate_pairs), scores(*theirs, rotate_halves), rtol=1e-9)


def test_tokenizer_and_chat_template_are_the_source_tokenizers(exports):
    model, root = exports["clip"]
    tokenizer = model.tokenizer
    _, fields, _ = read(root / "f16" / "model-f16.gguf")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert fields[gguf.Keys.Tokenizer.MODEL] == "gpt2" and fields[gguf.Keys.Tokenizer.PRE] == "gpt-2"
    assert fields[gguf.Keys.Tokenizer.LIST] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields[gguf.Keys.Tokenizer.MERGES] == [" ".join(pair) for pair in spec["model"]["merges"]]
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    types = fields[gguf.Keys.Tokenizer.TOKEN_TYPE]
    assert {i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL} == special
    assert {kind for i, kind in enumerate(types) if i not in special} == {gguf.TokenType.NORMAL}
    assert fields[gguf.Keys.Tokenizer.EOS_ID] == tokenizer.eos_token_id
    assert fields[gguf.Keys.Tokenizer.PAD_ID] == tokenizer.pad_token_id
    assert fields[gguf.Keys.Tokenizer.ADD_BOS] is False and gguf.Keys.Tokenizer.BOS_ID not in fields
    # the tokenizer's own template, string content, without the processor's typed-content prologue
    assert fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE] == tokenizer.chat_template
    assert pre_tokenizer_name({"pre_tokenizer": spec["pre_tokenizer"]}, Path("t")) == "gpt-2"
    with pytest.raises(ExportError, match="matches none llama.cpp re-creates"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}, Path("t"))


def depth_of(model) -> int:
    encoder = model.encoders["image"]
    return encoder.feature_layer % (encoder.model.config.num_hidden_layers + 1)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_mmproj_holds_the_keys_clip_cpp_reads(exports, tower):
    model, root = exports[tower]
    encoder = model.encoders["image"]
    vision, image = encoder.model.config, encoder.image_processor()
    reader, fields, _ = read(root / "f16" / "mmproj-f16.gguf")
    expected = {
        gguf.Keys.General.ARCHITECTURE: gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ],
        gguf.Keys.Clip.PROJECTOR_TYPE: "mlp",  # clip-impl.h PROJECTOR_TYPE_MLP, LLaVA-1.5's
        gguf.Keys.Clip.HAS_VISION_ENCODER: True,
        gguf.Keys.Clip.HAS_LLAVA_PROJECTOR: True,
        VISION.IMAGE_SIZE: vision.image_size,
        VISION.PATCH_SIZE: vision.patch_size,
        VISION.EMBEDDING_LENGTH: vision.hidden_size,
        VISION.FEED_FORWARD_LENGTH: vision.intermediate_size,
        VISION.PROJECTION_DIM: model.hidden_size,
        VISION.Attention.HEAD_COUNT: vision.num_attention_heads,
        VISION.Attention.LAYERNORM_EPS: pytest.approx(vision.layer_norm_eps),
        VISION.BLOCK_COUNT: depth_of(model),  # the blocks run: hidden_states[depth] is the feature
        "clip.vision.feature_layer": [depth_of(model)],  # clip-impl.h KEY_FEATURE_LAYERS
        VISION.IMAGE_MEAN: pytest.approx(image.image_mean),
        VISION.IMAGE_STD: pytest.approx(image.image_std),
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert depth_of(model) == (1 if tower == "clip" else 2)  # -2 and -1 of a 2-block tower
    # clip.cpp reads the arrays as int32 / float32 only
    assert reader.fields["clip.vision.feature_layer"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert reader.fields[VISION.IMAGE_MEAN].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]
    # SigLIP's tanh GELU is clip.use_gelu; CLIP's quick GELU is the graph's default
    assert fields.get(VISION.USE_GELU) is (True if tower == "siglip" else None)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_mmproj_tensors_are_the_set_the_llava_graph_loads(exports, tower):
    model, root = exports[tower]
    vision = model.encoders["image"].model.config
    d, ff, width, p = vision.hidden_size, vision.intermediate_size, model.hidden_size, vision.patch_size
    hidden = width if tower == "clip" else 2 * width  # a linear projector becomes a GELU pair twice as wide
    _, _, tensors = read(root / "f16" / "mmproj-f16.gguf")
    name = {kind: gguf.TENSOR_NAMES[kind] for kind in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.MMPROJ]}
    patches = (vision.image_size // p) ** 2
    expected = {f"{name[T.V_ENC_EMBD_PATCH]}.weight": [p, p, 3, d]}
    if tower == "clip":  # a class embedding and a pre-layernorm, no patch bias
        expected |= {
            name[T.V_ENC_EMBD_CLS]: [d],
            f"{name[T.V_PRE_NORM]}.weight": [d],
            f"{name[T.V_PRE_NORM]}.bias": [d],
        }
        expected[f"{name[T.V_ENC_EMBD_POS]}.weight"] = [d, patches + 1]
    else:
        expected |= {f"{name[T.V_ENC_EMBD_PATCH]}.bias": [d], f"{name[T.V_ENC_EMBD_POS]}.weight": [d, patches]}
    block = {
        T.V_ENC_ATTN_Q: [d, d],
        T.V_ENC_ATTN_K: [d, d],
        T.V_ENC_ATTN_V: [d, d],
        T.V_ENC_ATTN_O: [d, d],
        T.V_ENC_INPUT_NORM: [d],
        T.V_ENC_POST_ATTN_NORM: [d],
        T.V_ENC_FFN_UP: [d, ff],
        T.V_ENC_FFN_DOWN: [ff, d],
    }
    for i in range(depth_of(model)):  # only the blocks before the feature layer; no v.post_ln
        for kind, shape in block.items():
            expected[f"{name[kind].format(bid=i)}.weight"] = shape
            expected[f"{name[kind].format(bid=i)}.bias"] = [shape[-1]] if len(shape) == 2 else shape
    for index, shape in ((0, [d, hidden]), (2, [hidden, width])):  # clip.cpp's mlp projector: mm.0, GELU, mm.2
        expected |= {
            f"{name[T.V_MMPROJ].format(bid=index)}.weight": shape,
            f"{name[T.V_MMPROJ].format(bid=index)}.bias": shape[1:],
        }
    assert {n: [int(s) for s in t.shape] for n, t in tensors.items()} == expected
    # clip.cpp swaps ffn up and down of a file whose ffn_down starts with n_embd: this one's does not
    assert int(tensors[f"{name[T.V_ENC_FFN_DOWN].format(bid=0)}.weight"].shape[0]) == ff != d


def layer_norm(x, weight, bias, eps):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * weight + bias


def tanh_gelu(x):  # ggml_gelu
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def llava_graph(fields: dict, t: dict[str, np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """llama.cpp's LLaVA graph for an mlp projector, from the mmproj file alone: patches (CLS first), position
    embeddings, pre-layernorm, ``block_count`` blocks, CLS dropped, mm.0, GELU, mm.2."""
    d, heads, eps = (
        fields[VISION.EMBEDDING_LENGTH],
        fields[VISION.Attention.HEAD_COUNT],
        fields[VISION.Attention.LAYERNORM_EPS],
    )
    p, (c, h, w) = fields[VISION.PATCH_SIZE], pixels.shape
    patches = pixels.reshape(c, h // p, p, w // p, p).transpose(1, 3, 0, 2, 4).reshape(-1, c * p * p)
    x = patches @ t["v.patch_embd.weight"].reshape(d, -1).T + t.get("v.patch_embd.bias", 0)
    if "v.class_embd" in t:
        x = np.concatenate([t["v.class_embd"][None], x])
    x = x + t["v.position_embd.weight"][: len(x)]
    if "v.pre_ln.weight" in t:
        x = layer_norm(x, t["v.pre_ln.weight"], t["v.pre_ln.bias"], eps)
    act = tanh_gelu if fields.get(VISION.USE_GELU) else (lambda z: z / (1 + np.exp(-1.702 * z)))

    def linear(z, name):
        return z @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    for i in range(fields[VISION.BLOCK_COUNT]):
        y = layer_norm(x, t[f"v.blk.{i}.ln1.weight"], t[f"v.blk.{i}.ln1.bias"], eps)
        q, k, v = (linear(y, f"v.blk.{i}.attn_{n}").reshape(len(x), heads, -1).transpose(1, 0, 2) for n in "qkv")
        logits = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        attention = np.exp(logits - logits.max(-1, keepdims=True))
        attention /= attention.sum(-1, keepdims=True)
        x = x + linear((attention @ v).transpose(1, 0, 2).reshape(len(x), d), f"v.blk.{i}.attn_out")
        y = layer_norm(x, t[f"v.blk.{i}.ln2.weight"], t[f"v.blk.{i}.ln2.bias"], eps)
        x = x + linear(act(linear(y, f"v.blk.{i}.ffn_up")), f"v.blk.{i}.ffn_down")
    if "v.class_embd" in t:
        x = x[1:]
    return linear(tanh_gelu(linear(x, "mm.0")), "mm.2")


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_mmproj_run_as_llama_cpp_runs_it_computes_mmposts_image_tokens(exports, tower):
    model, root = exports[tower]
    _, fields, tensors = read(root / "f16" / "mmproj-f16.gguf")
    weights = {name: t.data.astype(np.float64) for name, t in tensors.items()}
    size = fields[VISION.IMAGE_SIZE]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.connectors["image"](model.encoders["image"](pixels).features)[0].double().numpy()  # [N, D]
    ours = llava_graph(fields, weights, pixels[0].double().numpy())
    assert ours.shape == theirs.shape
    # f16 weights, and ggml's tanh GELU where mmpost's mlp uses the erf one
    np.testing.assert_allclose(ours, theirs, atol=5e-3 * np.abs(theirs).max())
    state = model.encoders["image"].model.state_dict()
    q_proj = "encoder.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(tensors["v.blk.0.attn_q.weight"].data, state[q_proj].half().numpy())
    assert tensors["v.position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(
        tensors["v.position_embd.weight"].data, state["embeddings.position_embedding.weight"].numpy()
    )


@pytest.mark.parametrize(
    "connector, options",
    [
        ("qformer", {"num_queries": 4, "hidden_size": 32, "layers": 1, "heads": 4}),
        ("xattn", {"every": 1, "heads": 4, "num_latents": 4, "resampler_layers": 1, "resampler_heads": 4}),
    ],
)
def test_parts_llama_cpp_cannot_represent_are_refused_naming_them(make_model, connector, options):
    model = make_model(connector, **options)
    with pytest.raises(ExportError) as refused:
        check_gguf_parts(model)
    message = str(refused.value)
    assert f"cannot carry the image connector '{connector}'" in message
    # no transformers class holds these parts either: mmpost's own format is the one that carries them
    assert "Export it with --format mmpost" in message and "no transformers class of --format hf" in message


def test_a_clip_tower_keeping_its_cls_token_is_refused_and_the_llava_layout_named(llm_dir, clip_dir):
    encoder = mmpost.encoder("hf_vision", path=str(clip_dir), drop_cls=False)
    model = mmpost.LMM(llm=str(llm_dir), encoders={"image": encoder}, connectors={"image": mmpost.connector("mlp")})
    with pytest.raises(ExportError, match=r"the image tower: select strategy 'full' on a clip tower") as refused:
        check_gguf_parts(model)
    assert "--format hf (as LlavaForConditionalGeneration) or --format mmpost" in str(refused.value)


def test_a_qwen2_llm_is_written_with_its_biases_and_without_the_llama_permutation(qwen_dir, clip_dir, tmp_path):
    torch.manual_seed(0)
    encoder = mmpost.encoder("hf_vision", path=str(clip_dir))
    model = mmpost.LMM(llm=str(qwen_dir), encoders={"image": encoder}, connectors={"image": mmpost.connector("mlp")})
    with torch.no_grad():
        family_for(model.eval()).export(model, tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "gguf")
    _, fields, tensors = read(tmp_path / "gguf" / "model-f16.gguf")
    assert fields[gguf.Keys.General.ARCHITECTURE] == "qwen2"
    assert fields[LLM.BLOCK_COUNT.format(arch="qwen2")] == model.base_llm.config.num_hidden_layers
    kinds = {T.ATTN_Q, T.ATTN_K, T.ATTN_V}
    assert kinds <= set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN2])
    for kind, proj in zip((T.ATTN_Q, T.ATTN_K, T.ATTN_V), "qkv", strict=True):
        for part in ("weight", "bias"):
            stored = tensors[f"{gguf.TENSOR_NAMES[kind].format(bid=0)}.{part}"].data.astype(np.float32)
            source = model.base_llm.state_dict()[f"model.layers.0.self_attn.{proj}_proj.{part}"].numpy()
            expected = source.astype(np.float16).astype(np.float32) if part == "weight" else source
            np.testing.assert_array_equal(stored, expected)


def test_q4_k_m_without_llama_quantize_is_refused_before_anything_is_written(exports, tmp_path, monkeypatch):
    _, root = exports["clip"]
    monkeypatch.delenv(LLAMA_CPP_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(ExportError, match=rf"llama-quantize.*not on PATH.*{LLAMA_CPP_ENV}.*f16 or q8_0"):
        write_gguf(root / "hf", tmp_path / "out", "q4_k_m")
    with pytest.raises(ExportError, match=r"not in .*empty"):
        write_gguf(root / "hf", tmp_path / "out", "q4_k_m", llama_cpp=tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_q4_k_m_runs_llama_quantize_on_the_f16_file(exports, tmp_path, monkeypatch):
    _, root = exports["clip"]
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "llama-quantize"  # stands in for llama.cpp's: records its arguments, copies the file
    script.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\ncp "$1" "$2"\n')
    script.chmod(0o755)
    monkeypatch.setenv(LLAMA_CPP_ENV, str(folder))
    report = write_gguf(root / "hf", tmp_path / "out", "q4_k_m")
    source, target, kind = (folder / "args").read_text().split()
    assert (
        kind == "Q4_K_M"
        and Path(source).name == "model-f16.gguf"
        and target == str(tmp_path / "out" / "model-q4_k_m.gguf")
    )
    assert sorted(os.listdir(tmp_path / "out")) == ["mmproj-f16.gguf", "model-q4_k_m.gguf"]  # the f16 file is gone
    assert report["quantize"] == "q4_k_m" and report["bytes"]["model-q4_k_m.gguf"] > 0


def test_llama3_rope_factors_divide_the_frequencies_as_transformers_scales_them():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 500000.0 ** -(np.arange(0, 128, 2) / 128)
    factors = llama3_rope_factors(config.to_dict())
    np.testing.assert_allclose(factors, plain / scaled.double().numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0


def test_mmpost_export_format_gguf_writes_checks_and_reports(llm_dir, clip_dir, tmp_path, monkeypatch, capsys):
    """The command: the LLaVA layout is checked by transformers, the GGUF pair written and the report says that no
    engine ran them where llama.cpp's tools are absent; a model llama.cpp cannot carry is refused first."""
    from mmpost.cli import main

    monkeypatch.delenv(LLAMA_CPP_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    torch.manual_seed(0)
    encoder = mmpost.encoder("hf_vision", path=str(clip_dir), feature_layer=-1)
    mmpost.LMM(llm=str(llm_dir), encoders={"image": encoder}, connectors={"image": mmpost.connector("mlp")}).save(
        tmp_path / "model"
    )
    assert (
        main(
            ["export", str(tmp_path / "model"), "--format", "gguf", "--quantize", "q8_0", "--out", str(tmp_path / "g")]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        "export_report.json",
        "mmproj-f16.gguf",
        "model-q8_0.gguf",
    ]
    report = json.loads((tmp_path / "g" / "export_report.json").read_text())
    assert report["format"] == "gguf" and report["reload"]["greedy_agreement"] == "4/4"
    assert report["engine"]["engine"] is None and "llama-server not found" in report["engine"]["not_run"]
    assert "not run by llama.cpp" in capsys.readouterr().out
    assert (
        main(["export", str(tmp_path / "model"), "--format", "gguf", "--quantize", "q5", "--out", str(tmp_path / "x")])
        != 0
    )
    assert "f16, q8_0, q4_k_m" in capsys.readouterr().err and not (tmp_path / "x").exists()
