"""Save and load BERT-family classifiers whose shape a standard ``BertConfig`` cannot express.

Head pruning leaves layers with different numbers of heads, and FFN pruning leaves layers with
different intermediate widths. transformers 5 no longer records pruned heads in the config, so
``AutoModelForSequenceClassification.from_pretrained`` would build full-size layers and fail (or
silently mis-load). We record the per-layer shapes in two extra config attributes, which
``save_pretrained`` writes to ``config.json`` like any other attribute:

- ``bertshrink_heads_per_layer``: heads kept in each layer after head pruning;
- ``bertshrink_intermediate_sizes``: FFN width of each layer after FFN pruning;
- ``bertshrink_embedding_rank``: rank of the factorised word embeddings (ALBERT-style);
- ``bertshrink_quantization``: ``{"backend": "torch", "mode": ...}`` for folders written by
  ``bertshrink.compression.quantize_torch`` (int8 torchao weights in ``pytorch_model.bin``, or fp16/bf16).

``bertshrink.modelfolder.load.load_classifier`` reads these attributes back::

    from bertshrink.modelfolder.load import load_classifier
    model = load_classifier("models/pruned")

Models without these attributes load through plain ``from_pretrained``.
"""

from __future__ import annotations

from torch import nn

from bertshrink.modelfolder.families import (Family, base_model, distinct_layers, family_of, get_path,
                                             layer_prefix, replace_layers, set_path)

HEADS_KEY = "bertshrink_heads_per_layer"
FFN_KEY = "bertshrink_intermediate_sizes"
EMBED_KEY = "bertshrink_embedding_rank"
QUANT_KEY = "bertshrink_quantization"


def _resized_linear(layer, out_features: int | None = None, in_features: int | None = None):
    """A fresh ``nn.Linear`` with the given size; weights are overwritten by the state dict."""
    out_features = layer.out_features if out_features is None else out_features
    in_features = layer.in_features if in_features is None else in_features
    if (out_features, in_features) == (layer.out_features, layer.in_features):
        return layer
    return nn.Linear(in_features, out_features, bias=layer.bias is not None,
                     device=layer.weight.device, dtype=layer.weight.dtype)


def encoder_layers(model) -> list[nn.Module]:
    """The transformer layers with weights of their own, in order (see ``families``)."""
    return distinct_layers(model)


def keep_layers(model, keep: list[int]) -> None:
    """Keep layers ``keep`` (0-based, in order) and every per-layer record: pruned shapes and
    ModernBERT's attention types. ALBERT's layers are one shared layer applied
    ``num_hidden_layers`` times, so there it keeps ``len(keep)`` passes."""
    if not family_of(model).shared_layers:
        replace_layers(model, keep)
        for new_idx, layer in enumerate(encoder_layers(model)):
            # layer_idx only addresses KV caches, but keep it consistent with the new position.
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        for key in (HEADS_KEY, FFN_KEY, "layer_types"):
            records = getattr(model.config, key, None)
            if isinstance(records, list) and len(records) == model.config.num_hidden_layers:
                setattr(model.config, key, [records[i] for i in keep])
    model.config.num_hidden_layers = len(keep)


def head_size(family: Family, layer) -> int:
    """Width of one attention head in ``layer``."""
    return int(getattr(get_path(layer, family.attention), family.head_size_attr))


def head_count(family: Family, layer) -> int:
    """Attention heads ``layer`` has now (read from its projections, so pruned layers count right)."""
    rows = get_path(layer, family.fused_qkv).out_features // 3 if family.fused_qkv else \
        get_path(layer, family.head_rows[0]).out_features
    return rows // head_size(family, layer)


def head_row_paths(family: Family, layer) -> list[str]:
    """Paths of the projections whose output rows are per-head, present in this layer."""
    return [*family.head_rows, *(p for p in family.optional_head_rows if get_path(layer, p) is not None)]


def set_head_attributes(family: Family, layer, heads: int) -> None:
    """Update the attributes forward() reads for the head count and the concatenated width."""
    attention, width = get_path(layer, family.attention), heads * head_size(family, layer)
    for attr in family.head_count_attrs:
        setattr(attention, attr, heads)
    for attr in family.head_width_attrs:
        setattr(attention, attr, width)


def set_attention_heads(family: Family, layer, heads: int) -> None:
    """Resize one layer's self-attention to ``heads`` heads (shapes only)."""
    if heads < 1:
        raise ValueError(f"A layer needs at least one attention head, got {heads}.")
    width = heads * head_size(family, layer)
    if family.fused_qkv:
        set_path(layer, family.fused_qkv, _resized_linear(get_path(layer, family.fused_qkv), out_features=3 * width))
    for path in head_row_paths(family, layer):
        set_path(layer, path, _resized_linear(get_path(layer, path), out_features=width))
    set_path(layer, family.attention_output,
             _resized_linear(get_path(layer, family.attention_output), in_features=width))
    set_head_attributes(family, layer, heads)


def ffn_width(family: Family, layer) -> int:
    """Neurons in ``layer``'s feed-forward block."""
    return get_path(layer, family.ffn_out).in_features


def set_intermediate_size(family: Family, layer, width: int) -> None:
    """Resize one layer's feed-forward block to ``width`` neurons (shapes only)."""
    if width < 1:
        raise ValueError(f"A feed-forward block needs at least one neuron, got {width}.")
    rows = 2 * width if family.ffn_gated else width
    set_path(layer, family.ffn_in, _resized_linear(get_path(layer, family.ffn_in), out_features=rows))
    set_path(layer, family.ffn_out, _resized_linear(get_path(layer, family.ffn_out), in_features=width))


class FactorizedEmbedding(nn.Module):
    """Word embeddings as a [vocab, rank] lookup followed by a [rank -> hidden] projection."""

    def __init__(self, num_embeddings: int, rank: int, embedding_dim: int):
        super().__init__()
        self.low = nn.Embedding(num_embeddings, rank)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, input_ids):
        return self.proj(self.low(input_ids))


def encoder_linear_modules(model) -> dict[str, nn.Linear]:
    """``{qualified name: module}`` of the transformer layers' Linear layers (attention and FFN)."""
    prefix = layer_prefix(model)
    family = family_of(model)
    container = get_path(base_model(model), family.layers.partition(".*.")[0])
    return {f"{prefix}.{name}": module for name, module in container.named_modules()
            if isinstance(module, nn.Linear)}


def apply_structure(model):
    """Reshape ``model``'s layers to the sizes recorded in its config; returns the model."""
    family = family_of(model)
    layers = encoder_layers(model)
    for key, setter in ((HEADS_KEY, set_attention_heads), (FFN_KEY, set_intermediate_size)):
        sizes = getattr(model.config, key, None)
        if sizes is None:
            continue
        if len(sizes) != len(layers):
            raise ValueError(f"config.{key} has {len(sizes)} entries but the model has {len(layers)} layers.")
        for layer, size in zip(layers, sizes):
            setter(family, layer, int(size))
    rank = getattr(model.config, EMBED_KEY, None)
    if rank is not None:
        embeddings = model.get_input_embeddings()
        if not isinstance(embeddings, FactorizedEmbedding):
            model.set_input_embeddings(FactorizedEmbedding(embeddings.num_embeddings, int(rank),
                                                           embeddings.embedding_dim))
    return model


# Quantized folders are included: from_pretrained cannot rebuild their torchao weights either.
STRUCTURE_KEYS = (HEADS_KEY, FFN_KEY, EMBED_KEY, QUANT_KEY)


def is_restructured(config) -> bool:
    """True when the config (object or ``config.json`` dict) records shapes or a quantized storage
    ``from_pretrained`` can't rebuild."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return any(get(key) is not None for key in STRUCTURE_KEYS)
