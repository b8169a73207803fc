"""Encoders: backbones that turn raw media into feature sequences ``[B, N, D]``.

To add one, write a module here with a subclass of ``mmpost.interfaces.Encoder`` and add one line
below. Modules are imported only when their name is used.
"""

from mmpost.registry import Registry

ENCODERS = Registry("encoder")
ENCODERS.add("open_clip", "mmpost.encoders.open_clip_vision:OpenClipEncoder")
ENCODERS.add("timm", "mmpost.encoders.timm_vision:TimmEncoder")
ENCODERS.add("hf_vision", "mmpost.encoders.hf_vision:HFVisionEncoder")
ENCODERS.add("whisper", "mmpost.encoders.whisper_audio:WhisperAudioEncoder")
ENCODERS.add("wav2vec2", "mmpost.encoders.speech:Wav2Vec2Encoder")
ENCODERS.add("hubert", "mmpost.encoders.speech:HubertEncoder")
ENCODERS.add("qwen2_vl", "mmpost.encoders.qwen2_vl_vision:QwenVisionEncoder")
ENCODERS.add("qwen2_audio", "mmpost.encoders.qwen2_audio_encoder:QwenAudioEncoder")
ENCODERS.add("blip_vision", "mmpost.encoders.blip_vision:BlipVisionEncoder")
ENCODERS.add("instructblip_vision", "mmpost.encoders.blip_vision:InstructBlipVisionEncoder")
