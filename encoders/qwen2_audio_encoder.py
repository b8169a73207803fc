"""The audio tower of Qwen2-Audio (transformers' ``Qwen2AudioEncoder``: Whisper's encoder on fixed 30 s
windows), as an encoder whose features are the tower's last layer before its average pooling.

The tower is transformers' own module, run by its own ``forward``; its pooling and final layer norm are
swapped for identities and move, with the projector, to the ``audio_pooler`` connector. The tower thus
computes exactly what ``Qwen2AudioModel`` computes up to its pooling, with the same attention mask: a clip of
``L`` real mel frames has ``(L - 1) // 2 + 1`` real positions after the stride-2 convolution, and no real
position attends to the padded ones.

Unlike mmpost's ``whisper`` encoder, which keeps only a clip's real frames, this one takes what the
checkpoint's processor takes: the ``WhisperFeatureExtractor``'s log-mel window of 3000 frames, the clip
zero-padded (or cut: a clip longer than 30 s loses everything after 30 s, as in transformers) to 30 s
before the spectrogram and its normalisation. The padding frames matter: the convolutions of the last real
positions read the two frames after the clip, whose STFT windows still reach into it. So one processed clip
is ``[mels, L + 3]``: its ``L`` real frames, those two frames, and one frame of the silence every later frame
of the window holds; ``collate`` rebuilds the extractor's ``[mels, 3000]`` window from it exactly, with the
``feature_attention_mask`` transformers' processor gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2AudioEncoderConfig, WhisperFeatureExtractor
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder, Qwen2AudioEncoderLayer

from mmpost.encoders.waveform import SAMPLE_RATE, waveform_16k
from mmpost.interfaces import Audio, Encoder, EncoderOutput, MediaBatch, MediaProcessor

# frames after a clip's last real one whose STFT windows (400 samples, hop 160) still overlap the clip
TAIL = 2


class QwenAudioFeatures(MediaProcessor):
    """``Audio`` -> ``[mels, L + 3]``: the extractor's frames up to ``L + TAIL`` and one silence frame.

    Args:
        feature_extractor: the checkpoint's ``WhisperFeatureExtractor`` (picklable, so this is too).

    Raises:
        ValueError: (on a clip) when the extractor's padding frames are not all alike (an extractor with
            dither), so the window cannot be kept in this compact form.
    """

    def __init__(self, feature_extractor: WhisperFeatureExtractor) -> None:
        self.feature_extractor = feature_extractor
        self.window = feature_extractor.nb_max_frames

    def __call__(self, raw: Audio) -> torch.Tensor:
        waveform = waveform_16k(raw, "qwen2_audio")
        out = self.feature_extractor(
            waveform.numpy(),
            sampling_rate=SAMPLE_RATE,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        values = out["input_features"][0].float()  # [mels, W]
        length = int(out["attention_mask"][0].sum())
        kept = min(length + TAIL, self.window)
        silence = values[:, -1:]  # [mels, 1]
        if kept < self.window and not torch.equal(values[:, kept:], silence.expand(-1, self.window - kept)):
            raise ValueError("qwen2_audio: the feature extractor's padding frames differ (dither is not supported)")
        head = F.pad(values[:, :kept], (0, length + TAIL - kept))  # frames past the window are never read
        return torch.cat([head, silence], dim=1)

    def collate(self, items: Sequence[torch.Tensor]) -> MediaBatch:
        mels = items[0].shape[0]
        values = torch.empty(len(items), mels, self.window)  # [B, mels, W]
        mask = torch.zeros(len(items), self.window, dtype=torch.long)  # [B, W]
        for i, item in enumerate(items):
            length = item.shape[1] - TAIL - 1
            kept = min(length + TAIL, self.window)
            values[i, :, :kept] = item[:, :kept]
            values[i, :, kept:] = item[:, -1:]
            mask[i, :length] = 1
        return {"input_features": values, "feature_attention_mask": mask}


class QwenAudioEncoder(Encoder):
    """Qwen2-Audio's audio tower without its pooling and final layer norm; one feature per two mel frames.

    Args:
        config: the tower's config dict (``Qwen2AudioEncoderConfig.to_dict()``, as ``spec()`` writes it);
            builds the tower with random weights.
        processor: the feature extractor dict (``WhisperFeatureExtractor.to_dict()``); by default Whisper's
            extractor with the tower's mel bands.

    Raises:
        ValueError: when the extractor's window is not the tower's (``2 * max_source_positions`` frames) or
            its sampling rate is not 16 kHz.
    """

    modality = "audio"

    def __init__(self, config: dict, processor: dict | None = None) -> None:
        super().__init__()
        tower_config = Qwen2AudioEncoderConfig.from_dict(dict(config))
        self.tower = _headless(Qwen2AudioEncoder(tower_config))
        self._feature_extractor = (
            WhisperFeatureExtractor.from_dict(dict(processor))
            if processor is not None
            else WhisperFeatureExtractor(feature_size=tower_config.num_mel_bins)
        )
        window = 2 * tower_config.max_source_positions
        extractor = self._feature_extractor
        if extractor.nb_max_frames != window or extractor.sampling_rate != SAMPLE_RATE:
            raise ValueError(
                f"qwen2_audio: the feature extractor gives {extractor.nb_max_frames} frames at "
                f"{extractor.sampling_rate} Hz; the tower takes {window} frames at {SAMPLE_RATE} Hz"
            )
        self.output_dim = tower_config.d_model

    @classmethod
    def from_tower(cls, tower: Qwen2AudioEncoder, feature_extractor: WhisperFeatureExtractor) -> QwenAudioEncoder:
        """The encoder around a released model's loaded tower, sharing its tensors with no random initialisation
        first. The tower's ``layer_norm`` is replaced here: a caller that keeps it (the connector) takes it first."""
        with torch.device("meta"):
            encoder = cls(config=tower.config.to_dict(), processor=feature_extractor.to_dict())
        encoder.tower = _headless(tower).float().eval()
        encoder._feature_extractor = feature_extractor
        return encoder

    def feature_extractor(self) -> WhisperFeatureExtractor:
        """The checkpoint's feature extractor (what a Qwen2-Audio export saves next to the model)."""
        return self._feature_extractor

    def preprocessor(self) -> MediaProcessor:
        return QwenAudioFeatures(self._feature_extractor)

    def forward(self, inputs: MediaBatch) -> EncoderOutput:
        values = inputs["input_features"].to(self.tower.conv1.weight.dtype)  # [B, mels, W]
        frames = inputs["feature_attention_mask"].to(values.device).sum(-1)  # [B]
        lengths = (frames - 1) // 2 + 1  # real positions after the stride-2 convolution, as transformers counts
        positions = self.tower.config.max_source_positions
        real = torch.arange(positions, device=values.device)[None, :] < lengths[:, None]  # [B, P]
        attention_mask = create_bidirectional_mask(
            config=self.tower.config,
            inputs_embeds=values.new_zeros(values.shape[0], positions, 1),
            attention_mask=real.long(),
        )
        hidden = self.tower(values, attention_mask=attention_mask).last_hidden_state  # [B, P, D] before pooling
        longest = int(lengths.max())
        mask = real[:, :longest]  # [B, N]
        return EncoderOutput(features=hidden[:, :longest].masked_fill(~mask[..., None], 0.0), mask=mask)

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        _, frames = input_shape
        length = int(frames) - TAIL - 1
        return (length - 1) // 2 + 1

    def spec(self) -> dict[str, Any]:
        return {"config": self.tower.config.to_dict(), "processor": self._feature_extractor.to_dict()}

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        return (Qwen2AudioEncoderLayer,)


def _headless(tower: Qwen2AudioEncoder) -> Qwen2AudioEncoder:
    """``tower`` without its pooling and final layer norm (identities), its fixed sinusoidal positions a buffer
    under the same name, so they stay fixed when a stage trains the encoder."""
    tower.avg_pooler = nn.Identity()
    tower.layer_norm = nn.Identity()
    positions = tower.embed_positions
    weight = positions.weight.detach()
    del positions.weight
    positions.register_buffer("weight", weight)
    return tower
