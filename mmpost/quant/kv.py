"""FP8 KV-cache scales: one key scale and one value scale per attention layer, from the largest ``|k|`` and
``|v|`` (keys after rotary embedding, as the cache stores them) over the real tokens of the calibration set, run
through the whole LMM with its weights already compressed. ``scale = max / 448``, the largest E4M3 value, as
llm-compressor's static min-max observer gives."""

from __future__ import annotations

import torch

from mmpost.model.lmm import LMM
from mmpost.model.quantized import attention_modules, hook_kv, kv_cache_args


@torch.no_grad()
def kv_scales(model: LMM, batches: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per attention module name of the LLM, its ``(k_scale, v_scale)`` as ``[1]`` float32 tensors.

    Raises:
        ValueError: when the LLM has no attention module with a cache argument to quantize keys and values in.
    """
    from compressed_tensors.quantization.utils import calculate_qparams

    modules = attention_modules(model.base_llm)
    if not modules:
        raise ValueError(
            f"kv_cache: {type(model.base_llm).__name__} has no attention module with k_proj, v_proj and a cache "
            "argument; its keys and values cannot be quantized"
        )
    device = next(model.parameters()).device
    peaks = {name: [torch.zeros((), device=device), torch.zeros((), device=device)] for name in modules}
    keep: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def transform(key: torch.Tensor, value: torch.Tensor):
            mask = keep["mask"]  # [B, T] -> the keys' [B, heads, T, dim]
            real = mask[:, None, -key.shape[2] :, None].expand_as(key)
            peaks[name][0] = torch.maximum(peaks[name][0], key.abs().masked_fill(~real, 0).amax())
            peaks[name][1] = torch.maximum(peaks[name][1], value.abs().masked_fill(~real, 0).amax())
            return key, value

        return transform

    handles = [hook_kv(module, observe(name)) for name, module in modules.items()]
    try:
        for batch in batches:
            batch = batch.to(device)
            keep["mask"] = batch.attention_mask.bool()
            model.hidden_states(batch.input_ids, batch.attention_mask, batch.media)
    finally:
        for handle in handles:
            handle.remove()
    args = kv_cache_args()
    out = {}
    for name, (k_peak, v_peak) in peaks.items():
        scales = []
        for peak in (k_peak, v_peak):
            scale, _ = calculate_qparams(-peak.reshape(1), peak.reshape(1), args)
            scales.append(scale.float().reshape(1).cpu())
        out[name] = (scales[0], scales[1])
    return out
