"""Save and load BERT classifiers whose shape a standard ``BertConfig`` cannot express.

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


def set_attention_heads(layer, heads: int) -> None:
    """Resize one encoder layer's self-attention to ``heads`` heads (shapes only)."""
    if heads < 1:
        raise ValueError(f"A layer needs at least one attention head, got {heads}.")
    attn = layer.attention.self
    width = heads * attn.attention_head_size
    attn.query = _resized_linear(attn.query, out_features=width)
    attn.key = _resized_linear(attn.key, out_features=width)
    attn.value = _resized_linear(attn.value, out_features=width)
    layer.attention.output.dense = _resized_linear(layer.attention.output.dense, in_features=width)
    # forward() reshapes with -1 heads, but other code (and our reports) read these attributes.
    attn.num_attention_heads = heads
    attn.all_head_size = width


def set_intermediate_size(layer, width: int) -> None:
    """Resize one encoder layer's feed-forward block to ``width`` neurons (shapes only)."""
    if width < 1:
        raise ValueError(f"A feed-forward block needs at least one neuron, got {width}.")
    layer.intermediate.dense = _resized_linear(layer.intermediate.dense, out_features=width)
    layer.output.dense = _resized_linear(layer.output.dense, in_features=width)


class FactorizedEmbedding(nn.Module):
    """Word embeddings as a [vocab, rank] lookup followed by a [rank -> hidden] projection."""

    def __init__(self, num_embeddings: int, rank: int, embedding_dim: int):
        super().__init__()
        self.low = nn.Embedding(num_embeddings, rank)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, input_ids):
        return self.proj(self.low(input_ids))


def base_model(model):
    """The encoder body of a classifier (``model.bert`` for BERT), or the model itself."""
    return getattr(model, model.base_model_prefix, model)


def encoder_layers(model):
    """The ``nn.ModuleList`` of transformer layers."""
    return base_model(model).encoder.layer


def encoder_linear_modules(model) -> dict[str, nn.Linear]:
    """``{qualified name: module}`` of the encoder's Linear layers (attention and FFN)."""
    base = base_model(model)
    prefix = f"{model.base_model_prefix}.encoder" if base is not model else "encoder"
    return {f"{prefix}.{name}": module for name, module in base.encoder.named_modules()
            if isinstance(module, nn.Linear)}


def apply_structure(model):
    """Reshape ``model``'s layers to the sizes recorded in its config; returns the model."""
    layers = encoder_layers(model)
    for key, setter in ((HEADS_KEY, set_attention_heads), (FFN_KEY, set_intermediate_size)):
        sizes = getattr(model.config, key, None)
        if sizes is None:
            continue
        if len(sizes) != len(layers):
            raise ValueError(f"config.{key} has {len(sizes)} entries but the model has {len(layers)} layers.")
        for layer, size in zip(layers, sizes):
            setter(layer, int(size))
    rank = getattr(model.config, EMBED_KEY, None)
    if rank is not None:
        base = base_model(model)
        if not isinstance(base.embeddings.word_embeddings, FactorizedEmbedding):
            base.embeddings.word_embeddings = FactorizedEmbedding(
                model.config.vocab_size, int(rank), model.config.hidden_size)
    return model


# Quantized folders are included: from_pretrained cannot rebuild their torchao weights either.
STRUCTURE_KEYS = (HEADS_KEY, FFN_KEY, EMBED_KEY, QUANT_KEY)


def is_restructured(config) -> bool:
    """True when the config (object or ``config.json`` dict) records shapes or a quantized storage
    ``from_pretrained`` can't rebuild."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return any(get(key) is not None for key in STRUCTURE_KEYS)
