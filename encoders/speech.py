"""wav2vec 2.0 and HuBERT from ``torchaudio.models`` as audio encoders.

This module owns building torchaudio's models by factory name or from ``wav2vec2_model`` kwargs,
loading a state dict in torchaudio's key layout, waveform preprocessing, and cutting long clips into
chunks. Features are one transformer layer's output as torchaudio's ``extract_features`` gives it,
one per 20 ms (320 samples) of audio; for pre-norm models (the large ones) that is before the final
layer norm ``forward`` applies, as in ``extract_features``.

Where this departs from calling ``extract_features`` on a padded batch:

- Base-size models (``wav2vec2_base``, ``hubert_base``: group-norm feature extractor) normalise each
  conv channel over the whole padded waveform, so padding would change a clip's features. Their
  conv features are computed clip by clip, and the padded batch then goes through the transformer
  with torchaudio's length mask. Layer-norm extractors (the large models) run batched.
- Clips longer than ``max_seconds`` are cut into chunks encoded on their own (no attention across
  chunks), and the chunks' features are concatenated. A trailing piece too short for one feature
  (under 400 samples) is dropped.
- Clips shorter than the conv receptive field (400 samples, 25 ms) are zero-padded to it, so every
  clip gives at least one feature.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchaudio.models import Wav2Vec2Model, wav2vec2_model

from mmpost.encoders.waveform import SAMPLE_RATE, waveform_16k
from mmpost.interfaces import Audio, Encoder, EncoderOutput, MediaBatch, MediaProcessor
from mmpost.weights import load_state_dict_file

# torchaudio factories of models without a head (all take the same dropout kwargs)
ARCHS = (
    "wav2vec2_base",
    "wav2vec2_large",
    "wav2vec2_large_lv60k",
    "wav2vec2_xlsr_300m",
    "wav2vec2_xlsr_1b",
    "wav2vec2_xlsr_2b",
    "hubert_base",
    "hubert_large",
    "hubert_xlarge",
)
_CONFIG_KEYS = tuple(inspect.signature(wav2vec2_model).parameters)


class WaveformProcessor(MediaProcessor):
    """``Audio`` -> ``[samples]`` float32 at 16 kHz, optionally normalised, at least ``min_samples`` long.

    Args:
        normalize: zero mean and unit variance over the clip (as ``Wav2Vec2FeatureExtractor`` with
            ``do_normalize``), which wav2vec2 large-lv60 and the XLS-R models expect.
        min_samples: the conv receptive field; shorter clips are zero-padded to it.
        who: the encoder's name, for messages.
    """

    def __init__(self, normalize: bool, min_samples: int, who: str = "wav2vec2") -> None:
        self.normalize = normalize
        self.min_samples = min_samples
        self.who = who

    def __call__(self, raw: Audio) -> torch.Tensor:
        waveform = waveform_16k(raw, self.who)
        if self.normalize:
            waveform = (waveform - waveform.mean()) / torch.sqrt(waveform.var(unbiased=False) + 1e-7)
        return F.pad(waveform, (0, max(0, self.min_samples - waveform.numel())))

    def collate(self, items: Sequence[torch.Tensor]) -> MediaBatch:
        lengths = torch.tensor([item.numel() for item in items], dtype=torch.long)
        return {"values": pad_sequence(list(items), batch_first=True), "lengths": lengths}  # [B, L_max], [B]


class Wav2Vec2Encoder(Encoder):
    """A torchaudio wav2vec 2.0 model; features of one transformer layer, one per 20 ms.

    Args:
        arch: torchaudio factory name (``ARCHS``: "wav2vec2_base", "wav2vec2_large",
            "wav2vec2_large_lv60k", "hubert_base", "hubert_large", "hubert_xlarge", ...), built with its
            default dropouts. None means the class default ("wav2vec2_base"; "hubert_base" for
            ``HubertEncoder``) unless ``config`` is given.
        config: all keyword arguments of ``torchaudio.models.wav2vec2_model``, for other sizes; not
            together with ``arch``.
        path: state-dict file in torchaudio's key layout (``.safetensors``, or ``.pt`` / ``.pth``
            read with ``weights_only=True``; may be a ``pkg:`` path). A CTC head (``aux.*``) is
            ignored. None keeps the random initialisation.
        layer: which transformer layer's output, as an index into the list ``extract_features``
            returns (0 the first layer, -1 the last, the default).
        normalize: zero-mean unit-variance each clip before encoding (see ``WaveformProcessor``).
        max_seconds: longer clips are cut into chunks of this length, encoded separately.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on an unknown ``arch``, ``arch`` and ``config`` together, missing or unknown
            ``config`` keys, a weight file that does not fit (missing and unexpected tensors named),
            an out-of-range ``layer`` or a ``max_seconds`` shorter than one feature.
    """

    modality = "audio"
    label: ClassVar[str] = "wav2vec2"  # the registry name, for messages
    default_arch: ClassVar[str] = "wav2vec2_base"

    def __init__(
        self,
        arch: str | None = None,
        config: dict | None = None,
        path: str | None = None,
        layer: int = -1,
        normalize: bool = False,
        max_seconds: float = 30.0,
    ) -> None:
        super().__init__()
        name = self.label
        if arch is not None and config is not None:
            raise ValueError(f"{name}: give `arch` (a torchaudio factory) or `config` (its kwargs), not both")
        if config is None:
            arch = arch or self.default_arch
            if arch not in ARCHS:
                raise ValueError(f"{name}: unknown arch {arch!r}; torchaudio factories: {', '.join(ARCHS)}")
            self.model: Wav2Vec2Model = getattr(torchaudio.models, arch)()
        else:
            config = _check_config(config, name)
            self.model = wav2vec2_model(**config)
        self.arch, self.config = arch, config
        if path is not None:
            _load(self.model, path, name)
        self.model.eval()  # dropout and layer drop off unless a stage trains the encoder

        num_layers = len(self.model.encoder.transformer.layers)
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"{name}: layer={layer} is outside this {num_layers}-layer model's -{num_layers}..{num_layers - 1}"
            )
        self.layer = layer
        self.normalize = normalize
        self.max_seconds = max_seconds
        self._num_layers = layer % num_layers + 1  # extract_features stops after this many
        self._convs = [(block.kernel_size, block.stride) for block in self.model.feature_extractor.conv_layers]
        self._group_norm = isinstance(self.model.feature_extractor.conv_layers[0].layer_norm, nn.GroupNorm)
        self.min_samples = 1
        for kernel, stride in reversed(self._convs):
            self.min_samples = (self.min_samples - 1) * stride + kernel
        self.chunk_samples = round(max_seconds * SAMPLE_RATE)
        if self.chunk_samples < self.min_samples:
            raise ValueError(
                f"{name}: max_seconds={max_seconds} is shorter than one feature's {self.min_samples} samples"
            )
        self.output_dim = self.model.encoder.feature_projection.projection.out_features

    def preprocessor(self) -> MediaProcessor:
        return WaveformProcessor(self.normalize, self.min_samples, self.label)

    def forward(self, inputs: MediaBatch) -> EncoderOutput:
        values, lengths = inputs["values"], inputs["lengths"]  # [B, L], [B]
        values = values.to(self.model.feature_extractor.conv_layers[0].conv.weight.dtype)
        owners, chunks = [], []
        for i, length in enumerate(lengths.tolist()):
            for start, size in self._chunk_spans(length):
                owners.append(i)
                chunks.append(values[i, start : start + size])

        if self._group_norm:
            # GroupNorm would normalise over the padding too: extract chunk by chunk, then pad
            extracted = [self.model.feature_extractor(chunk[None], None)[0][0] for chunk in chunks]  # [T_k, C]
            conv_features = pad_sequence(extracted, batch_first=True)  # [K, T, C]
            frames = torch.tensor([f.shape[0] for f in extracted], device=values.device)
        else:
            sizes = torch.tensor([chunk.numel() for chunk in chunks], device=values.device)
            conv_features, frames = self.model.feature_extractor(pad_sequence(chunks, batch_first=True), sizes)
        hidden = self.model.encoder.extract_features(conv_features, frames, self._num_layers)[-1]  # [K, T, D]

        per_clip: list[list[torch.Tensor]] = [[] for _ in range(values.shape[0])]
        for k, (owner, count) in enumerate(zip(owners, frames.tolist(), strict=True)):
            per_clip[owner].append(hidden[k, :count])
        empty = hidden.new_zeros(0, hidden.shape[-1])  # a clip shorter than one feature (not preprocessed)
        features = pad_sequence([torch.cat([empty, *parts]) for parts in per_clip], batch_first=True)  # [B, N, D]
        counts = torch.tensor([sum(p.shape[0] for p in parts) for parts in per_clip], device=values.device)
        mask = torch.arange(features.shape[1], device=values.device)[None, :] < counts[:, None]  # [B, N]
        return EncoderOutput(features=features, mask=mask)

    def _chunk_spans(self, length: int) -> list[tuple[int, int]]:
        """(start, size) of the chunks of a clip of ``length`` samples that give at least one feature."""
        spans = [(start, min(self.chunk_samples, length - start)) for start in range(0, length, self.chunk_samples)]
        return [(start, size) for start, size in spans if size >= self.min_samples]

    def _num_frames(self, samples: int) -> int:
        for kernel, stride in self._convs:  # torchaudio's ConvLayerBlock length arithmetic
            samples = (samples - kernel) // stride + 1 if samples >= kernel else 0
        return samples

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        (samples,) = input_shape
        return sum(self._num_frames(size) for _, size in self._chunk_spans(int(samples)))

    def spec(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "config": self.config,
            "layer": self.layer,
            "normalize": self.normalize,
            "max_seconds": self.max_seconds,
        }

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        return (type(self.model.encoder.transformer.layers[0]),)


class HubertEncoder(Wav2Vec2Encoder):
    """A torchaudio HuBERT model: the wav2vec 2.0 architecture, so only the default ``arch`` differs."""

    label: ClassVar[str] = "hubert"
    default_arch: ClassVar[str] = "hubert_base"


def _check_config(config: dict, name: str) -> dict:
    missing = sorted(set(_CONFIG_KEYS) - set(config))
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if missing or unknown:
        raise ValueError(
            f"{name}: config must hold exactly the kwargs of torchaudio.models.wav2vec2_model; "
            f"missing {missing}, unknown {unknown}"
        )
    return dict(config)


def _load(model: nn.Module, path: str, name: str) -> None:
    state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("aux.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of other shapes: another size of model
        raise ValueError(f"{name}: {path} does not fit the model: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{name}: {path} does not fit the model: {len(result.missing_keys)} missing tensors "
            f"(e.g. {sorted(result.missing_keys)[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {sorted(result.unexpected_keys)[:3]})"
        )
    model.float()
