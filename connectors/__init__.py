"""Connectors: what turns encoder features into something the LLM consumes.

To add one, write a module here with a subclass of ``mmpost.interfaces.Connector`` and add one line
below. Modules are imported only when their name is used.
"""

from mmpost.registry import Registry

CONNECTORS = Registry("connector")
CONNECTORS.add("linear", "mmpost.connectors.projection:LinearConnector")
CONNECTORS.add("mlp", "mmpost.connectors.projection:MLPConnector")
CONNECTORS.add("qformer", "mmpost.connectors.qformer:QFormerConnector")
CONNECTORS.add("instruct_qformer", "mmpost.connectors.instruct_qformer:InstructQFormerConnector")
CONNECTORS.add("resampler", "mmpost.connectors.resampler:ResamplerConnector")
CONNECTORS.add("xattn", "mmpost.connectors.xattn:CrossAttentionConnector")
CONNECTORS.add("patch_merger", "mmpost.connectors.patch_merger:PatchMergerConnector")
CONNECTORS.add("audio_pooler", "mmpost.connectors.audio_pooler:AudioPoolerConnector")
