"""Audio encoders: Whisper's log-mel and encoder against transformers, wav2vec2 / HuBERT against
torchaudio, each loaded from tiny saved checkpoints through the real loading code; and the
behaviour mmpost adds on top (any sample rate, clips of any length, batches that do not leak)."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchaudio.models import wav2vec2_model
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel

from mmpost.encoders import ENCODERS
from mmpost.encoders.speech import HubertEncoder, Wav2Vec2Encoder
from mmpost.encoders.whisper_audio import WhisperAudioEncoder
from mmpost.interfaces import Audio
from mmpost.synthetic.tiny_audio import make_tiny_speech, make_tiny_whisper

WINDOW = 200  # mel frames per window of the tiny Whisper (max_source_positions=100): 2 s, 32000 samples


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper"), max_source_positions=WINDOW // 2)


@pytest.fixture(scope="module")
def whisper(whisper_dir) -> WhisperAudioEncoder:
    return WhisperAudioEncoder(path=str(whisper_dir))


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("speech")
    return {
        "wav2vec2": make_tiny_speech(out / "wav2vec2.pt", kind="wav2vec2"),
        "hubert": make_tiny_speech(out / "hubert.safetensors", kind="hubert"),
    }


@pytest.fixture(scope="module")
def encoders(whisper, speech_files) -> dict[str, torch.nn.Module]:
    w2v_path, w2v_config = speech_files["wav2vec2"]
    hubert_path, hubert_config = speech_files["hubert"]
    return {
        "whisper": whisper,
        "wav2vec2": Wav2Vec2Encoder(config=w2v_config, path=str(w2v_path)),
        "hubert": HubertEncoder(config=hubert_config, path=str(hubert_path)),
    }


FAMILIES = ["whisper", "wav2vec2", "hubert"]


def speech_like(samples: int, seed: int = 0, rate: int = 16_000) -> Audio:
    """A tone with a vibrato and noise: broadband enough to exercise every mel band."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / rate
    wave = 0.3 * torch.sin(2 * math.pi * (300 + 40 * torch.sin(2 * math.pi * 3 * t)) * t)
    return Audio((wave + 0.03 * torch.randn(samples, generator=g)).float(), rate)


def tone(freq: float, rate: int, seconds: float = 1.0) -> Audio:
    t = torch.arange(int(rate * seconds)) / rate
    return Audio((0.5 * torch.sin(2 * math.pi * freq * t)).float(), rate)


def encode(encoder, items: list[torch.Tensor]):
    with torch.no_grad():
        return encoder(encoder.preprocessor().collate(items))


def whisper_reference_features(waveform: torch.Tensor) -> torch.Tensor:
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW * 160 // 16_000)
    features = extractor(waveform.numpy(), sampling_rate=16_000, return_tensors="pt")["input_features"]
    return features[0]  # [80, WINDOW]


# --- Whisper ----------------------------------------------------------------------------------


@pytest.mark.parametrize("samples", [WINDOW * 160, 12_345])
def test_whisper_log_mel_is_the_feature_extractors(whisper, samples):
    clip = speech_like(samples)
    features = whisper.preprocess(clip)
    expected = whisper_reference_features(clip.waveform)
    frames = math.ceil(samples / 160)
    assert features.shape == (80, frames)
    error = (features - expected[:, :frames]).abs().max() / expected.abs().max()
    assert error <= 1e-3


def test_whisper_pads_a_short_clip_with_what_silence_becomes(whisper):
    # What the encoder sees for a clip shorter than a window is the feature extractor's window, except
    # the two frames whose STFT windows straddle the clip's end (Whisper zero-pads the waveform).
    clip = speech_like(12_345)
    frames = math.ceil(12_345 / 160)
    seen = []
    handle = whisper.encoder.conv1.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    encode(whisper, [whisper.preprocess(clip)])
    handle.remove()
    expected = whisper_reference_features(clip.waveform)
    assert seen[0].shape == (1, 80, WINDOW)
    torch.testing.assert_close(seen[0][0, :, :frames], expected[:, :frames], rtol=0, atol=1e-4)
    torch.testing.assert_close(seen[0][0, :, frames + 2 :], expected[:, frames + 2 :], rtol=0, atol=1e-4)


def test_whisper_encoder_is_transformers_whisper_encoder(whisper, whisper_dir):
    reference = WhisperModel.from_pretrained(whisper_dir).eval()
    input_features = torch.stack(
        [whisper_reference_features(speech_like(WINDOW * 160, seed=s).waveform) for s in (0, 1)]
    )
    batch = {"values": input_features, "lengths": torch.tensor([WINDOW, WINDOW])}
    with torch.no_grad():
        expected = reference.encoder(input_features).last_hidden_state  # [2, WINDOW / 2, D]
        out = whisper(batch)
    torch.testing.assert_close(out.features, expected, rtol=0, atol=1e-5)
    assert out.mask.all() and out.features.shape == (2, WINDOW // 2, 64) and whisper.output_dim == 64


def test_whisper_feature_layer_indexes_hidden_states(whisper_dir, whisper):
    inner = WhisperAudioEncoder(path=str(whisper_dir), feature_layer=1)
    input_features = whisper_reference_features(speech_like(WINDOW * 160).waveform)[None]
    batch = {"values": input_features, "lengths": torch.tensor([WINDOW])}
    with torch.no_grad():
        hidden_states = whisper.encoder(input_features, output_hidden_states=True).hidden_states
        torch.testing.assert_close(inner(batch).features, hidden_states[1], rtol=0, atol=1e-6)
        assert not torch.allclose(inner(batch).features, whisper(batch).features)
    with pytest.raises(ValueError, match="feature_layer=3"):
        WhisperAudioEncoder(path=str(whisper_dir), feature_layer=3)


def test_whisper_reads_the_encoder_of_every_checkpoint_kind(whisper, whisper_dir, tmp_path):
    model = WhisperModel.from_pretrained(whisper_dir)
    model.encoder.save_pretrained(tmp_path / "bare")
    full = WhisperForConditionalGeneration(model.config)
    full.model.load_state_dict(model.state_dict())
    full.save_pretrained(tmp_path / "full")
    for kind in ("bare", "full"):
        loaded = WhisperAudioEncoder(path=str(tmp_path / kind))
        for name, tensor in whisper.encoder.state_dict().items():
            assert torch.equal(loaded.encoder.state_dict()[name], tensor), (kind, name)


def test_whisper_names_missing_encoder_tensors(whisper_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(whisper_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["encoder.layers.1.fc1.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.fc1\.weight"):
        WhisperAudioEncoder(path=str(broken))
    with pytest.raises(FileNotFoundError, match="/nonexistent/whisper"):
        WhisperAudioEncoder(path="/nonexistent/whisper")
    with pytest.raises(ValueError, match="exactly one"):
        WhisperAudioEncoder()


def test_whisper_cuts_a_long_clip_into_windows(whisper):
    features = whisper.preprocess(speech_like(2 * WINDOW * 160 + 20_000))  # windows of 200, 200, 125 frames
    frames = features.shape[1]
    assert frames == 2 * WINDOW + 125
    out = encode(whisper, [features])
    assert whisper.num_tokens(features.shape) == int(out.mask[0].sum()) == 100 + 100 + 63
    first = encode(whisper, [features[:, :WINDOW]]).features[0]  # the first window encoded alone
    torch.testing.assert_close(out.features[0, :100], first, rtol=0, atol=1e-5)
    # the last window: its 125 frames, then the clip's silence value
    silence = max(float(features.max()) - 2.0, -1.5)
    last = torch.full((1, 80, WINDOW), silence)
    last[0, :, :125] = features[:, 2 * WINDOW :]
    with torch.no_grad():
        expected = whisper.encoder(last).last_hidden_state[0, :63]
    torch.testing.assert_close(out.features[0, 200:263], expected, rtol=0, atol=1e-5)


# --- wav2vec2 / HuBERT ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
@pytest.mark.parametrize("layer", [-1, 0])
def test_speech_features_are_torchaudios(speech_files, kind, layer):
    path, config = speech_files[kind]
    encoder = ENCODERS.build(kind, config=config, path=str(path), layer=layer)
    reference = wav2vec2_model(**config).eval()
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    reference.load_state_dict(state)
    clip = speech_like(12_000)
    with torch.no_grad():
        expected = reference.extract_features(clip.waveform[None])[0][layer]  # [1, T, D]
    out = encode(encoder, [encoder.preprocess(clip)])
    torch.testing.assert_close(out.features, expected, rtol=0, atol=1e-5)
    assert encoder.num_tokens((12_000,)) == expected.shape[1] == int(out.mask.sum())


def test_speech_cuts_a_long_clip_into_chunks(speech_files):
    path, config = speech_files["wav2vec2"]
    encoder = Wav2Vec2Encoder(config=config, path=str(path), max_seconds=0.3)  # chunks of 4800 samples
    for samples in (3 * 4800 + 1700, 3 * 4800 + 200):  # the 200-sample tail gives no feature and is dropped
        waveform = encoder.preprocess(speech_like(samples))
        out = encode(encoder, [waveform])
        assert encoder.num_tokens(waveform.shape) == int(out.mask[0].sum())
    assert encoder.num_tokens((3 * 4800 + 200,)) == 3 * encoder.num_tokens((4800,))
    first = encode(encoder, [waveform[:4800]]).features[0]
    torch.testing.assert_close(out.features[0, : first.shape[0]], first, rtol=0, atol=1e-5)


def test_speech_normalize_and_short_clips(speech_files):
    path, config = speech_files["wav2vec2"]
    encoder = Wav2Vec2Encoder(config=config, path=str(path), normalize=True)
    waveform = encoder.preprocess(Audio(speech_like(8000).waveform * 3.0 + 0.2, 16_000))
    assert abs(float(waveform.mean())) < 1e-5 and abs(float(waveform.std(unbiased=False)) - 1) < 1e-3
    short = encoder.preprocess(speech_like(100))  # 100 samples: padded to the 400-sample receptive field
    assert short.shape == (400,) and encoder.num_tokens(short.shape) == int(encode(encoder, [short]).mask.sum()) == 1


def test_hubert_differs_only_in_its_default_arch():
    assert HubertEncoder().spec()["arch"] == "hubert_base"
    with pytest.raises(ValueError, match="unknown arch"):
        Wav2Vec2Encoder(arch="wav2vec2_tiny")
    with pytest.raises(ValueError, match="missing"):
        Wav2Vec2Encoder(config={"encoder_embed_dim": 64})


def test_speech_rejects_weights_of_another_size(speech_files):
    path, config = speech_files["wav2vec2"]
    with pytest.raises(ValueError, match="does not fit"):
        Wav2Vec2Encoder(config={**config, "encoder_num_layers": 3}, path=str(path))


# --- every family -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_44khz_clip_is_resampled(encoders, family):
    encoder = encoders[family]
    at_16k, at_44k, other = (encoder.preprocess(c) for c in (tone(440, 16_000), tone(440, 44_100), tone(880, 16_000)))
    assert at_44k.shape == at_16k.shape  # one second either way
    features = [encode(encoder, [x]).features[0] for x in (at_16k, at_44k, other)]
    close, far = (features[0] - features[1]).abs().max(), (features[0] - features[2]).abs().max()
    assert close < 1e-2 < far


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_leak_into_a_clip(encoders, family):
    encoder = encoders[family]
    samples = [2 * WINDOW * 160 + 20_000, 12_345, WINDOW * 160, 3000]  # longer than a window, shorter, equal
    items = [encoder.preprocess(speech_like(n, seed=i)) for i, n in enumerate(samples)]
    out = encode(encoder, items)
    for i, item in enumerate(items):
        alone = encode(encoder, [item]).features[0]
        count = encoder.num_tokens(item.shape)
        assert int(out.mask[i].sum()) == count == alone.shape[0]
        assert not out.mask[i, count:].any()
        torch.testing.assert_close(out.features[i, :count], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_rebuilds_without_files(encoders, family):
    encoder = encoders[family]
    spec = json.loads(json.dumps(encoder.spec()))  # the LMM keeps the spec in its JSON config
    assert spec.get("path") is None
    rebuilt = type(encoder)(**spec)
    rebuilt.load_state_dict(encoder.state_dict())
    clip = speech_like(40_000)
    assert torch.equal(rebuilt.preprocess(clip), encoder.preprocess(clip))
    item = encoder.preprocess(clip)
    assert torch.equal(encode(rebuilt, [item]).features, encode(encoder, [item]).features)
    assert rebuilt.block_classes() == encoder.block_classes() != ()


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessor_survives_pickling(encoders, family):
    # DataLoader workers receive the processor pickled
    processor = encoders[family].preprocessor()
    clip = speech_like(5000, rate=22_050)
    assert torch.equal(pickle.loads(pickle.dumps(processor))(clip), processor(clip))


def test_registry_builds_each_audio_encoder(whisper_dir, speech_files):
    built = {
        "whisper": ENCODERS.build("whisper", path=str(whisper_dir)),
        "wav2vec2": ENCODERS.build("wav2vec2", config=speech_files["wav2vec2"][1]),
        "hubert": ENCODERS.build("hubert", config=speech_files["hubert"][1]),
    }
    for name, encoder in built.items():
        assert ENCODERS.name_of(type(encoder)) == name
        assert encoder.modality == "audio" and encoder.output_dim == 64


def test_whisper_positions_stay_fixed_when_the_encoder_trains(whisper_dir):
    encoder = ENCODERS.build(name="whisper", path=str(whisper_dir)).train()
    positions = encoder.encoder.embed_positions.weight.clone()
    for param in encoder.parameters():  # what a stage training "encoders" does
        param.requires_grad_(True)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=1.0)
    processor = encoder.preprocessor()
    clip = Audio(torch.sin(torch.arange(8000) * 0.2), 16000)
    encoder(processor.collate([processor(clip)])).features.square().mean().backward()
    optimizer.step()
    assert "encoder.embed_positions.weight" in encoder.state_dict()  # same name as in transformers
    assert torch.equal(encoder.encoder.embed_positions.weight, positions)
    assert not torch.equal(
        encoder.encoder.conv1.weight, ENCODERS.build(name="whisper", path=str(whisper_dir)).encoder.conv1.weight
    )
