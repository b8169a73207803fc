"""Q-Former (BLIP-2): learnt queries read the features through cross-attention; one token per query.

The transformer is transformers' own ``Blip2QFormerModel`` (self-attention over the queries,
cross-attention to the encoder features every ``cross_attention_frequency`` layers, feed-forward,
BERT-style post-norm), so a BLIP-2 checkpoint's Q-Former weights load unchanged and, built from the
checkpoint's whole Q-Former config, its outputs are transformers' outputs. mmpost adds the learnt query
tokens and the linear map to the LLM width, as ``Blip2ForConditionalGeneration`` does (``query_tokens``,
``language_projection``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, PretrainedConfig

from mmpost.interfaces import Connector
from mmpost.weights import load_pretrained_dir, resolve_path

log = logging.getLogger(__name__)

_PREFIXES = ("qformer.", "blip.qformer.", "model.qformer.")
# Blip2QFormerConfig field -> the constructor argument that sets it
_SIZE_ARGS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "intermediate_size",
    "cross_attention_frequency": "cross_attention_frequency",
}
_DEFAULTS = Blip2QFormerConfig().to_dict()


def own_fields(defaults: dict[str, Any]) -> tuple[str, ...]:
    """The Q-Former's own fields (not PretrainedConfig's generic ones) that `config` holds: all but the sizes,
    which have arguments, and the encoder width, which the encoder fixes."""
    return tuple(sorted(set(defaults) - set(PretrainedConfig().to_dict()) - set(_SIZE_ARGS) - {"encoder_hidden_size"}))


CONFIG_KEYS = own_fields(_DEFAULTS)


class QFormerConnector(Connector):
    """BLIP-2's Q-Former as a token connector: every medium becomes ``num_queries`` LLM tokens.

    Args:
        num_queries: learnt query tokens, the tokens per medium (BLIP-2: 32).
        hidden_size: Q-Former width.
        layers: Q-Former layers.
        heads: attention heads; must divide ``hidden_size``.
        intermediate_size: feed-forward width; default ``4 * hidden_size``.
        cross_attention_frequency: a layer ``i`` cross-attends to the features when ``i % frequency == 0``.
        dropout: dropout of hidden states and attention probabilities while training; sets both
            ``hidden_dropout_prob`` and ``attention_probs_dropout_prob`` over ``config`` and the
            checkpoint. None (the default) keeps their values, 0.1 when neither sets them.
        config: the other ``Blip2QFormerConfig`` fields (``CONFIG_KEYS``): ``layer_norm_eps``,
            ``hidden_act``, ``hidden_dropout_prob``, ``attention_probs_dropout_prob``,
            ``max_position_embeddings``, ``vocab_size``, ``pad_token_id``, ``initializer_range``,
            ``use_qformer_text_input``; unset ones take Blip2QFormerConfig's defaults. Built from a
            ``path``, ``spec()`` writes here the checkpoint's fields that differ from the defaults, so a
            saved model rebuilds the same Q-Former.
        path: a ``save_pretrained`` directory of a ``Blip2QFormerModel``, or of a BLIP-2 model
            (``Blip2ForConditionalGeneration`` / ``Blip2Model``) whose Q-Former, query tokens and,
            when the widths fit, language projection are loaded. Its config sets the sizes and
            ``config`` above; its ``encoder_hidden_size`` must be the encoder's width.

    Raises:
        ValueError: on both ``path`` and ``config``, a ``config`` key not in ``CONFIG_KEYS``, heads that
            do not divide ``hidden_size``, or (at build) a checkpoint made for another encoder width.
    """

    name: ClassVar[str] = "qformer"
    config_class: ClassVar[type] = Blip2QFormerConfig
    model_class: ClassVar[type] = Blip2QFormerModel
    defaults: ClassVar[dict[str, Any]] = _DEFAULTS
    config_keys: ClassVar[tuple[str, ...]] = CONFIG_KEYS

    def __init__(
        self,
        num_queries: int = 32,
        hidden_size: int = 768,
        layers: int = 12,
        heads: int = 12,
        intermediate_size: int | None = None,
        cross_attention_frequency: int = 2,
        dropout: float | None = None,
        config: dict[str, Any] | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__()
        name, keys = self.name, self.config_keys
        if path is not None and config is not None:
            raise ValueError(f"{name}: give `path` (whose checkpoint config is used) or `config`, not both")
        unknown = sorted(set(config or {}) - set(keys))
        if unknown:
            named = [f"{key} (set it with `{_SIZE_ARGS[key]}`)" if key in _SIZE_ARGS else key for key in unknown]
            raise ValueError(f"{name}: unknown config keys {', '.join(named)}; valid: {', '.join(keys)}")
        self.path = path
        self.pretrained: dict[str, torch.Tensor] = {}
        self.encoder_width: int | None = None  # fixed by a checkpoint's cross-attention
        sizes = {
            "hidden_size": hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": intermediate_size or 4 * hidden_size,
            "cross_attention_frequency": cross_attention_frequency,
        }
        fields = dict(config or {})
        if path is not None:
            loaded, num_queries, self.pretrained = _read_checkpoint(path, num_queries)
            sizes = {key: loaded[key] for key in sizes}
            fields = {key: loaded[key] for key in keys}
            self.encoder_width = loaded["encoder_hidden_size"]
        self.num_queries = num_queries
        self.sizes = sizes
        self.dropout = dropout
        # only the fields that differ from the defaults, so spec() stays short for the common case
        self.config = {key: value for key, value in fields.items() if value != self.defaults[key]}
        if sizes["hidden_size"] % sizes["num_attention_heads"]:
            raise ValueError(
                f"{name}: {sizes['num_attention_heads']} heads do not divide hidden_size {sizes['hidden_size']}"
            )

    @classmethod
    def from_modules(
        cls, qformer: Blip2QFormerModel, query_tokens: nn.Parameter, projection: nn.Linear
    ) -> QFormerConnector:
        """The connector around a released BLIP-2's loaded ``qformer``, ``query_tokens`` (``[1, Q, H]``) and
        ``language_projection``, holding their tensors with no random initialisation and no file read; built for
        the Q-Former's encoder width and the projection's output width."""
        config = qformer.config
        connector = cls(
            num_queries=query_tokens.shape[1],
            **{arg: getattr(config, key) for key, arg in _SIZE_ARGS.items()},
            config={key: getattr(config, key) for key in cls.config_keys},
        )
        with torch.device("meta"):
            connector.build(config.encoder_hidden_size, projection.out_features)
        connector.qformer, connector.query_tokens, connector.proj = qformer.float().eval(), query_tokens, projection
        return connector

    def _build(self, in_dim: int, out_dim: int) -> None:
        if self.encoder_width is not None and self.encoder_width != in_dim:
            raise ValueError(
                f"qformer: the checkpoint {self.path} cross-attends to {self.encoder_width}-wide features, "
                f"but the encoder gives {in_dim}-wide features"
            )
        dropout = {}
        if self.dropout is not None:  # the argument sets both, over the checkpoint's and `config`'s
            dropout = {"hidden_dropout_prob": self.dropout, "attention_probs_dropout_prob": self.dropout}
        config = self.config_class(**{**self.config, **dropout, **self.sizes, "encoder_hidden_size": in_dim})
        self.qformer = self.model_class(config)
        self.query_tokens = nn.Parameter(torch.randn(1, self.num_queries, config.hidden_size) * 0.02)
        self.proj = nn.Linear(config.hidden_size, out_dim)
        if self.pretrained:
            self._load_pretrained(out_dim)

    def _load_pretrained(self, out_dim: int) -> None:
        state = self.pretrained
        qformer = {key: value for key, value in state.items() if not key.startswith(("query_tokens", "language_"))}
        missing, unexpected = self.qformer.load_state_dict(qformer, strict=False)
        if missing:
            raise ValueError(f"qformer: {self.path} lacks Q-Former weights: {', '.join(missing[:5])} ...")
        if "query_tokens" in state:
            self.query_tokens.data.copy_(state["query_tokens"].reshape(self.query_tokens.shape))
        projection = state.get("language_projection.weight")
        if projection is not None and projection.shape[0] == out_dim:
            self.proj.weight.data.copy_(projection)
            self.proj.bias.data.copy_(state["language_projection.bias"])
        elif projection is not None:
            log.info(
                "qformer: %s projects to width %d, the LLM has %d; projection starts fresh",
                self.path,
                projection.shape[0],
                out_dim,
            )
        self.pretrained = {}  # loaded; do not keep a second copy

    def query_outputs(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The Q-Former's last hidden states for the queries, ``[K, num_queries, hidden_size]``."""
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=features,
            encoder_attention_mask=None if mask is None else mask.long(),
        )
        return out.last_hidden_state

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.query_outputs(features, mask))  # [K, num_queries, D_llm]

    def num_tokens(self, num_features: int) -> int:
        return self.num_queries

    def spec(self) -> dict[str, Any]:
        return {
            "num_queries": self.num_queries,
            "hidden_size": self.sizes["hidden_size"],
            "layers": self.sizes["num_hidden_layers"],
            "heads": self.sizes["num_attention_heads"],
            "intermediate_size": self.sizes["intermediate_size"],
            "cross_attention_frequency": self.sizes["cross_attention_frequency"],
            "dropout": self.dropout,
            "config": dict(self.config),
        }


def _read_checkpoint(path: str, num_queries: int) -> tuple[dict[str, Any], int, dict[str, torch.Tensor]]:
    """(Q-Former config dict, number of queries, weights with the Q-Former prefix removed)."""
    folder = resolve_path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"qformer path {path}: no config.json (expected a save_pretrained directory)")
    config = json.loads(config_file.read_text())
    if "qformer_config" in config:  # a full BLIP-2 model
        num_queries = config.get("num_query_tokens", num_queries)
        config = config["qformer_config"]
    elif config.get("model_type") != "blip_2_qformer":
        raise ValueError(
            f"qformer path {path}: config.json is a {config.get('model_type')!r} model, "
            "not a BLIP-2 model or a Blip2QFormerModel"
        )
    state = {}
    for key, value in load_pretrained_dir(Path(folder)).items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        state[key] = value
    if "query_tokens" in state:
        num_queries = state["query_tokens"].shape[-2]
    return {**_DEFAULTS, **config}, num_queries, state
