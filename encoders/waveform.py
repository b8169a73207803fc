"""The waveform every audio encoder starts from: mono float32 at 16 kHz, resampled with torchaudio."""

from __future__ import annotations

import torch
import torchaudio

from mmpost.interfaces import Audio

SAMPLE_RATE = 16_000


def waveform_16k(raw: Audio, who: str) -> torch.Tensor:
    """``raw``'s waveform as ``[samples]`` float32 at 16 kHz, resampled when its rate differs.

    Raises:
        TypeError: if ``raw`` is not an ``Audio``.
        ValueError: if the waveform is not 1-D or is empty.
    """
    if not isinstance(raw, Audio):
        raise TypeError(f"{who}: expected an mmpost.interfaces.Audio, got {type(raw).__name__}")
    waveform = torch.as_tensor(raw.waveform, dtype=torch.float32)
    if waveform.ndim != 1:
        raise ValueError(f"{who}: expected a mono [samples] waveform, got shape {tuple(waveform.shape)}")
    if waveform.numel() == 0:
        raise ValueError(f"{who}: the audio clip is empty")
    if raw.rate != SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, int(raw.rate), SAMPLE_RATE)
    return waveform
