"""Tiny audio encoders of each family, saved to disk, for tests and the offline demo.

Nothing is downloaded. Each function builds a seeded tiny model and writes it the way real
checkpoints are written (transformers ``save_pretrained``; a torchaudio state dict), so the code
under test goes through the real loading path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_tiny_whisper(
    directory: str | Path,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_source_positions: int = 100,
    seed: int = 0,
) -> Path:
    """Saves a random ``WhisperModel`` (encoder and a one-layer decoder) with ``save_pretrained``.

    Args:
        directory: directory to write (created if needed).
        d_model: width of encoder and decoder.
        layers: encoder layers.
        heads: attention heads.
        max_source_positions: encoder positions; a window is ``2 * max_source_positions`` mel frames
            (100 gives 2 s windows, against Whisper's 1500 and 30 s).
        seed: torch seed for the weights.

    Returns:
        ``directory`` as a Path, loadable with ``WhisperModel.from_pretrained``.
    """
    from transformers import WhisperConfig, WhisperModel

    out = Path(directory)
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=2 * d_model,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=max_source_positions,
        max_target_positions=32,
        # token ids inside the tiny vocabulary (Whisper's defaults index a 51865-token one)
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    torch.manual_seed(seed)
    WhisperModel(config).save_pretrained(out)
    return out


def tiny_speech_config(kind: str = "wav2vec2") -> dict[str, Any]:
    """``torchaudio.models.wav2vec2_model`` kwargs of a tiny model with the real models' conv strides.

    "wav2vec2" is shaped like the base models (group-norm feature extractor, post-norm transformer),
    "hubert" like the large ones (layer-norm feature extractor, pre-norm transformer), so the two
    cover both of torchaudio's variants.

    Raises:
        ValueError: on another ``kind``.
    """
    if kind not in ("wav2vec2", "hubert"):
        raise ValueError(f"kind must be 'wav2vec2' or 'hubert', got {kind!r}")
    large_like = kind == "hubert"
    return {
        "extractor_mode": "layer_norm" if large_like else "group_norm",
        # the real (channels, kernel, stride) list at 64 channels: 320x down-sampling, 400-sample receptive field
        "extractor_conv_layer_config": [[64, 10, 5]] + [[64, 3, 2]] * 4 + [[64, 2, 2]] * 2,
        "extractor_conv_bias": False,
        "encoder_embed_dim": 64,
        "encoder_projection_dropout": 0.0,
        "encoder_pos_conv_kernel": 16,
        "encoder_pos_conv_groups": 4,
        "encoder_num_layers": 2,
        "encoder_num_heads": 4,
        "encoder_attention_dropout": 0.0,
        "encoder_ff_interm_features": 128,
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.0,
        "encoder_layer_norm_first": large_like,
        "encoder_layer_drop": 0.0,
        "aux_num_out": None,
    }


def make_tiny_speech(path: str | Path, kind: str = "wav2vec2", seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Saves the state dict of a random tiny torchaudio wav2vec2 / HuBERT model (``tiny_speech_config``).

    Args:
        path: file to write: ``.safetensors``, else a PyTorch file (``.pt`` / ``.pth``).
        kind: "wav2vec2" or "hubert".
        seed: torch seed for the weights.

    Returns:
        (path, config): the weight file in torchaudio's key layout and the ``wav2vec2_model`` kwargs.
    """
    from torchaudio.models import wav2vec2_model

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = tiny_speech_config(kind)
    torch.manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in wav2vec2_model(**config).state_dict().items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out))
    else:
        torch.save(state, out)
    return out, config
