"""The LMM: loss against transformers' own, generation with the KV cache, save/load, swapping parts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch

import mmpost
from mmpost.config.schema import LoraConfig
from mmpost.data.sources import read_records
from mmpost.interfaces import IGNORE
from mmpost.losses.ce import cross_entropy_sum


@pytest.fixture(scope="module")
def samples(synth_dir):
    return read_records(synth_dir / "sft.json", image_root=synth_dir / "images")[:4]


@pytest.fixture(scope="module")
def questions(synth_dir):
    return read_records(synth_dir / "heldout.jsonl", image_root=synth_dir / "images")[:4]


def test_loss_equals_transformers_loss_on_full_logits(make_model, samples):
    model = make_model().eval()
    batch = make_batch(model, samples)
    out = model(batch.input_ids, batch.attention_mask, batch.media, labels=batch.labels)
    n_labels = int((batch.labels[:, 1:] != IGNORE).sum())
    assert out.targets.numel() == out.logits.shape[0] == n_labels  # logits were computed at label positions only
    loss_sum = cross_entropy_sum(out.logits, out.targets)
    embeds, _ = model.embed(batch.input_ids, batch.media)
    hf = model.base_llm(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels)
    torch.testing.assert_close(loss_sum / n_labels, hf.loss, rtol=1e-5, atol=1e-6)
    # and by hand from the full [B, T, V] logits
    logits = model(batch.input_ids, batch.attention_mask, batch.media).dense()
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(loss_sum, manual, rtol=1e-5, atol=1e-5)


def test_placeholder_mismatch_in_batch_is_an_error(make_model, samples):
    model = make_model().eval()
    batch = make_batch(model, samples[:1])
    with pytest.raises(ValueError, match="placeholder tokens in the batch"):
        model.embed(batch.input_ids, {"image": batch.media["image"].repeat(2, 1, 1, 1)})


def test_generate_with_kv_cache_equals_without_and_batching_is_exact(make_model, questions):
    torch.manual_seed(0)
    model = make_model().eval()
    batch = make_batch(model, questions, kind="reference")
    args = (batch.input_ids, batch.attention_mask, batch.media)
    cached = model.generate(*args, max_new_tokens=6)
    uncached = model.generate(*args, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)
    for i, sample in enumerate(questions):
        one = make_batch(model, [sample], kind="reference")
        single = model.generate(one.input_ids, one.attention_mask, one.media, max_new_tokens=6)
        n = single.shape[1]
        assert torch.equal(single[0], cached[i, :n])


def test_save_load_gives_equal_logits(make_model, samples, tmp_path):
    model = make_model().eval()
    batch = make_batch(model, samples)
    args = (batch.input_ids, batch.attention_mask, batch.media)
    model.save(tmp_path / "m")
    loaded = mmpost.load(tmp_path / "m").eval()
    assert torch.equal(model(*args).dense(), loaded(*args).dense())


def test_lora_save_load_and_merge(llm_dir, clip_dir, samples, tmp_path):
    torch.manual_seed(0)
    model = mmpost.LMM(
        llm=str(llm_dir),
        encoders={"image": mmpost.encoder("hf_vision", path=str(clip_dir))},
        connectors={"image": mmpost.connector("mlp")},
        lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():  # non-zero adapters, so merging matters
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    batch = make_batch(model, samples)
    args = (batch.input_ids, batch.attention_mask, batch.media)
    model.save(tmp_path / "adapter")
    model.save(tmp_path / "merged", merge_lora=True)
    with_adapter, merged = mmpost.load(tmp_path / "adapter").eval(), mmpost.load(tmp_path / "merged").eval()
    assert with_adapter.has_lora and not merged.has_lora
    assert torch.equal(model(*args).dense(), with_adapter(*args).dense())
    torch.testing.assert_close(model(*args).dense(), merged(*args).dense(), rtol=1e-4, atol=1e-5)


def test_set_connector_keeps_the_llm_and_rebuilds_token_counts(make_model):
    model = make_model("mlp")
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    model.set_connector("image", mmpost.connector("linear"))
    assert model.connectors["image"].in_dim == model.encoders["image"].output_dim
    assert model.connectors["image"].out_dim == model.hidden_size
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm_before.items())
    assert model.media_tokens("image", (3, 32, 32)) == 16  # 4 x 4 patches of 8, CLS dropped
    built = mmpost.connector("mlp")
    built.build(7, model.hidden_size)
    with pytest.raises(ValueError, match=r"built for 7 -> 64, but the encoder gives 32 and the LLM takes 64"):
        model.set_connector("image", built)
