"""The encoder of transformers' Whisper as an audio encoder, with Whisper's log-mel preprocessing.

This module owns loading the encoder half of a saved Whisper checkpoint, the log-mel features of
``WhisperFeatureExtractor`` (computed here with torchaudio), and running clips of any length through
an encoder that accepts only fixed windows.

Whisper's encoder takes exactly ``W = 2 * max_source_positions`` mel frames (30 s for the released
models). Where Whisper pads every clip with silence to one window and truncates longer ones, this
encoder keeps only a clip's real frames: the preprocessor returns ``[mels, F]`` with
``F = ceil(samples / 160)``, and ``forward`` cuts the clip into windows, pads the last one with
log-mel silence, and keeps from each window the ``ceil(f / 2)`` outputs of its ``f`` real frames (the
second convolution has stride 2). A 5 s clip thus gives 250 features rather than 1500, and a 70 s
clip is not cut at 30 s. Within a window the real frames still attend to the silence padding, as in
Whisper itself; windows of one clip do not attend to each other.

The log-mel normalisation (clamp to 8 below the peak, then ``(x + 4) / 4``) is taken over the whole
clip, so all windows of a clip share it. Padding frames get the value pure silence has under that
normalisation, so a clip shorter than a window reaches the encoder as Whisper's own features would,
except for the two frames whose STFT windows straddle the clip's end (Whisper pads the waveform
with zeros, so those frames still see some of the clip).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder, WhisperEncoderLayer

from mmpost.encoders.waveform import SAMPLE_RATE, waveform_16k
from mmpost.interfaces import Audio, Encoder, EncoderOutput, MediaBatch, MediaProcessor
from mmpost.weights import load_pretrained_dir, resolve_path

N_FFT = 400
HOP = 160

# WhisperConfig fields that shape (or regularise) the encoder; `config` takes these and `spec()` writes them
ENCODER_KEYS = (
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "num_mel_bins",
    "max_source_positions",
    "activation_function",
    "scale_embedding",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "encoder_layerdrop",
)
# where the encoder's tensors live in WhisperForConditionalGeneration, WhisperModel and a bare WhisperEncoder
_PREFIXES = ("model.encoder.", "encoder.", "")


class WhisperLogMel(MediaProcessor):
    """``Audio`` -> ``[num_mel_bins, F]`` Whisper log-mel features of the clip's ``F = ceil(samples / 160)`` frames.

    The spectrogram is computed on the 16 kHz waveform zero-padded to a whole number of encoder
    windows, as ``WhisperFeatureExtractor`` pads to one window, so the real frames (and the peak the
    normalisation uses) are the ones Whisper computes.

    Args:
        num_mel_bins: mel bands (80, or 128 for large-v3).
        window_frames: frames per encoder window, ``2 * max_source_positions``.
    """

    def __init__(self, num_mel_bins: int, window_frames: int) -> None:
        self.num_mel_bins = num_mel_bins
        self.window_frames = window_frames
        # torch.stft as Whisper calls it: periodic Hann, centred with reflect padding, power spectrum;
        # slaney mel scale and area normalisation up to 8 kHz, as transformers' mel_filter_bank
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE,
            n_fft=N_FFT,
            hop_length=HOP,
            f_min=0.0,
            f_max=SAMPLE_RATE / 2,
            n_mels=num_mel_bins,
            power=2.0,
            norm="slaney",
            mel_scale="slaney",
        )

    def __call__(self, raw: Audio) -> torch.Tensor:
        waveform = waveform_16k(raw, "whisper")
        frames = -(-waveform.numel() // HOP)
        window = self.window_frames * HOP
        padded = F.pad(waveform, (0, -(-waveform.numel() // window) * window - waveform.numel()))
        return self.log_mel(padded)[:, :frames]

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Whisper's normalised log-mel spectrogram of a 16 kHz ``[samples]`` waveform: ``[mels, samples // 160]``."""
        with torch.no_grad():
            power = self.mel(waveform)[:, :-1]  # [mels, samples // 160 + 1], minus the frame Whisper drops
        log_spec = power.clamp(min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0

    def collate(self, items: Sequence[torch.Tensor]) -> MediaBatch:
        lengths = torch.tensor([item.shape[1] for item in items], dtype=torch.long)
        values = torch.zeros(len(items), self.num_mel_bins, int(lengths.max()))  # [B, mels, F_max]
        for i, item in enumerate(items):
            values[i, :, : item.shape[1]] = item
        return {"values": values, "lengths": lengths}


class WhisperAudioEncoder(Encoder):
    """The encoder of a transformers Whisper model; one feature per two mel frames of a clip.

    Args:
        path: directory written by ``save_pretrained`` of a ``WhisperModel``,
            ``WhisperForConditionalGeneration`` or ``WhisperEncoder`` (``config.json`` and
            safetensors); may be a ``pkg:`` path. Only the encoder's tensors are read.
            Exactly one of ``path`` and ``config`` is given.
        config: ``WhisperConfig`` fields of the encoder (``ENCODER_KEYS``: ``d_model``,
            ``encoder_layers``, ``encoder_attention_heads``, ``encoder_ffn_dim``, ``num_mel_bins``,
            ``max_source_positions``, ...; unset ones take WhisperConfig's defaults, the size of
            whisper-tiny); builds a random encoder and reads no files.
        feature_layer: index into the encoder's ``hidden_states`` as transformers returns them: 0 is
            the convolutional embeddings plus positions, ``i`` the output of layer ``i``, and the last
            (-1, the default) the last layer after the encoder's final layer norm, which is
            ``last_hidden_state`` and what Whisper-based audio LLMs (Qwen-Audio) read.

    Attributes:
        window_frames: mel frames per encoder window, ``2 * max_source_positions``.

    Raises:
        FileNotFoundError: if ``path`` does not exist or holds no ``config.json`` or weights.
        ValueError: on both or neither of ``path`` / ``config``, an unknown ``config`` key, a
            checkpoint that is not Whisper or lacks encoder tensors (named), or an out-of-range
            ``feature_layer``.
    """

    modality = "audio"

    def __init__(self, path: str | None = None, config: dict | None = None, feature_layer: int = -1) -> None:
        super().__init__()
        if (path is None) == (config is None):
            raise ValueError("whisper: give exactly one of `path` (a saved checkpoint) or `config` (encoder sizes)")
        if path is not None:
            self.encoder = _load_encoder(path)
        else:
            self.encoder = WhisperEncoder(_config_from_dict(config))
        self.encoder.eval()  # dropout off unless a stage trains the encoder
        # Whisper's positions are fixed sinusoids (a parameter with requires_grad=False in transformers);
        # as a buffer under the same name they stay fixed when a stage trains the encoder.
        positions = self.encoder.embed_positions
        weight = positions.weight.detach()
        del positions.weight
        positions.register_buffer("weight", weight)

        num_layers = self.encoder.config.encoder_layers
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(
                f"whisper: feature_layer={feature_layer} is outside the {num_layers + 1} hidden states of this "
                f"{num_layers}-layer encoder (valid: {-(num_layers + 1)}..{num_layers})"
            )
        self.feature_layer = feature_layer
        self.window_frames = 2 * self.encoder.config.max_source_positions
        self.output_dim = self.encoder.config.d_model

    def preprocessor(self) -> MediaProcessor:
        return WhisperLogMel(self.encoder.config.num_mel_bins, self.window_frames)

    def forward(self, inputs: MediaBatch) -> EncoderOutput:
        values, lengths = inputs["values"], inputs["lengths"].to(inputs["values"].device)  # [B, mels, F], [B]
        batch, mels, _ = values.shape
        window = self.window_frames
        num_windows = (lengths.clamp(min=1) + window - 1) // window  # [B]
        slots = int(num_windows.max())
        values = values[..., : slots * window]
        values = F.pad(values, (0, slots * window - values.shape[-1]))  # [B, mels, S*W]

        # Pad each clip with what silence becomes under its own normalisation: log10 of the 1e-10 floor
        # is -10, clamped to peak - 8, then (x + 4) / 4. Its peak is the max of its normalised frames.
        real = torch.arange(slots * window, device=values.device)[None, :] < lengths[:, None]  # [B, S*W]
        peak = values.masked_fill(~real[:, None, :], float("-inf")).amax(dim=(1, 2))  # [B]
        silence = torch.clamp(peak - 2.0, min=-1.5)
        values = torch.where(real[:, None, :], values, silence[:, None, None])  # [B, mels, S*W]

        windows = values.view(batch, mels, slots, window).transpose(1, 2)  # [B, S, mels, W]
        exists = torch.arange(slots, device=values.device)[None, :] < num_windows[:, None]  # [B, S]
        hidden = self._encode(windows[exists])  # [K, W/2, D], K windows in clip order
        grid = hidden.new_zeros(batch, slots, window // 2, hidden.shape[-1])
        grid[exists] = hidden
        # Every window but a clip's last is full, so its real features are the first ceil(F / 2).
        num_features = (lengths + 1) // 2  # [B]
        longest = int(num_features.max())
        features = grid.view(batch, slots * window // 2, -1)[:, :longest]  # [B, N, D]
        mask = torch.arange(longest, device=values.device)[None, :] < num_features[:, None]  # [B, N]
        return EncoderOutput(features=features.masked_fill(~mask[..., None], 0.0), mask=mask)

    def _encode(self, windows: torch.Tensor) -> torch.Tensor:
        windows = windows.to(self.encoder.conv1.weight.dtype)  # [K, mels, W]
        if self.feature_layer == -1:
            return self.encoder(windows).last_hidden_state
        return self.encoder(windows, output_hidden_states=True).hidden_states[self.feature_layer]

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        # Windows hold an even number of frames, so the per-window ceil(f / 2) sum to ceil(F / 2).
        _, frames = input_shape
        return (int(frames) + 1) // 2

    def spec(self) -> dict[str, Any]:
        config = {key: getattr(self.encoder.config, key) for key in ENCODER_KEYS}
        return {"config": config, "feature_layer": self.feature_layer}

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        return (WhisperEncoderLayer,)


def _config_from_dict(config: dict) -> WhisperConfig:
    unknown = sorted(set(config) - set(ENCODER_KEYS))
    if unknown:
        raise ValueError(f"whisper: unknown config keys {unknown}; valid: {', '.join(ENCODER_KEYS)}")
    return WhisperConfig(**config)


def _load_encoder(path: str) -> WhisperEncoder:
    directory = resolve_path(path)  # FileNotFoundError naming `path` when it is missing
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"whisper: {path} has no config.json; expected a directory written by save_pretrained "
            "(WhisperModel, WhisperForConditionalGeneration or WhisperEncoder)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "whisper":
        raise ValueError(f"whisper: {path} holds a {model_type!r} model, not a Whisper checkpoint")
    config = WhisperConfig.from_pretrained(directory)
    state = load_pretrained_dir(directory)

    # Built on the meta device and filled by assignment: no time spent on a random init of a large encoder.
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    expected = set(encoder.state_dict())
    prefix = max(_PREFIXES, key=lambda p: len({k[len(p) :] for k in state if k.startswith(p)} & expected))
    tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in expected}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(
            f"whisper: {path} lacks {len(missing)} of the encoder's {len(expected)} tensors: "
            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
        )
    encoder.load_state_dict(tensors, assign=True)
    return encoder.float()  # float32 whatever the checkpoint holds: mixed precision is the trainer's business
