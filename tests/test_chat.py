"""Tokenising conversations: assistant-only labels, placeholder expansion, truncation around media."""

from __future__ import annotations

import pytest

from mmpost.config.schema import LLMConfig
from mmpost.data.chat import ChatEncoder, Encoded, Skipped
from mmpost.data.sample import DataError, Sample
from mmpost.interfaces import IGNORE
from mmpost.model.llm import load_llm, prepare_tokenizer


@pytest.fixture(scope="module")
def tokenizer_and_ids(llm_dir):
    model, tokenizer = load_llm(LLMConfig(path=str(llm_dir)))
    ids = prepare_tokenizer(model, tokenizer, ["<image>"])
    return tokenizer, {"image": ids["<image>"]}


def conversation(text_user: str = "<image>\nWhat colour is the shape?") -> Sample:
    return Sample(
        id="s1",
        messages=[
            {"role": "user", "content": text_user},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "How many shapes are there?"},
            {"role": "assistant", "content": "2"},
        ],
    )


def test_labels_cover_assistant_replies_only(tokenizer_and_ids):
    tokenizer, ids = tokenizer_and_ids
    chat = ChatEncoder(tokenizer, ids, max_length=512)
    enc = chat.encode(conversation(), {"image": [5]})
    assert isinstance(enc, Encoded)
    labelled = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE]
    # each reply and the template's end-of-turn marker (so the model learns to stop), nothing else
    assert tokenizer.decode(labelled) == "Red.<|im_end|>\n2<|im_end|>\n"
    assert all(label in (IGNORE, t) for t, label in zip(enc.input_ids, enc.labels, strict=True))


def test_placeholder_expands_to_connector_token_count(tokenizer_and_ids):
    tokenizer, ids = tokenizer_and_ids
    chat = ChatEncoder(tokenizer, ids, max_length=512)
    enc = chat.encode(conversation(), {"image": [7]})
    positions = [i for i, t in enumerate(enc.input_ids) if t == ids["image"]]
    assert len(positions) == 7 and positions == list(range(positions[0], positions[0] + 7))
    assert all(enc.labels[i] == IGNORE for i in positions)
    with pytest.raises(DataError, match=r"sample 's1'.*1 image placeholder token\(s\) after tokenization but 2"):
        chat.encode(conversation(), {"image": [7, 7]})


def test_truncation_cuts_text_never_media(tokenizer_and_ids):
    tokenizer, ids = tokenizer_and_ids
    full = ChatEncoder(tokenizer, ids, max_length=512).encode(conversation(), {"image": [10]})
    first_media = full.input_ids.index(ids["image"])
    # room for the media and part of the first reply: text is cut from the end
    limit = len(full.input_ids) - 8
    cut = ChatEncoder(tokenizer, ids, max_length=limit).encode(conversation(), {"image": [10]})
    assert isinstance(cut, Encoded) and len(cut.input_ids) == limit
    assert cut.input_ids == full.input_ids[:limit] and cut.input_ids.count(ids["image"]) == 10
    # the media end past max_length: dropped, not cut
    short = ChatEncoder(tokenizer, ids, max_length=first_media + 5).encode(conversation(), {"image": [10]})
    assert isinstance(short, Skipped) and "media tokens end at" in short.reason
    # media fit but no reply is left to learn from
    no_reply = ChatEncoder(tokenizer, ids, max_length=first_media + 12).encode(conversation(), {"image": [10]})
    assert isinstance(no_reply, Skipped) and "no assistant tokens" in no_reply.reason


def test_prompt_ends_with_generation_prompt(tokenizer_and_ids):
    tokenizer, ids = tokenizer_and_ids
    chat = ChatEncoder(tokenizer, ids, max_length=512)
    enc = chat.encode_prompt(conversation(), {"image": [3]})
    text = tokenizer.decode(enc.input_ids)
    assert text.endswith("How many shapes are there?<|im_end|>\n<|im_start|>assistant\n")
    assert "2<|im_end|>" not in text  # the final answer is the reference, not part of the prompt


def test_missing_chat_template_is_a_clear_error(tokenizer_and_ids):
    tokenizer, ids = tokenizer_and_ids
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="model.llm.chat_template"):
            ChatEncoder(tokenizer, ids, max_length=64)
    finally:
        tokenizer.chat_template = template
