"""Every connector kind with the LMM: outputs against transformers, masking, generation, save / load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import greedy_without_cache, make_batch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2QFormerModel

import mmpost
from mmpost.config.schema import LoraConfig
from mmpost.connectors import CONNECTORS
from mmpost.data.sample import Sample
from mmpost.data.sources import read_records
from mmpost.losses.ce import cross_entropy_sum
from mmpost.registry import RegistryError

# Small sizes for the tiny CLIP (width 32) and LLM (width 64, 2 layers).
KINDS = {
    "linear": {},
    "mlp": {"depth": 2},
    "qformer": {"num_queries": 4, "hidden_size": 32, "layers": 2, "heads": 4, "cross_attention_frequency": 1},
    "resampler": {"num_latents": 4, "layers": 1, "heads": 4},
    "xattn": {"every": 1, "heads": 4, "num_latents": 4, "resampler_layers": 1, "resampler_heads": 4},
}


@pytest.fixture(scope="module")
def questions(synth_dir):
    return read_records(synth_dir / "heldout.jsonl", image_root=synth_dir / "images")[:4]


def open_gates(model, value: float = 0.7) -> None:
    """Fusion gates start at 0 (the bare LLM); open them so the media matter."""
    for block in model.connectors["image"].blocks.values():
        block.attn_gate.data.fill_(value)
        block.ff_gate.data.fill_(value)


def build(make_model, kind: str, seed: int = 0, **extra):
    model = make_model(kind, seed=seed, **{**KINDS[kind], **extra}).eval()
    if kind == "xattn":
        open_gates(model)
    return model


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_with_kv_cache_equals_full_forward_decoding(make_model, questions, kind):
    model = build(make_model, kind)
    model.base_llm.generation_config.eos_token_id = None  # run every step
    batch = make_batch(model, questions, kind="reference")
    cached = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens=5)
    assert torch.equal(cached, greedy_without_cache(model, batch, 5))


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_connector_saves_and_loads_with_equal_logits(make_model, questions, tmp_path, kind):
    model = build(make_model, kind)
    batch = make_batch(model, questions)
    before = model(batch.input_ids, batch.attention_mask, batch.media).dense()
    model.save(tmp_path / "m")
    loaded = mmpost.load(tmp_path / "m").eval()
    after = loaded(batch.input_ids, batch.attention_mask, batch.media).dense()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_xattn_with_closed_gates_is_exactly_the_bare_llm(make_model, questions, lora):
    model = make_model("xattn", **KINDS["xattn"]).eval()
    if lora:
        from mmpost.model.lora import add_lora

        model.llm = add_lora(model.llm, LoraConfig(r=4))
    batch = make_batch(model, questions)
    ids, mask = batch.input_ids, batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    bare = model.llm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    ours = model(ids, mask, batch.media).dense()
    assert (ours - bare).abs().max() <= 1e-6
    open_gates(model)
    assert (model(ids, mask, batch.media).dense() - bare).abs().max() > 1e-3  # the media do reach the LLM
    if lora:  # generation with adapters and open gates: the KV cache path equals full forwards
        model.base_llm.generation_config.eos_token_id = None
        prompts = make_batch(model, questions, kind="reference")
        cached = model.generate(prompts.input_ids, prompts.attention_mask, prompts.media, max_new_tokens=4)
        assert torch.equal(cached, greedy_without_cache(model, prompts, 4))


def two_image_sample(synth_dir, first: int, second: int) -> Sample:
    images = synth_dir / "images" / "heldout"
    return Sample(
        id=f"pair-{first}-{second}",
        messages=[
            {"role": "user", "content": "Look: <image>\nand now <image>\nSame colour?"},
            {"role": "assistant", "content": "No."},
        ],
        media={"image": [images / f"{first:06d}.png", images / f"{second:06d}.png"]},
    )


def test_xattn_text_attends_only_to_media_before_it(make_model, synth_dir):
    model = build(make_model, "xattn")
    a = make_batch(model, [two_image_sample(synth_dir, 0, 1)])
    b = make_batch(model, [two_image_sample(synth_dir, 0, 2)])  # only the second image differs
    ids = a.input_ids[0]
    marker = model.placeholder_ids["image"]
    first, second = (ids == marker).nonzero().flatten().tolist()
    la = model(a.input_ids, a.attention_mask, a.media).dense()[0]
    lb = model(b.input_ids, b.attention_mask, b.media).dense()[0]
    assert torch.equal(la[:second], lb[:second])  # nothing before the second marker sees the second image
    assert (la[second:] - lb[second:]).abs().max() > 1e-4
    bare = model.llm(input_ids=a.input_ids, attention_mask=a.attention_mask).logits[0]
    assert torch.equal(la[:first], bare[:first])  # text before any medium is the LLM's own
    assert (la[first:second] - bare[first:second]).abs().max() > 1e-4


def test_xattn_several_media_per_sample_batch_like_one_by_one(make_model, synth_dir, questions):
    model = build(make_model, "xattn")
    samples = [two_image_sample(synth_dir, 3, 4), questions[0], two_image_sample(synth_dir, 5, 6)]
    batch = make_batch(model, samples)
    together = model(batch.input_ids, batch.attention_mask, batch.media).dense()
    for row, sample in enumerate(samples):
        one = make_batch(model, [sample])
        alone = model(one.input_ids, one.attention_mask, one.media).dense()[0]
        torch.testing.assert_close(together[row, : alone.shape[0]], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qformer", "resampler", "xattn"])
def test_padded_features_do_not_change_a_medium(kind):
    connector = mmpost.connector(kind, **KINDS[kind])
    if kind == "xattn":
        connector.build(32, 64, num_layers=2)
        run = lambda f, m: connector.media(f, m)[0]  # noqa: E731
    else:
        connector.build(32, 64)
        run = connector
    connector.eval()
    features = torch.randn(1, 6, 32)
    padded = torch.cat([features, torch.randn(1, 3, 32) * 50], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    torch.testing.assert_close(run(padded, mask), run(features, None), rtol=1e-5, atol=1e-5)


def save_qformer(path: Path, encoder_width: int = 32, **fields) -> Blip2QFormerModel:
    """Saves a tiny random ``Blip2QFormerModel``; ``fields`` are further ``Blip2QFormerConfig`` fields."""
    torch.manual_seed(1)
    config = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        encoder_hidden_size=encoder_width,
        cross_attention_frequency=1,
        **fields,
    )
    model = Blip2QFormerModel(config).eval()
    model.save_pretrained(path)
    return model


def test_qformer_from_a_transformers_checkpoint_gives_transformers_query_outputs(tmp_path):
    reference = save_qformer(tmp_path / "qf", encoder_width=48)
    connector = mmpost.connector("qformer", num_queries=6, path=str(tmp_path / "qf"))
    connector.build(48, 64)
    connector.eval()
    features = torch.randn(3, 10, 48)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    queries = connector.query_tokens.expand(3, -1, -1)
    expected = reference(query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=mask.long())
    assert (connector.query_outputs(features, mask) - expected.last_hidden_state).abs().max() <= 1e-5
    assert connector.spec()["layers"] == 2 and connector.spec()["hidden_size"] == 32  # sizes from the checkpoint


def test_qformer_keeps_a_checkpoints_config_fields_through_mmpost_save_and_load(tmp_path, make_model, questions):
    # fields beyond the sizes: defaults would be eps 1e-12, gelu, 512 positions, 0.1 dropout
    fields = {
        "layer_norm_eps": 1e-3,
        "hidden_act": "relu",
        "max_position_embeddings": 64,
        "attention_probs_dropout_prob": 0.0,
        "hidden_dropout_prob": 0.05,
    }
    reference = save_qformer(tmp_path / "qf", **fields)
    features = torch.randn(2, 10, 32)

    def assert_transformers_outputs(connector) -> None:
        queries = connector.query_tokens.expand(2, -1, -1)
        expected = reference(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        torch.testing.assert_close(connector.query_outputs(features), expected, rtol=0, atol=1e-5)

    connector = mmpost.connector("qformer", num_queries=4, path=str(tmp_path / "qf"))
    connector.build(32, 64)
    assert_transformers_outputs(connector.eval())
    model = make_model("qformer", num_queries=4, path=str(tmp_path / "qf")).eval()
    assert_transformers_outputs(model.connectors["image"])
    batch = make_batch(model, questions)
    before = model(batch.input_ids, batch.attention_mask, batch.media).dense()
    model.save(tmp_path / "m")
    loaded = mmpost.load(tmp_path / "m").eval()
    assert_transformers_outputs(loaded.connectors["image"])
    after = loaded(batch.input_ids, batch.attention_mask, batch.media).dense()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    built = loaded.connectors["image"].qformer.config  # the training-time fields survive too
    assert {key: getattr(built, key) for key in fields} == fields


def test_qformer_loads_query_tokens_and_projection_of_a_blip2_model(tmp_path):
    config = Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "encoder_hidden_size": 32,
        },
        text_config={
            "model_type": "opt",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "vocab_size": 100,
            "word_embed_proj_dim": 64,
        },
        num_query_tokens=5,
    )
    torch.manual_seed(2)
    blip2 = Blip2ForConditionalGeneration(config).eval()
    blip2.save_pretrained(tmp_path / "blip2")
    connector = mmpost.connector("qformer", path=str(tmp_path / "blip2"))
    connector.build(32, 64)
    connector.eval()
    assert connector.num_tokens(100) == 5
    torch.testing.assert_close(connector.query_tokens.data, blip2.query_tokens.data)
    features = torch.randn(2, 9, 32)
    expected = blip2.qformer(query_embeds=blip2.query_tokens.expand(2, -1, -1), encoder_hidden_states=features)
    projected = blip2.language_projection(expected.last_hidden_state)
    assert (connector(features) - projected).abs().max() <= 1e-5


def test_connector_dims_that_do_not_fit_fail_at_build_with_both_dims(tmp_path, make_model):
    save_qformer(tmp_path / "qf", encoder_width=48)
    with pytest.raises(ValueError, match=r"48-wide.*32-wide"):  # the tiny CLIP gives 32
        make_model("qformer", path=str(tmp_path / "qf"))
    with pytest.raises(ValueError, match=r"5 attention heads do not divide the LLM hidden width 64"):
        make_model("xattn", heads=5)
    with pytest.raises(ValueError, match=r"3 attention heads do not divide the resampler .*32"):
        make_model("resampler", heads=3)
    with pytest.raises(RegistryError, match=r"unknown connector 'q_former'.*Registered: .*qformer, resampler, xattn"):
        CONNECTORS.build(name="q_former")


def test_xattn_gradients_are_the_same_with_gradient_checkpointing(make_model, synth_dir):
    samples = read_records(synth_dir / "sft.json", image_root=synth_dir / "images")[:4]
    grads = []
    for checkpointing in (False, True):
        model = build(make_model, "xattn").train()
        if checkpointing:  # the blocks run inside the checkpointed layer call and are recomputed
            model.base_llm.gradient_checkpointing_enable()
        batch = make_batch(model, samples)
        out = model(batch.input_ids, batch.attention_mask, batch.media, labels=batch.labels)
        cross_entropy_sum(out.logits, out.targets).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.connectors.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_a_deep_copy_of_an_xattn_model_runs_its_own_blocks(make_model, questions):
    import copy

    model = build(make_model, "xattn")
    batch = make_batch(model, questions)
    args = (batch.input_ids, batch.attention_mask, batch.media)
    before = model(*args).dense()
    twin = copy.deepcopy(model)  # e.g. a frozen reference model for preference training
    torch.testing.assert_close(twin(*args).dense(), before, rtol=0, atol=0)
    open_gates(twin, 0.0)  # closing the copy's gates must not touch the original
    assert torch.equal(model(*args).dense(), before)
    bare = model.llm(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0),
    ).logits
    assert (twin(*args).dense() - bare).abs().max() <= 1e-6
