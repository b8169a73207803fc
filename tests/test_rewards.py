"""Rewards: answer extraction, comparison rules, the weighted sum, custom rewards by path, and every error."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from mmpost.rewards import REWARDS, RewardError, RewardSet, RewardSpec, accuracy, answer_span, format_reward


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """A module ``my_rewards`` on sys.path with good and bad rewards, plus one that fails to import."""
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(completion, max_chars=10, **fields):\n"
        "    return len(completion) <= max_chars\n"
        "def by_task(completion, task, **fields):\n"
        "    return 0.5 if task == 'count' else 0.0\n"
        "def boom(completion, **fields):\n"
        "    raise ZeroDivisionError('tried to divide')\n"
        "def says_yes(completion, **fields):\n"
        "    return 'yes'\n"
        "def says_none(completion, **fields):\n"
        "    return None\n"
        "def says_nan(completion, **fields):\n"
        "    return float('nan')\n"
        "NOT_A_FUNCTION = 3\n"
    )
    (tmp_path / "broken_rewards.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def samples(n: int = 1, **fields):
    return [{"id": f"s{i}", "prompt": "How many?", "answer": "3", "task": "count", **fields} for i in range(n)]


def test_answer_span():
    assert answer_span("<think>x</think><answer> 4 </answer>") == "4"
    assert answer_span("<answer>1</answer> no, wait <answer>\n2\n</answer>") == "2"
    assert answer_span("<answer>a<answer>b</answer>") == "b"
    assert answer_span("the answer is 3") is None
    assert answer_span("<answer>3") is None


@pytest.mark.parametrize("predicted", ["3", "3.0", " 3.", "03", "<answer>3</answer>", "(3)", "3.000000001"])
def test_accuracy_numbers_match(predicted):
    assert accuracy(predicted, answer="3") == 1.0


@pytest.mark.parametrize("predicted", ["4", "3.1", "-3", "3 apples", "three", "30"])
def test_accuracy_numbers_differ(predicted):
    assert accuracy(predicted, answer="3") == 0.0


def test_accuracy_numeric_reference_from_data():
    assert accuracy("<answer>2.50</answer>", answer=2.5) == 1.0
    assert accuracy("<answer>7</answer>", answer=7) == 1.0


def test_accuracy_text():
    assert accuracy("Red.", answer="red") == 1.0
    assert accuracy("<answer>  RED! </answer>", answer="Red") == 1.0
    assert accuracy("<answer>new  york?</answer>", answer="New York") == 1.0
    assert accuracy("blue", answer="red") == 0.0
    assert accuracy("<answer>red</answer>", answer="reddish") == 0.0


def test_accuracy_last_span_is_the_answer():
    assert accuracy("<answer>4</answer> hmm <answer>3</answer>", answer="3") == 1.0
    assert accuracy("<answer>3</answer> hmm <answer>4</answer>", answer="3") == 0.0


def test_accuracy_strict():
    assert accuracy("3", answer="3") == 1.0
    assert accuracy("3", answer="3", strict=True) == 0.0
    assert accuracy("<think>so</think><answer>3</answer>", answer="3", strict=True) == 1.0


def test_accuracy_ignores_other_fields():
    assert accuracy("3", answer="3", id="x", prompt="p", task="count") == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<think>a</think><answer>b</answer>",
        "  <think>\nline 1\nline 2\n</think>\n\n<answer>\n3\n</answer>\n",
        "<think></think> <answer>3</answer>",
    ],
)
def test_format_reward_accepts(completion):
    assert format_reward(completion, id="x", answer="3") == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>3</answer>",
        "<think>a</think>",
        "<answer>3</answer><think>a</think>",
        "<think>a</think><answer>3</answer> trailing text",
        "preamble <think>a</think><answer>3</answer>",
        "<think>a</think><answer>3</answer><answer>4</answer>",
        "<think>a<think>b</think><answer>3</answer>",
        "<think>a</think><answer>3",
        "",
    ],
)
def test_format_reward_rejects(completion):
    assert format_reward(completion) == 0.0


def test_builtins_are_registered():
    assert REWARDS["accuracy"] is accuracy
    assert REWARDS["format"] is format_reward


def test_weighted_sum_by_hand():
    rewards = RewardSet([RewardSpec("accuracy", weight=1.0), {"name": "format", "weight": 0.2}])
    completions = [
        "<think>count</think><answer>3</answer>",  # right, well formed: 1.0 + 0.2
        "<think>count</think><answer>4</answer>",  # wrong, well formed: 0.0 + 0.2
        "3",  # right (non-strict), no format: 1.0 + 0.0
    ]
    total, per = rewards(completions, samples(3))
    assert rewards.names == ["accuracy", "format"]
    torch.testing.assert_close(per["accuracy"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(per["format"], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(total, torch.tensor([1.2, 0.2, 1.0]))
    assert total.dtype == torch.float32 and total.shape == (3,)


def test_kwargs_reach_the_function():
    rewards = RewardSet([{"name": "accuracy", "kwargs": {"strict": True}}])
    total, _ = rewards(["3", "<answer>3</answer>"], samples(2))
    torch.testing.assert_close(total, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("sep", [".", ":"])
def test_custom_reward_by_dotted_path(custom_module, sep):
    rewards = RewardSet(
        [
            {"name": f"{custom_module}{sep}brevity", "weight": 0.5, "kwargs": {"max_chars": 3}},
            {"name": f"{custom_module}.by_task", "weight": 2.0},
        ]
    )
    other_task = {"id": "s9", "answer": "3", "task": "caption"}
    total, per = rewards(["abc", "abcdef", "ab"], [*samples(2), other_task])
    torch.testing.assert_close(per[f"{custom_module}{sep}brevity"], torch.tensor([1.0, 0.0, 1.0]))  # bool -> 0/1
    torch.testing.assert_close(per[f"{custom_module}.by_task"], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(total, torch.tensor([1.5, 1.0, 0.5]))


def test_unknown_name_lists_builtins():
    with pytest.raises(RewardError) as e:
        RewardSet([{"name": "acuracy"}])
    msg = str(e.value)
    assert "acuracy" in msg and "accuracy, format" in msg and "dotted path" in msg and "'accuracy'?" in msg
    with pytest.raises(RewardError, match=r"'model'\?.*accuracy, format, model"):
        RewardSet([{"name": "modle"}])


def test_text_rewards_need_no_rows_and_no_binding():
    rewards = RewardSet([{"name": "format"}])
    assert not rewards.needs_rows
    rewards.bind(policy=None, device="cpu")  # nothing to load
    total, _ = rewards(["<think>a</think><answer>b</answer>"], samples(1), rows=None)
    torch.testing.assert_close(total, torch.tensor([1.0]))


def test_module_that_does_not_import(custom_module):
    with pytest.raises(RewardError, match=r"broken_rewards\.score") as e:
        RewardSet([{"name": "broken_rewards.score"}])
    assert "a_package_that_is_not_installed" in str(e.value)
    assert isinstance(e.value.__cause__, ImportError)
    with pytest.raises(RewardError, match=r"no_such_module\.score.*No module named 'no_such_module'"):
        RewardSet([{"name": "no_such_module.score"}])


def test_missing_or_uncallable_attribute(custom_module):
    with pytest.raises(RewardError, match=r"my_rewards\.nope.*no attribute 'nope'"):
        RewardSet([{"name": "my_rewards.nope"}])
    with pytest.raises(RewardError, match=r"NOT_A_FUNCTION.*not a function"):
        RewardSet([{"name": "my_rewards:NOT_A_FUNCTION"}])


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ([], "no rewards"),
        ([{"name": "accuracy", "wieght": 1.0}], "wieght"),
        ([{"weight": 1.0}], "no `name`"),
        ([{"name": "accuracy", "weight": "high"}], "weight"),
        ([{"name": "accuracy"}, {"name": "accuracy", "weight": 2.0}], "twice"),
        ([{"name": "accuracy", "kwargs": ["strict"]}], "kwargs must be a mapping"),
        ([{"name": "accuracy", "pth": "runs/rm"}], r"\['pth'\]; valid: name, weight, kwargs, path"),
        ([{"name": "model"}], r"'model' needs a `path`"),
        ([RewardSpec("model", kwargs={"batch_size": 4})], r"'model' needs a `path`"),
        ([{"name": "format", "path": "runs/rm"}], r"'format': `path` names a reward model"),
        ([{"name": "model", "path": 3}], "path must be a string"),
        ([{"name": "model", "path": "no/such/run"}], r"'model' path: no/such/run is not a run directory"),
    ],
)
def test_bad_config(specs, match):
    with pytest.raises(RewardError, match=match):
        RewardSet(specs)


def test_function_that_raises(custom_module):
    rewards = RewardSet([{"name": "my_rewards.boom"}])
    with pytest.raises(RewardError, match=r"my_rewards\.boom.*'s0'.*ZeroDivisionError: tried to divide") as e:
        rewards(["x"], samples(1))
    assert isinstance(e.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(("fn", "shown"), [("says_yes", "'yes'"), ("says_none", "None"), ("says_nan", "nan")])
def test_function_returning_a_non_number(custom_module, fn, shown):
    rewards = RewardSet([{"name": f"my_rewards.{fn}"}])
    with pytest.raises(RewardError) as e:
        rewards(["x", "y"], samples(2))
    msg = str(e.value)
    assert f"my_rewards.{fn}" in msg and "'s0'" in msg and f"returned {shown}" in msg


def test_missing_answer():
    with pytest.raises(RewardError, match="`answer` field"):
        accuracy("<answer>3</answer>", id="x", prompt="p")
    rewards = RewardSet([{"name": "accuracy"}])
    with pytest.raises(RewardError, match=r"'accuracy'.*'q7'.*`answer` field"):
        rewards(["3"], [{"id": "q7", "prompt": "p"}])


def test_kwargs_clashing_with_sample_fields():
    rewards = RewardSet([{"name": "accuracy", "kwargs": {"answer": "3"}}])
    with pytest.raises(RewardError, match=r"\['answer'\].*'s0'"):
        rewards(["3"], samples(1))


def test_length_mismatch():
    with pytest.raises(RewardError, match="2 completions but 1 samples"):
        RewardSet([{"name": "format"}])(["a", "b"], samples(1))


def test_isclose_tolerance():
    assert math.isclose(accuracy("1000000.5", answer="1000000"), 1.0)
    assert accuracy("1000002", answer="1000000") == 0.0
