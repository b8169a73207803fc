"""Connectors: what turns encoder features into something the LLM consumes.

To add one, write a module here with a subclass of ``mmpost.interfaces.Connector`` and add one line
below. Modules are imported only when their name is used.
"""

from mmpost.registry import Registry

CONNECTORS = Registry("connector")
CONNECTORS.add("linear", "connectors.projection:LinearConnector")
CONNECTORS.add("mlp", "connectors.projection:MLPConnector")
CONNECTORS.add("qformer", "connectors.qformer:QFormerConnector")
CONNECTORS.add("resampler", "connectors.resampler:ResamplerConnector")
CONNECTORS.add("xattn", "connectors.xattn:CrossAttentionConnector")
