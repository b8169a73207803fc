"""When a generated answer counts as the reference answer: one rule for held-out accuracy and for GRPO's
accuracy reward, so that the two report the same thing.

The answer is a completion's last ``<answer>...</answer>`` span, or the whole completion when it has none. If
both sides are numbers (digits with an optional sign and decimal point, surrounding punctuation ignored:
``" 3."``, ``"(3)"``, ``"03"`` and ``"3.0"`` all equal ``3``) they are compared with a relative tolerance of
1e-6; otherwise as text, case-insensitively, with runs of whitespace collapsed and trailing ``.!?;:`` dropped
(``"Red."`` equals ``"red"``). No symbolic equivalence: ``1/2`` and ``0.5`` differ.
"""

from __future__ import annotations

import math
import re
import string

# An <answer> span holding no other <answer> tag, so "<answer>a<answer>b</answer>" yields "b".
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# Punctuation that may surround a number ("(3)", "$5", "3!"); signs and the decimal point belong to it.
_AROUND_NUMBER = "".join(c for c in string.punctuation if c not in "+-.") + string.whitespace


def answer_span(completion: str) -> str | None:
    """The stripped text of the last ``<answer>...</answer>`` span in ``completion``, or None if there is none."""
    spans = _ANSWER.findall(completion)
    return spans[-1].strip() if spans else None


def as_number(text: str) -> float | None:
    text = text.strip(_AROUND_NUMBER)
    if len(text) > 1 and text.endswith("."):  # "3." ends a sentence
        text = text[:-1]
    return float(text) if _NUMBER.fullmatch(text) else None


def normalize_text(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".!?;: ").strip()


def same_answer(predicted: str, reference: str) -> bool:
    """True when ``predicted`` (an answer already taken out of its completion) equals ``reference``."""
    pred_num, ref_num = as_number(predicted), as_number(reference)
    if pred_num is not None and ref_num is not None:
        return math.isclose(pred_num, ref_num, rel_tol=1e-6)
    return normalize_text(predicted) == normalize_text(reference)


def completion_answers(completion: str, reference: str) -> bool:
    """True when the answer of ``completion`` (its last ``<answer>`` span, or all of it) equals ``reference``."""
    span = answer_span(completion)
    return same_answer(completion if span is None else span, reference)
