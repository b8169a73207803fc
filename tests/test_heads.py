"""Scalar heads on the LMM: their values are the head applied to the decoder's last hidden state, they save and
load with the model, and train as a part of their own."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch

import mmpost
from mmpost.model.heads import add_head, last_token_scores
from mmpost.training.trainable import PartError, apply_trainable, part_params, valid_parts

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(n: int = 2) -> list:
    import io

    import numpy as np
    from PIL import Image

    from mmpost.data.sample import Sample

    def png(seed: int) -> bytes:
        buffer = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    return [
        Sample(
            id=str(i),
            messages=[{"role": "user", "content": "<image>\nHow many shapes?" + " Count." * i}],
            media={"image": [png(i)]},
            meta={"chosen": "2", "rejected": "three shapes"},
        )
        for i in range(n)
    ]


def test_head_values_are_the_head_on_the_last_hidden_state(make_model):
    model = make_model().eval()
    head = add_head(model, "reward")
    batch = make_batch(model, pairs(), "pair")
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, batch.media, media_repeat=2, head="reward")
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask, batch.media, media_repeat=2)
    assert out.logits is None  # a head without labels computes no logits
    assert out.values.shape == batch.input_ids.shape and out.values.dtype == torch.float32
    expected = hidden @ head.score.weight[0]
    torch.testing.assert_close(out.values, expected, atol=1e-5, rtol=1e-5)
    # left-padded pairs end in the same column: the last attended token is the last column
    torch.testing.assert_close(last_token_scores(out.values, batch.attention_mask), out.values[:, -1])


def test_last_token_scores_reads_right_padded_rows_too():
    values = torch.arange(12.0).view(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    assert last_token_scores(values, mask).tolist() == [2.0, 11.0]


def test_a_head_saves_and_loads_with_the_model(make_model, tmp_path):
    model = make_model()
    add_head(model, "value")
    with torch.no_grad():
        model.heads["value"].score.weight.normal_()
    model.save(tmp_path / "m")
    loaded = mmpost.load(tmp_path / "m")
    assert list(loaded.heads) == ["value"]
    torch.testing.assert_close(loaded.heads["value"].score.weight, model.heads["value"].score.weight)
    plain = make_model()
    plain.save(tmp_path / "plain")
    assert len(mmpost.load(tmp_path / "plain").heads) == 0


def test_heads_train_as_a_part(make_model):
    model = make_model()
    assert "heads" not in valid_parts(model)
    add_head(model, "reward")
    assert {"heads", "heads.reward"} <= set(valid_parts(model))
    table = apply_trainable(model, ["heads"])
    assert "heads.reward" in table
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["heads.reward.score.weight"]
    assert [n for n, _ in part_params(model, "heads.reward")] == ["heads.reward.score.weight"]
    with pytest.raises(PartError, match="heads.value"):
        list(part_params(model, "heads.value"))
    with pytest.raises(ValueError, match="unknown head 'critic'"):
        add_head(model, "critic")


def test_a_critic_trunk_trains_alone_and_saves_with_the_model(make_model, tmp_path):
    """A separate value model: a copy of the LLM's decoder reading the LMM's input embeddings; its values'
    gradients reach its own weights and none of the LMM's, and it saves and loads with the model."""
    model = make_model()
    critic = add_head(model, "value", trunk=True)
    batch = make_batch(model, pairs(), "pair")
    out = model(batch.input_ids, batch.attention_mask, batch.media, media_repeat=2, head="value")
    out.values.sum().backward()
    policy = [n for n, p in model.named_parameters() if not n.startswith("heads.") and p.grad is not None]
    own = [n for n, p in critic.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert policy == [] and any(n.startswith("decoder.layers.0.") for n in own) and "head.score.weight" in own
    decoder = model.base_llm.get_decoder()
    assert critic.decoder is not decoder
    torch.testing.assert_close(critic.decoder.layers[0].mlp.up_proj.weight, decoder.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        critic.decoder.layers[0].mlp.up_proj.weight.add_(0.5)  # the copy moves apart from the policy
        expected = model(batch.input_ids, batch.attention_mask, batch.media, media_repeat=2, head="value").values
    model.save(tmp_path / "m")
    loaded = mmpost.load(tmp_path / "m").eval()
    assert type(loaded.heads["value"]).__name__ == "CriticTrunk"
    with torch.no_grad():
        again = loaded(batch.input_ids, batch.attention_mask, batch.media, media_repeat=2, head="value").values
    torch.testing.assert_close(again, expected.detach(), atol=1e-5, rtol=1e-5)


def test_a_critic_trunk_is_refused_beside_a_fusion_connector(make_model):
    with pytest.raises(ValueError, match="value_model: shared"):
        add_head(
            make_model("xattn", every=1, heads=4, num_latents=4, resampler_layers=1, resampler_heads=4),
            "value",
            trunk=True,
        )
