"""Decoding media files and bytes into what the encoders' processors take: RGB images and mono waveforms.

Any failure to decode means unusable bytes: the pipeline skips and counts the sample (``mmpost.data.pipeline``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from PIL import Image

from mmpost.interfaces import Audio

TokenCounter = Callable[[str, tuple[int, ...]], int]


def decode_image(ref: Path | bytes) -> Image.Image:
    """Opens an image file or bytes fully (PIL is lazy; decoding errors must surface here), as 8-bit RGB.

    Grey images of more than 8 bits (16-bit PNG or TIFF: PIL modes ``I;16*``, ``I``, ``F``) are scaled to 8 bits:
    PIL's own ``convert("RGB")`` clips every value above 255, which turns them white.
    """
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
        img.load()
        if img.mode.startswith("I") or img.mode == "F":
            return Image.fromarray(to_8_bit(np.asarray(img)), mode="L").convert("RGB")
        return img.convert("RGB")


def to_8_bit(values: np.ndarray) -> np.ndarray:
    """Grey levels of a high-bit-depth image as uint8: integers map 0..65535 onto 0..255 (32-bit integers beyond
    65535 map their own maximum onto 255); floats within [0, 1] are fractions, other floats their own range."""
    floating = np.issubdtype(values.dtype, np.floating)
    values = values.astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if floating:
        top = 1.0 if peak <= 1.0 and (not values.size or values.min() >= 0) else max(peak, 1e-12)
    else:
        top = max(65535.0, peak)
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def decode_audio(ref: Path | bytes) -> Audio:
    """Reads a wav / flac file or its bytes: float32, channels averaged to mono, at the file's own rate.

    soundfile (libsndfile) reads it, not ``torchaudio.load``, which needs torchcodec and FFmpeg. Any rate is
    accepted; the encoders' processors resample.

    Raises:
        soundfile.LibsndfileError: on bytes libsndfile cannot read.
        ValueError: on a clip with no samples.
    """
    data, rate = soundfile.read(io.BytesIO(ref) if isinstance(ref, bytes) else ref, dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError("the clip has no samples")
    return Audio(waveform=torch.from_numpy(data.mean(axis=1, dtype="float32")), rate=int(rate))  # [samples]


DECODERS: dict[str, Callable[[Path | bytes], Any]] = {"image": decode_image, "audio": decode_audio}
