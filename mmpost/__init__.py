"""mmpost: post-training for large multimodal models.

Build and swap parts::

    import mmpost
    model = mmpost.LMM(llm="path/to/llm",
                       encoders={"image": mmpost.encoder("hf_vision", path="path/to/clip")},
                       connectors={"image": mmpost.connector("mlp", depth=2)})
    model.set_connector("image", mmpost.connector("linear"))
    model.save("out"); model = mmpost.load("out")

Start from a released model (LLaVA-1.5-hf, Qwen2-VL, BLIP-2, Qwen2-Audio)::

    model = mmpost.from_pretrained("path/to/llava-1.5-7b-hf")

The names are imported on first use, so that ``import mmpost.interfaces`` (what encoders and connectors import)
loads no model, data or training code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmpost.families import from_pretrained
    from mmpost.model.build import connector, encoder
    from mmpost.model.build import load_lmm as load
    from mmpost.model.lmm import LMM

__version__ = "0.1.0"
__all__ = ["LMM", "connector", "encoder", "from_pretrained", "load"]

_PUBLIC = {
    "LMM": ("mmpost.model.lmm", "LMM"),
    "load": ("mmpost.model.build", "load_lmm"),
    "encoder": ("mmpost.model.build", "encoder"),
    "connector": ("mmpost.model.build", "connector"),
    "from_pretrained": ("mmpost.families", "from_pretrained"),
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mmpost' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    return getattr(importlib.import_module(module), attr)
