"""Builds llama.cpp's ``llama-server`` and ``llama-quantize`` from source, for checking GGUF exports.

    python tools/build_llama_cpp.py [--source DIR] [--out DIR] [--jobs N]

The source is a llama.cpp checkout (``--source``), or else the one that the ``llama-cpp-python`` source
distribution carries (``vendor/llama.cpp``), fetched from the package index with pip. The CPU build takes some
minutes on 2 cores. It prints the bin folder; name it in ``MMPOST_LLAMA_CPP`` (or ``mmpost export --llama-cpp``)
so that ``--format gguf`` exports are answered by llama.cpp and ``q4_k_m`` can be made. A folder that already holds
both tools is reused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

TOOLS = ("llama-server", "llama-quantize")
DEFAULT_OUT = Path.home() / ".cache" / "mmpost" / "llama.cpp"


def fetch_source(into: Path) -> Path:
    """llama.cpp's source from the ``llama-cpp-python`` source distribution, unpacked under ``into``."""
    existing = sorted(into.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if existing:
        return existing[-1]
    into.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*pip, "-d", str(into)], check=True)
    archive = sorted(into.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return sorted(into.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def build(source: Path | None = None, out: Path = DEFAULT_OUT, jobs: int | None = None) -> Path:
    """Builds the tools (CPU only, no network features) and returns their bin folder."""
    bin_dir = out / "build" / "bin"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    source = source or fetch_source(out / "src")
    configure = [
        *("cmake", "-S", str(source), "-B", str(out / "build"), "-DCMAKE_BUILD_TYPE=Release"),
        *("-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"),
        *("-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"),
    ]
    subprocess.run(configure, check=True)
    jobs = jobs or os.cpu_count() or 1
    subprocess.run(["cmake", "--build", str(out / "build"), "-j", str(jobs), "--target", *TOOLS], check=True)
    return bin_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, help="a llama.cpp checkout (default: the one llama-cpp-python ships)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"build folder (default {DEFAULT_OUT})")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    args = p.parse_args()
    print(build(args.source, args.out, args.jobs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
