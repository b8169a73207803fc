"""Checking a GGUF export in the engine that serves it: llama.cpp's ``llama-server`` loads the LLM and mmproj files,
answers the probe images greedily, and its answer tokens are compared with the source model's.

llama.cpp's tools are found in a build's bin folder named by the caller or ``$MMPOST_LLAMA_CPP``, else on
``PATH``. Without them the export is still written and read back, and its report says that no engine ran it.
The server runs on a free local port for the duration of the check. Each probe is the user turn with llama.cpp's
media marker (``/props``) where mmpost's data put the image (before the question, then a newline), rendered by the chat
template in the GGUF file (``/apply-template``), and completed with ``temperature 0`` (``/completion``, the image
as its multimodal data, the generated token ids returned): the ids are compared, not the text, so that two
answers that print alike (or that both print nothing) still have to be the same tokens.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpost.families.base import ExportError

LLAMA_CPP_ENV = "MMPOST_LLAMA_CPP"  # a llama.cpp build's bin folder
SERVER = "llama-server"
MEDIA_MARKER = "<__media__>"
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


class LlamaServer:
    """``llama-server`` on one GGUF pair, as a context manager: ``answer`` an image and a question greedily."""

    def __init__(self, binary: Path, model: Path, mmproj: Path, context: int = 0) -> None:  # 0: the model's own
        self.binary, self.model, self.mmproj, self.context = binary, model, mmproj, context
        self.process: subprocess.Popen | None = None
        self.url, self.marker = "", MEDIA_MARKER

    def __enter__(self) -> LlamaServer:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            str(self.binary),
            *("-m", str(self.model), "--mmproj", str(self.mmproj), "--host", "127.0.0.1", "--port", str(port)),
            *("-c", str(self.context), "-t", str(os.cpu_count() or 1), "--no-warmup", "-np", "1"),
        ]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ExportError(f"llama.cpp could not load the export: {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                    ready = reply.status == 200
            except OSError:
                ready = False
            if ready:  # the server picks its own media marker (LLAMA_MEDIA_MARKER pins one)
                with urllib.request.urlopen(self.url + "/props", timeout=30) as reply:
                    self.marker = json.loads(reply.read()).get("media_marker", MEDIA_MARKER)
                return self
            time.sleep(0.2)
        self.__exit__()
        raise ExportError(f"llama.cpp's server did not become ready: {self.tail()}")

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.log.close()

    def tail(self) -> str:
        self.log.seek(0)
        return " / ".join(self.log.read().decode(errors="replace").strip().splitlines()[-6:])

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as reply:
                return json.loads(reply.read())
        except OSError as e:
            raise ExportError(f"llama.cpp's server failed on {path}: {e}; {self.tail()}") from e

    def answer(self, png: bytes, question: str, max_tokens: int) -> list[int]:
        """The greedy answer's token ids (an end-of-generation token included) to ``question`` about the image."""
        turn = {"role": "user", "content": f"{self.marker}\n{question}"}
        prompt = self.post("/apply-template", {"messages": [turn]})["prompt"]
        data = {"prompt_string": prompt, "multimodal_data": [base64.b64encode(png).decode()]}
        body = {"prompt": data, "n_predict": max_tokens, "temperature": 0.0, "return_tokens": True}
        return self.post("/completion", body | {"cache_prompt": False, "seed": 0})["tokens"]


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
    binary = find_tool(SERVER, llama_cpp)
    if binary is None:
        return {
            "engine": None,
            "not_run": f"{SERVER} not found (name a llama.cpp build's bin folder in {LLAMA_CPP_ENV})",
        }
    from mmpost.export.check import PROBE_NEW_TOKENS

    files = written["files"]
    eos = model.tokenizer.eos_token_id

    def until_eos(ids: list[int]) -> list[int]:  # both sides' answers end before the end-of-sequence token
        return ids[: ids.index(eos)] if eos in ids else ids

    ours = [until_eos(tokens[0].tolist()) for _, tokens in expected]
    theirs = []
    with LlamaServer(binary, out / files["model"], out / files["mmproj"]) as server:
        for probe in probe_list:
            png = io.BytesIO()
            probe.image.save(png, format="PNG")
            theirs.append(until_eos(server.answer(png.getvalue(), probe.prompt, PROBE_NEW_TOKENS)))
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    decode = model.tokenizer.decode
    entry = {
        "engine": f"llama.cpp ({binary.name})",
        "greedy_agreement": f"{same}/{len(ours)}",
        "answers": [{"mmpost": decode(a), "llama.cpp": decode(b)} for a, b in zip(ours, theirs, strict=True)],
    }
    required = REQUIRED[written["quantize"]]
    if required is not None and same < required * len(ours):
        raise ExportError(
            f"llama.cpp answers {len(ours) - same} of {len(ours)} probes otherwise than the source with the "
            f"{written['quantize']} export ({entry['answers']})"
        )
    return entry
