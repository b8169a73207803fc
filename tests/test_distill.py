"""The distill stage and ``mmpost distill-data`` on tiny models: a smaller student learns a short sft run's
distributions (with the teacher reading the student's batches, and with a connector that makes it read its own),
alpha=1 is sft's loss and a student equal to its teacher has no divergence, a full-vocabulary top-k table is the
live teacher, on-policy batches are built right, bad options and tokenizers are refused, and the teacher's answers
become sft data."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import write_run_config
from transformers import AutoTokenizer

import mmpost
from mmpost.cli import main
from mmpost.config import load_config
from mmpost.config.schema import DataSourceConfig
from mmpost.connectors.projection import MLPConnector
from mmpost.data.batches import ConversationBatch
from mmpost.data.loader import read_source
from mmpost.data.pipeline import ConversationPipeline
from mmpost.data.sample import DataError
from mmpost.distill_data import write_teacher_answers
from mmpost.generate import answer
from mmpost.interfaces import IGNORE
from mmpost.losses.ce import cross_entropy_sum
from mmpost.model.build import load_lmm
from mmpost.model.completions import completion_mask
from mmpost.stages.distill.on_policy import StudentAnswers, last_answer_prompts, prompt_then_completion
from mmpost.stages.distill.stage import Distill, DistillLoss, DistillOptions, precompute_top_k
from mmpost.stages.distill.teacher import (
    DistillBatch,
    Teacher,
    TeacherPipeline,
    TokenizerMismatch,
    check_tokenizers,
    reads_alike,
)
from mmpost.synthetic.tiny_llm import make_tiny_llm, make_tiny_tokenizer
from mmpost.training.accel import make_accelerator
from mmpost.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

RESAMPLER = {"name": "resampler", "num_latents": 4, "layers": 1, "heads": 4}
OPTIONS = {"divergence": "forward_kl", "beta": 0.5, "temperature": 1.0}


def train_lines(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


def mean(lines: list[dict], key: str) -> float:
    return sum(r[key] for r in lines) / len(lines)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def config(work, synth_dir, llm_dir, clip_dir):
    """Writes a tiny run config (sft on the synthetic conversations, no evaluation); kwargs override keys."""

    def write(name: str, **sections: Any) -> Path:
        data = {"train": {"path": str(synth_dir / "sft.json"), "image_root": str(synth_dir / "images")}, "eval": None}
        sections = {"stage": "sft", **sections, "data": {**data, **sections.get("data", {})}}
        return write_run_config(work, synth_dir, llm_dir, clip_dir, name, **sections)

    return write


@pytest.fixture(scope="module")
def teacher_run(config, work, one_thread) -> Path:
    """A short sft run: the teacher of every test here."""
    assert main(["train", str(config("teacher", train={"max_steps": 60}))]) == 0
    return work / "teacher"


@pytest.fixture(scope="module")
def small_llm(tmp_path_factory, llm_dir) -> Path:
    """A student LLM half the teacher's width with one layer, on the teacher's tokenizer."""
    out = tmp_path_factory.mktemp("small_llm")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    return make_tiny_llm(out, tokenizer, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def distill_config(config, teacher_run, small_llm):
    """A distill run of the small student from the teacher run."""

    def write(name: str, stage: dict | None = None, connector: dict | None = None, **sections: Any) -> Path:
        model = {"llm": {"path": str(small_llm)}, "connectors": {"image": connector or {"name": "mlp", "depth": 2}}}
        options = {"name": "distill", "teacher": str(teacher_run), **(stage or {})}
        return config(name, stage=options, model={**model, **sections.pop("model", {})}, **sections)

    return write


def student(small_llm: Path, clip_dir: Path, connector: dict | None = None, seed: int = 0) -> mmpost.LMM:
    spec = dict(connector or {"name": "mlp", "depth": 2})
    torch.manual_seed(seed)
    return mmpost.LMM(
        llm=str(small_llm),
        encoders={"image": mmpost.encoder("hf_vision", path=str(clip_dir))},
        connectors={"image": mmpost.connector(spec.pop("name"), **spec)},
    )


@pytest.fixture(scope="module")
def samples(synth_dir):
    return read_source(DataSourceConfig(path=str(synth_dir / "sft.json"), image_root=str(synth_dir / "images")), "t")


def make_batch(model: mmpost.LMM, items: list) -> DistillBatch:
    """A collated training batch of ``items`` for ``model`` through the real data pipeline, as the distill stage
    makes it for a teacher that reads the student's batches (``teacher`` None)."""
    pipeline = TeacherPipeline(ConversationPipeline.for_model(model, 128), None)
    return pipeline.collate([pipeline.process(s) for s in items])


def answer_tokens(batch: ConversationBatch) -> int:
    return int((batch.labels[:, 1:] != IGNORE).sum())


# ----------------------------------------------------------------------------- learning


LEARN = {"lr": 5e-3, "schedule": "constant", "max_steps": 40}


def test_a_smaller_student_learns_the_teachers_distributions(distill_config, work, synth_dir, caplog):
    caplog.set_level("INFO", logger="mmpost")
    held_out = {"path": str(synth_dir / "heldout.jsonl"), "image_root": str(synth_dir / "images")}
    cfg = distill_config(
        "learn", train=LEARN, data={"eval": held_out}, eval={"max_samples": 8, "batch_size": 8, "max_new_tokens": 3}
    )
    assert main(["train", str(cfg)]) == 0
    lines = train_lines(work / "learn")
    assert [r["step"] for r in lines] == list(range(1, 41))
    first, last = lines[:3], lines[-3:]
    assert mean(last, "distill/divergence") < 0.25 * mean(first, "distill/divergence")
    assert mean(last, "distill/agreement") > mean(first, "distill/agreement") + 0.3
    assert mean(last, "distill/ce") < 0.5 * mean(first, "distill/ce")  # the teacher knows the data's answers
    assert all(0.0 <= r["distill/agreement"] <= 1.0 for r in lines)
    assert lines[0]["loss"] == pytest.approx(lines[0]["distill/divergence"], rel=1e-6)  # alpha 0: pure divergence
    assert "reads the student's batches" in caplog.text
    assert mmpost.load(work / "learn" / "final").hidden_size == 32
    summary = json.loads((work / "learn" / "summary.json").read_text())
    assert summary["stage"] == "distill" and summary["steps"] == 40
    assert summary["eval_after"]["eval/loss"] < summary["eval_before"]["eval/loss"]  # held-out answers too


def test_a_student_with_other_media_tokens_learns_from_the_teachers_own_batches(distill_config, work, caplog):
    caplog.set_level("INFO", logger="mmpost")
    assert main(["train", str(distill_config("resampler", connector=RESAMPLER, train=LEARN))]) == 0
    lines = train_lines(work / "resampler")
    first, last = lines[:3], lines[-3:]
    assert mean(last, "distill/divergence") < 0.25 * mean(first, "distill/divergence")
    assert mean(last, "distill/agreement") > mean(first, "distill/agreement") + 0.3
    assert "not the student's batches" in caplog.text


def test_the_teacher_reads_its_own_batch_and_answers_for_every_student_token(teacher_run, small_llm, clip_dir, samples):
    model = student(small_llm, clip_dir, RESAMPLER)
    teacher = Teacher(load_lmm(teacher_run / "final"), model, torch.device("cpu"))
    assert not reads_alike(teacher.model, model) and not teacher.shares_batches
    pipeline = teacher.pipeline(model, 128)
    assert isinstance(pipeline, TeacherPipeline)
    batch = pipeline.collate([pipeline.process(s) for s in samples[:4]])
    theirs = batch.teacher
    # the teacher's sequences hold more media tokens, the answers are the same tokens
    assert theirs.input_ids.shape[1] > batch.input_ids.shape[1]
    assert answer_tokens(theirs) == answer_tokens(batch)
    assert torch.equal(theirs.labels[theirs.labels != IGNORE], batch.labels[batch.labels != IGNORE])
    logits = teacher.logits(batch, answer_tokens(batch))
    assert logits.shape == (answer_tokens(batch), len(model.tokenizer))
    # the same rows as the teacher computes on a batch made for it alone
    alone = make_batch(teacher.model, samples[:4])
    with torch.no_grad():
        own = teacher.model(alone.input_ids, alone.attention_mask, alone.media, alone.labels).logits
    torch.testing.assert_close(logits, own[:, : len(model.tokenizer)].float(), atol=1e-5, rtol=1e-5)
    # and reading the student's batch instead would not give one row per answer token
    with pytest.raises(ValueError, match="image"):
        teacher.logits(dataclasses.replace(batch, teacher=None), answer_tokens(batch))


# ----------------------------------------------------------------------------- tokenizers


def test_another_tokenizer_is_refused_naming_both_vocab_sizes(
    distill_config, tmp_path_factory, teacher_run, clip_dir, capsys
):
    out = tmp_path_factory.mktemp("other_llm")
    tokenizer = make_tiny_tokenizer(out, texts=["zebra giraffe elephant lion tiger monkey"] * 20, vocab_size=400)
    other = make_tiny_llm(out, tokenizer, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    cfg = distill_config("other_tokenizer", model={"llm": {"path": str(other)}})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    teacher_vocab = len(load_lmm(teacher_run / "final").tokenizer.get_vocab())
    student_vocab = len(student(other, clip_dir).tokenizer.get_vocab())  # with the LMM's media placeholders
    assert teacher_vocab != student_vocab
    assert f"has {teacher_vocab} tokens" in err and f"the student's {student_vocab}" in err
    assert "distill-data" in err


def test_check_tokenizers_compares_the_whole_vocabularies(llm_dir, tmp_path):
    def holder(tokenizer):
        return SimpleNamespace(tokenizer=tokenizer)

    teacher = AutoTokenizer.from_pretrained(llm_dir)
    check_tokenizers(holder(teacher), holder(AutoTokenizer.from_pretrained(llm_dir)))  # the same: no error
    grown = AutoTokenizer.from_pretrained(llm_dir)
    grown.add_tokens(["<extra>"])
    with pytest.raises(TokenizerMismatch, match=f"has {len(teacher)} tokens, the student's {len(grown)}"):
        check_tokenizers(holder(teacher), holder(grown))
    # as many tokens, but other ones
    other = make_tiny_tokenizer(tmp_path, texts=["zebra giraffe elephant lion tiger"] * 20, vocab_size=len(teacher))
    assert len(other) == len(teacher)
    with pytest.raises(TokenizerMismatch, match="the same size, but other tokens"):
        check_tokenizers(holder(teacher), holder(other))


def test_reads_alike_asks_for_the_same_encoder_and_media_token_counts(llm_dir, clip_dir):
    def lmm(connector: str = "mlp", feature_layer: int = -2, **options) -> mmpost.LMM:
        encoder = mmpost.encoder("hf_vision", path=str(clip_dir), feature_layer=feature_layer)
        return mmpost.LMM(str(llm_dir), {"image": encoder}, {"image": mmpost.connector(connector, **options)})

    class Pooled(MLPConnector):  # one token for one feature like mlp, but a quarter as many for more
        def num_tokens(self, num_features: int) -> int:
            return max(1, num_features // 4)

    teacher = lmm()
    assert reads_alike(teacher, lmm("linear"))  # another projector, as many tokens
    assert not reads_alike(teacher, lmm("resampler", num_latents=4, layers=1, heads=4))
    assert not reads_alike(teacher, lmm(feature_layer=-1))  # another encoder spec: the teacher prepares its own
    pooled = lmm()
    pooled.connectors["image"] = Pooled()
    assert not reads_alike(teacher, pooled)


# ----------------------------------------------------------------------------- the loss


def test_alpha_one_is_sft_and_a_student_equal_to_its_teacher_has_no_divergence(
    teacher_run, small_llm, clip_dir, samples
):
    model = student(small_llm, clip_dir).eval()
    teacher = Teacher(load_lmm(teacher_run / "final"), model, torch.device("cpu"))
    batch = make_batch(model, samples[:6])
    n = answer_tokens(batch)
    out = DistillLoss(teacher, None, OPTIONS, alpha=1.0)(model, batch)
    sft = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels)
    sft_sum = cross_entropy_sum(sft.logits, sft.targets)
    assert out.units == sft.targets.numel() == n
    # per answer token (the sums of ~70 float32 terms differ in their last bits)
    assert out.loss_sum.item() / n == pytest.approx(sft_sum.item() / n, abs=1e-5)
    assert out.stats["distill/ce"].item() / n == pytest.approx(sft_sum.item() / n, abs=1e-5)
    assert out.stats["distill/divergence"].item() > 0.1 * n  # a different model: far from the teacher

    # pure distillation from a copy of the student itself
    twin = Teacher(copy.deepcopy(model), model, torch.device("cpu"))
    out = DistillLoss(twin, None, OPTIONS, alpha=0.0)(model, batch)
    assert abs(out.stats["distill/divergence"].item()) < 1e-5 * n
    assert out.loss_sum.item() == pytest.approx(0.0, abs=1e-5 * n)
    assert out.stats["distill/agreement"].item() == n
    out.loss_sum.backward()  # the loss reaches the student's parameters
    assert any(p.grad is not None for p in model.parameters())


def test_a_top_k_table_refuses_two_samples_with_one_id(config, teacher_run, small_llm, clip_dir, samples):
    model = student(small_llm, clip_dir)
    teacher = Teacher(load_lmm(teacher_run / "final"), model, torch.device("cpu"))
    cfg = load_config(config("top_k_ids"))
    ctx = SimpleNamespace(cfg=cfg, accelerator=make_accelerator(cfg.train))
    twin = copy.copy(samples[2])
    twin.id = samples[1].id  # another image and answer under the same id: its scores would replace the first's
    with pytest.raises(DataError, match=samples[1].id):
        precompute_top_k(ctx, teacher, [samples[0], samples[1], twin], teacher.pipeline(model, cfg.data.max_length), 8)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_a_full_vocabulary_top_k_table_gives_the_live_teachers_loss(
    config, teacher_run, small_llm, clip_dir, samples, divergence
):
    model = student(small_llm, clip_dir).eval()
    teacher = Teacher(load_lmm(teacher_run / "final"), model, torch.device("cpu"))
    cfg = load_config(config("top_k_unit"))
    ctx = SimpleNamespace(cfg=cfg, accelerator=make_accelerator(cfg.train))
    vocab = len(model.tokenizer)
    table = precompute_top_k(ctx, teacher, samples[:16], teacher.pipeline(model, cfg.data.max_length), vocab)
    assert sorted(table) == sorted(s.id for s in samples[:16])
    options = {**OPTIONS, "divergence": divergence, "temperature": 2.0}
    batch = make_batch(model, [samples[i] for i in (5, 0, 11, 3)])  # another order and grouping than the table's
    live = DistillLoss(teacher, None, options, alpha=0.3)(model, batch)
    stored = DistillLoss(teacher, table, options, alpha=0.3)(model, batch)
    assert table[samples[5].id].indices.shape == (answer_tokens(make_batch(model, [samples[5]])), vocab)
    assert stored.loss_sum.item() == pytest.approx(live.loss_sum.item(), abs=1e-5)
    for key in live.stats:
        assert stored.stats[key].item() == pytest.approx(live.stats[key].item(), abs=1e-5), key


def test_a_run_from_a_top_k_table_learns(distill_config, work, caplog):
    caplog.set_level("INFO", logger="mmpost")
    cfg = distill_config("top_k", stage={"teacher_top_k": 8}, train=LEARN)
    assert main(["train", str(cfg)]) == 0
    lines = train_lines(work / "top_k")
    assert mean(lines[-3:], "distill/divergence") < 0.5 * mean(lines[:3], "distill/divergence")
    assert "teacher top-8 stored for 96 samples" in caplog.text


# ----------------------------------------------------------------------------- on-policy


def test_last_answer_prompts_cut_each_row_before_its_last_answer_and_pad_left():
    pad = 0
    input_ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23, 24, 25, 0, 0, 0, 0]])
    X = IGNORE
    labels = torch.tensor([[X, X, 13, 14, X, X, 17, 18, X], [X, X, X, 24, 25, X, X, X, X]])
    batch = ConversationBatch(
        ids=["a", "b"],
        input_ids=input_ids,
        attention_mask=(input_ids != pad).long(),
        media={},
        drawn=2,
        skipped=[],
        labels=labels,
    )
    ids, mask = last_answer_prompts(batch, pad)
    # row 0: two answers, the prompt is everything before the second; row 1: one answer
    assert ids.tolist() == [[11, 12, 13, 14, 15, 16], [0, 0, 0, 21, 22, 23]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]


def test_prompt_then_completion_labels_the_completion_through_its_first_eos():
    pad, eos = 0, 9
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 6]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completions = torch.tensor([[31, eos, 33, eos], [41, 42, 43, 44]])
    done = completion_mask(completions, {eos})
    out = prompt_then_completion(prompt_ids, prompt_mask, completions, done, pad)
    X = IGNORE
    assert out["input_ids"].tolist() == [[0, 5, 6, 31, eos, pad, pad], [7, 8, 6, 41, 42, 43, 44]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[X, X, X, 31, eos, X, X], [X, X, X, 41, 42, 43, 44]]


def test_on_policy_batches_hold_the_students_samples_for_both_models(teacher_run, small_llm, clip_dir, samples):
    model = student(small_llm, clip_dir, RESAMPLER)
    teacher = Teacher(load_lmm(teacher_run / "final"), model, torch.device("cpu"))
    pipeline = teacher.pipeline(model, 128)
    batch = pipeline.collate([pipeline.process(s) for s in samples[:6]])  # multi-turn and single-turn samples
    ctx = SimpleNamespace(cfg=SimpleNamespace(seed=0), accelerator=SimpleNamespace(process_index=0))
    assert StudentAnswers(ctx, model, teacher, 0.0, 4, 1.0)(batch) is batch
    torch.manual_seed(0)
    out = StudentAnswers(ctx, model, teacher, 1.0, 4, 1.0)(batch)
    assert model.training  # back in train mode after sampling
    pad = model.tokenizer.pad_token_id
    for mine, ours in ((out, batch), (out.teacher, batch.teacher)):
        prompt_ids, prompt_mask = last_answer_prompts(ours, pad)
        width = prompt_ids.shape[1]
        assert torch.equal(mine.input_ids[:, :width], prompt_ids)
        assert torch.equal(mine.attention_mask[:, :width], prompt_mask)
        assert (mine.labels[:, :width] == IGNORE).all()
        answers = mine.labels[:, width:]
        assert answers.shape[1] <= 4 and ((answers != IGNORE).sum(-1) >= 1).all()
        labelled = mine.labels != IGNORE
        assert torch.equal(mine.input_ids[labelled], mine.labels[labelled])
        assert torch.equal(mine.attention_mask.bool()[:, width:], answers != IGNORE)
    # both models score the same sampled answer tokens, one teacher row per student token
    theirs = out.teacher.labels
    assert torch.equal(out.labels[out.labels != IGNORE], theirs[theirs != IGNORE])
    n = answer_tokens(out)
    assert 6 <= n <= 6 * 4 and teacher.logits(out, n).shape[0] == n
    loss = DistillLoss(teacher, None, OPTIONS, alpha=0.0)(model, out)
    assert loss.units == n and loss.loss_sum.item() > 0

    # sampled at a very low temperature the answers are the student's greedy ones: it predicts each of them
    cold = StudentAnswers(ctx, model, teacher, 1.0, 4, 1e-4)(batch)
    model.eval()
    with torch.no_grad():
        logits = model(cold.input_ids, cold.attention_mask, cold.media, cold.labels).logits
    logits[:, list(model.placeholder_ids.values())] = float("-inf")  # never sampled
    labels = cold.labels[:, 1:]
    assert torch.equal(logits.argmax(-1), labels[labels != IGNORE])


@pytest.mark.parametrize("connector", [None, RESAMPLER], ids=["shared", "own_batches"])
def test_an_on_policy_run_trains_on_the_students_samples(distill_config, work, connector):
    name = f"on_policy_{'own' if connector else 'shared'}"
    stage = {"on_policy": 1.0, "max_new_tokens": 4, "divergence": "reverse_kl"}
    cfg = distill_config(name, stage=stage, connector=connector, train={"max_steps": 3})
    assert main(["train", str(cfg)]) == 0
    lines = train_lines(work / name)
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert r["distill/divergence"] > 0 and 0 <= r["distill/agreement"] <= 1
        assert 8 <= r["tokens"] <= 8 * 4  # the students' answers: 1 to 4 tokens each for 8 samples


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, key",
    [
        ({"divergence": "kl"}, "stage.divergence"),
        ({"alpha": 1.5}, "stage.alpha"),
        ({"alpha": -0.1}, "stage.alpha"),
        ({"beta": 2.0}, "stage.beta"),
        ({"on_policy": 1.2}, "stage.on_policy"),
        ({"temperature": 0.0}, "stage.temperature"),
        ({"teacher_top_k": 8, "on_policy": 0.5}, "stage.teacher_top_k"),
        ({"teacher": ""}, "stage.teacher"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Distill(DistillOptions(**{"teacher": "runs/teacher", **options}))


def test_a_bad_option_in_a_config_fails_before_any_model_loads(distill_config, monkeypatch, capsys):
    monkeypatch.setattr("mmpost.stages.distill.stage.build_model", lambda ctx: pytest.fail("a model was loaded"))
    assert main(["train", str(distill_config("bad_option", stage={"divergence": "kl"}))]) == 2
    assert "stage.divergence" in capsys.readouterr().err


# ----------------------------------------------------------------------------- distill-data


def test_distill_data_writes_the_teachers_greedy_answers_as_sft_data(teacher_run, synth_dir, work, config):
    source = DataSourceConfig(path=str(synth_dir / "sft.json"), image_root=str(synth_dir / "images"))
    out = work / "answers" / "teacher.jsonl"
    counts = write_teacher_answers(teacher_run / "final", source, out, max_new_tokens=4, max_samples=8)
    assert counts["written"] + counts["empty"] == 8 and counts["skipped"] == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == counts["written"] > 0
    originals = {s.id: s for s in read_source(source, "t")[:8]}
    teacher = load_lmm(teacher_run / "final")
    for record in records:
        original = originals[record["id"]]
        assert record["messages"][:-1] == original.messages[:-1]
        assert record["messages"][-1]["role"] == "assistant"
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in record["images"])
        assert [Path(p) for p in record["images"]] == original.media["image"]
    singles = [r for r in records if len(r["messages"]) == 2]
    assert singles
    for record in singles:  # the teacher's greedy answer to the prompt alone
        expected = answer(teacher, record["messages"][0]["content"], record["images"], max_new_tokens=4)
        assert record["messages"][-1]["content"] == expected

    cfg = config("from_answers", data={"train": {"path": str(out)}}, train={"max_steps": 2})
    assert main(["train", str(cfg)]) == 0
    assert [r["step"] for r in train_lines(work / "from_answers")] == [1, 2]


def test_the_distill_data_command(teacher_run, synth_dir, work, capsys):
    out = work / "cli" / "answers.jsonl"
    argv = [
        "distill-data",
        str(teacher_run),
        "--data",
        str(synth_dir / "sft.json"),
        "--image-root",
        str(synth_dir / "images"),
        "--out",
        str(out),
        "--max-new-tokens",
        "1",
        "--max-samples",
        "5",
    ]
    assert main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(records) <= 5
    assert f"wrote {len(records)} teacher answers to {out}" in capsys.readouterr().out
    teacher = load_lmm(teacher_run / "final")
    for record in (r for r in records if len(r["messages"]) == 2):  # one token each, as the teacher answers
        expected = answer(teacher, record["messages"][0]["content"], record["images"], max_new_tokens=1)
        assert record["messages"][-1]["content"] == expected
