"""Checking a GGUF export in the engine that serves it: llama.cpp's ``llama-mtmd-cli`` loads the LLM and mmproj
files, answers the probe images greedily, and its answers are compared with the source model's.

llama.cpp's tools are found in a build's bin folder named by the caller or ``$MMPOST_LLAMA_CPP``, else on
``PATH``. Without them the export is still written and read back, and its report says that no engine ran it.
Each answer is one ``llama-mtmd-cli`` run in single-turn mode: the prompt is the user turn with llama.cpp's
media marker where mmpost's data put the image (``<__media__>\\n`` before the question), rendered by the chat
template in the GGUF file; ``--temp 0`` samples greedily. The text after the marker line that
``MTMD_TEST_RESPONSE_MARKER`` makes it print is the answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpost.families.base import ExportError

LLAMA_CPP_ENV = "MMPOST_LLAMA_CPP"  # a llama.cpp build's bin folder
MTMD_CLI = "llama-mtmd-cli"
MEDIA_MARKER = "<__media__>"
_RESPONSE = "----- mmpost response -----"
# what each GGUF quantization must reproduce of the source's greedy answers on the probes (None: only reported)
REQUIRED = {"f16": 1.0, "q8_0": 0.75, "q4_k_m": None}


def find_tool(name: str, llama_cpp: str | Path | None = None) -> Path | None:
    """llama.cpp's tool ``name`` in ``llama_cpp``, else in ``$MMPOST_LLAMA_CPP``, else on ``PATH``; None if absent."""
    folder = llama_cpp if llama_cpp is not None else os.environ.get(LLAMA_CPP_ENV)
    if folder:
        binary = Path(folder) / name
        return binary if binary.is_file() and os.access(binary, os.X_OK) else None
    found = shutil.which(name)
    return Path(found) if found else None


class LlamaCpp:
    """``llama-mtmd-cli`` on one GGUF pair: ``answer`` an image and a question greedily."""

    def __init__(self, binary: Path, model: Path, mmproj: Path, max_tokens: int, context: int = 4096) -> None:
        self.binary, self.model, self.mmproj = binary, model, mmproj
        self.max_tokens, self.context = max_tokens, context

    def answer(self, image: Path, question: str) -> str:
        """The greedy answer to ``question`` about ``image``.

        Raises:
            ExportError: with the end of llama.cpp's output, when it fails.
        """
        command = [
            str(self.binary),
            *("-m", str(self.model), "--mmproj", str(self.mmproj), "--image", str(image)),
            *("-p", f"{MEDIA_MARKER}\n{question}", "-n", str(self.max_tokens), "--temp", "0"),
            *("-c", str(self.context), "--seed", "0", "-t", str(os.cpu_count() or 1), "--no-warmup"),
        ]
        env = os.environ | {"MTMD_TEST_RESPONSE_MARKER": _RESPONSE}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0 or _RESPONSE not in done.stdout:
            tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
            raise ExportError(
                f"llama.cpp could not answer with the export (exit {done.returncode}): " + " / ".join(tail)
            )
        return done.stdout.rsplit(_RESPONSE, 1)[1].strip()


def check_in_llama_cpp(
    model, out: Path, written: dict[str, Any], probe_list: Sequence[Any], expected: Sequence[Any], llama_cpp=None
) -> dict[str, Any]:
    """Runs the probes through llama.cpp on the files ``written`` (``write_gguf``'s answer) in ``out``.

    Returns:
        the report's ``engine`` entry: which engine ran, how many probe answers equal the source's, and each pair;
        or, without llama.cpp's tools, that none ran.

    Raises:
        ExportError: when fewer probe answers agree than the quantization must reproduce (``REQUIRED``).
    """
    binary = find_tool(MTMD_CLI, llama_cpp)
    if binary is None:
        return {
            "engine": None,
            "not_run": f"{MTMD_CLI} not found (name a llama.cpp build's bin folder in {LLAMA_CPP_ENV})",
        }
    from mmpost.export.check import PROBE_NEW_TOKENS, answers_text

    files = written["files"]
    engine = LlamaCpp(binary, out / files["model"], out / files["mmproj"], PROBE_NEW_TOKENS)
    theirs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, probe in enumerate(probe_list):
            image = Path(tmp) / f"probe-{i}.png"
            probe.image.save(image)
            theirs.append(engine.answer(image, probe.prompt))
    ours = answers_text(model, expected)
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    entry = {
        "engine": f"llama.cpp ({binary.name})",
        "greedy_agreement": f"{same}/{len(ours)}",
        "answers": [{"mmpost": a, "llama.cpp": b} for a, b in zip(ours, theirs, strict=True)],
    }
    required = REQUIRED[written["quantize"]]
    if required is not None and same < required * len(ours):
        raise ExportError(
            f"llama.cpp answers {len(ours) - same} of {len(ours)} probes otherwise than the source with the "
            f"{written['quantize']} export ({entry['answers']})"
        )
    return entry
