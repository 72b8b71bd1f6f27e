"""Where each BERT-family architecture keeps its parts: one declarative table per family.

Every structural step (layer dropping, head and FFN pruning, vocabulary pruning, embedding
factorisation, magnitude pruning, distillation, QAT, Quant-Noise, torchao) finds the modules it
edits through these tables, never through one family's module names. Paths are dotted attribute
paths; ``*`` in ``layers`` flattens a list of lists (ALBERT's layer groups).

Adding a family is one more ``Family(...)`` entry, plus its tiny config in ``tests/families.py``
so that every step is tried on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from torch import nn


@dataclass(frozen=True)
class Shape:
    """What the pre-flight checks need from a ``config.json``."""

    layers: int
    heads: int
    embedding_width: int
    weight_layers: int  # layers with their own weights (ALBERT: fewer than ``layers``)


@dataclass(frozen=True)
class Family:
    """One architecture: module paths relative to the base model (``layers``, ``embeddings``), to a
    layer (attention, FFN) or to the whole classifier (``classifier``, ``head_prefixes``)."""

    name: str
    model_types: tuple[str, ...]
    examples: str
    layers: str
    # The module holding the head count and head width attributes.
    attention: str
    # Projections whose output rows are heads, in [heads * head_size] layout.
    head_rows: tuple[str, ...]
    # Projections that exist only in some configs (DeBERTa's pos_key_proj): pruned when present.
    optional_head_rows: tuple[str, ...] = ()
    # One fused [q; k; v] projection (ModernBERT's Wqkv) instead of separate ones.
    fused_qkv: str | None = None
    attention_output: str = "attention.output.dense"
    head_size_attr: str = "attention_head_size"
    head_count_attrs: tuple[str, ...] = ("num_attention_heads",)
    head_width_attrs: tuple[str, ...] = ("all_head_size",)
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"
    # Gated FFN (GLU): ffn_in has 2 * width rows, [value; gate].
    ffn_gated: bool = False
    # The config attribute holding the FFN width.
    ffn_width_key: str = "intermediate_size"
    word_embeddings: str = "embeddings.word_embeddings"
    # The last Linear of the classification head, whose rows are the labels.
    classifier: str = "classifier"
    # Weights that only fine-tuning trains (absent from a bare encoder checkpoint).
    head_prefixes: tuple[str, ...] = ("classifier",)
    # RoBERTa numbers positions from config.pad_token_id + 1, so the pad id must not move.
    pad_sets_positions: bool = False
    # ALBERT: one set of layer weights applied num_hidden_layers times.
    shared_layers: bool = False
    # config.json keys of the shape (DistilBERT names them n_layers, n_heads, dim).
    layers_key: str = "num_hidden_layers"
    heads_key: str = "num_attention_heads"
    hidden_key: str = "hidden_size"
    # step kind -> why it cannot apply to this family.
    refused: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def shape(self, config: dict) -> Shape:
        """Layer and head counts and the word-embedding width from a ``config.json`` dict."""
        layers = int(config[self.layers_key])
        weight_layers = (int(config.get("num_hidden_groups", 1)) * int(config.get("inner_group_num", 1))
                         if self.shared_layers else layers)
        width = int(config.get("embedding_size") or config[self.hidden_key])
        return Shape(layers, int(config[self.heads_key]), width, weight_layers)


_BERT_LIKE = dict(attention="attention.self",
                  head_rows=("attention.self.query", "attention.self.key", "attention.self.value"))

FAMILIES: tuple[Family, ...] = (
    Family("BERT", ("bert",), "bert-base-uncased, MiniLM, TinyBERT", layers="encoder.layer", **_BERT_LIKE),
    Family("RoBERTa", ("roberta", "xlm-roberta"), "roberta-base, xlm-roberta-base", layers="encoder.layer",
           classifier="classifier.out_proj", pad_sets_positions=True, **_BERT_LIKE),
    Family("ELECTRA", ("electra",), "google/electra-small-discriminator", layers="encoder.layer",
           classifier="classifier.out_proj", **_BERT_LIKE),
    Family("DistilBERT", ("distilbert",), "distilbert-base-uncased", layers="transformer.layer",
           attention="attention", head_rows=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
           attention_output="attention.out_lin", head_count_attrs=("n_heads",), head_width_attrs=("dim",),
           layers_key="n_layers", heads_key="n_heads", hidden_key="dim",
           ffn_in="ffn.lin1", ffn_out="ffn.lin2", ffn_width_key="hidden_dim", head_prefixes=("pre_classifier", "classifier")),
    Family("ALBERT", ("albert",), "albert-base-v2", layers="encoder.albert_layer_groups.*.albert_layers",
           attention="attention", head_rows=("attention.query", "attention.key", "attention.value"),
           attention_output="attention.dense", ffn_in="ffn", ffn_out="ffn_output", shared_layers=True,
           refused=MappingProxyType({"mixed_precision": "every layer runs the same shared weights, so there is "
                                                        "no per-layer precision to choose; use quantize"})),
    Family("DeBERTa-v2/v3", ("deberta-v2",), "microsoft/deberta-v3-base", layers="encoder.layer",
           attention="attention.self",
           head_rows=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
           optional_head_rows=("attention.self.pos_key_proj", "attention.self.pos_query_proj"),
           head_prefixes=("pooler", "classifier")),
    Family("ModernBERT", ("modernbert",), "answerdotai/ModernBERT-base", layers="layers", attention="attn",
           head_rows=(), fused_qkv="attn.Wqkv", attention_output="attn.Wo", head_size_attr="head_dim",
           head_count_attrs=(), head_width_attrs=(), ffn_in="mlp.Wi", ffn_out="mlp.Wo", ffn_gated=True,
           word_embeddings="embeddings.tok_embeddings", head_prefixes=("head", "classifier")),
)

MODEL_TYPES: dict[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.json`` model_type some family table describes."""
    return tuple(MODEL_TYPES)


def family_of(model_or_type) -> Family:
    """The family of a model, a config, a ``config.json`` dict or a model_type string."""
    model_type = _model_type(model_or_type)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"No architecture table for model_type {model_type!r}; known: {', '.join(MODEL_TYPES)}.")
    return MODEL_TYPES[model_type]


def _model_type(thing) -> str | None:
    if isinstance(thing, str) or thing is None:
        return thing
    if isinstance(thing, dict):
        return thing.get("model_type")
    config = getattr(thing, "config", thing)
    return getattr(config, "model_type", None)


def refusal(family: Family, step_kind: str) -> str | None:
    """Why ``step_kind`` cannot apply to ``family`` (None when it can)."""
    return family.refused.get(step_kind)


# ----------------------------------------------------------------------------- path helpers


def get_path(root: nn.Module, path: str):
    """``root.a.b.c`` for ``path`` 'a.b.c' (None when an attribute is missing)."""
    node = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def set_path(root: nn.Module, path: str, value) -> None:
    """Replace the module at ``path`` (its parent must exist)."""
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def base_model(model):
    """The encoder body of a classifier (``model.bert`` for BERT), or the model itself."""
    return getattr(model, model.base_model_prefix, model)


def layer_lists(model) -> list[nn.ModuleList]:
    """The ``nn.ModuleList``(s) of transformer layers (several for ALBERT's layer groups)."""
    family, base = family_of(model), base_model(model)
    head, _, tail = family.layers.partition(".*.")
    container = get_path(base, head)
    return [get_path(group, tail) for group in container] if tail else [container]


def distinct_layers(model) -> list[nn.Module]:
    """Each layer with its own weights, in order (ALBERT: its shared layer(s), used many times)."""
    return [layer for modules in layer_lists(model) for layer in modules]


def replace_layers(model, keep: list[int]) -> None:
    """Keep only layers ``keep`` (indices into ``distinct_layers``) of a family with unshared layers."""
    family, base = family_of(model), base_model(model)
    layers = distinct_layers(model)
    set_path(base, family.layers, nn.ModuleList(layers[i] for i in keep))


def layer_prefix(model) -> str:
    """Qualified name of the layer container inside the classifier, e.g. ``bert.encoder.layer``."""
    family = family_of(model)
    head = family.layers.partition(".*.")[0]
    base_prefix = model.base_model_prefix if base_model(model) is not model else ""
    return ".".join(part for part in (base_prefix, head) if part)
