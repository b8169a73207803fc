"""mmpost: post-training for large multimodal models.

Build and swap parts::

    import mmpost
    model = mmpost.LMM(llm="path/to/llm",
                       encoders={"image": mmpost.encoder("hf_vision", path="path/to/clip")},
                       connectors={"image": mmpost.connector("mlp", depth=2)})
    model.set_connector("image", mmpost.connector("linear"))
    model.save("out"); model = mmpost.load("out")
"""

from __future__ import annotations

from typing import Any

from mmpost.model.io import load_lmm as load
from mmpost.model.lmm import LMM

__version__ = "0.1.0"
__all__ = ["LMM", "connector", "encoder", "load"]


def encoder(name: str, **kwargs: Any):
    """Builds the encoder registered as ``name`` (``open_clip``, ``timm``, ``hf_vision``) with ``kwargs``."""
    from encoders import ENCODERS

    return ENCODERS.build(name, **kwargs)


def connector(name: str, **kwargs: Any):
    """Builds the connector registered as ``name`` (``linear``, ``mlp``) with ``kwargs``."""
    from connectors import CONNECTORS

    return CONNECTORS.build(name, **kwargs)
