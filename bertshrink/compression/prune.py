"""Pruning for BERT-family classifiers: layers, attention heads, FFN neurons, vocabulary, weights.

Every structural edit physically removes parameters, so the model really gets smaller. Head and
FFN pruning leave shapes a standard config cannot describe; they are recorded in the config (see
``bertshrink.modelfolder.structure``) and such models load with ``modelfolder.load.load_classifier``.
Layer dropping and vocabulary pruning keep a standard shape and load with ``from_pretrained``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from bertshrink.compression.vocab import kept_token_ids, tokenizer_with_ids
from bertshrink.modelfolder.size import count_parameters
from bertshrink.modelfolder.families import family_of, get_path, set_path
from bertshrink.modelfolder.structure import (FactorizedEmbedding, encoder_layers,
                                              encoder_linear_modules, ffn_width, head_count, head_row_paths,
                                              head_size, keep_layers, set_head_attributes)

LAYER_STRATEGIES = ("top", "bottom", "alternate", "symmetric")


# --------------------------------------------------------------------------- layer dropping


def layers_to_drop(num_layers: int, strategy: str, n_drop: int) -> list[int]:
    """Indices removed by a "Poor Man's BERT" strategy (Sajjad et al., 2020)."""
    if strategy not in LAYER_STRATEGIES:
        raise ValueError(f"Unknown layer-drop strategy {strategy!r}; use one of {LAYER_STRATEGIES} or a list.")
    if not 0 < n_drop < num_layers:
        raise ValueError(f"Strategy {strategy!r} cannot drop {n_drop} of {num_layers} layers "
                         f"(drop between 1 and {num_layers - 1}).")
    if strategy == "top":
        return list(range(num_layers - n_drop, num_layers))
    if strategy == "bottom":
        return list(range(n_drop))
    if strategy == "alternate":
        # Odd-alternate dropping (the paper's better variant): for 12 layers, 1-based 11, 9, 7, …
        # from the top, so the last layer stays. Past half the layers, continue with 12, 10, ….
        candidates = list(range(num_layers - 2, -1, -2)) + list(range(num_layers - 1, -1, -2))
        return sorted(candidates[:n_drop])
    # symmetric: drop from the middle outward, keeping the bottom and top layers.
    middle = (num_layers - 1) / 2
    order = sorted(range(num_layers), key=lambda i: (abs(i - middle), i))
    return sorted(order[:n_drop])


def drop_layers(model, strategy: str | None = None, n_drop: int | None = None, layers=None):
    """Remove encoder layers by ``strategy`` (with ``n_drop``) or by explicit indices ``layers``.

    ``strategy`` may also be a list of indices. ALBERT applies one shared layer
    ``num_hidden_layers`` times: there, dropping layers means fewer passes (faster, not smaller),
    and every strategy gives the same model. Returns (model, report).
    """
    if isinstance(strategy, (list, tuple)):
        layers, strategy = list(strategy), None
    total = model.config.num_hidden_layers
    if layers is not None:
        drop = sorted(set(int(i) for i in layers))
        if any(not 0 <= i < total for i in drop):
            raise ValueError(f"Layer indices {drop} out of range for {total} layers.")
        if len(drop) >= total or not drop:
            raise ValueError(f"Cannot drop layers {drop} of {total}: at least one must go and one must stay.")
    else:
        if n_drop is None:
            raise ValueError(f"Strategy {strategy!r} needs n_drop.")
        drop = layers_to_drop(total, strategy, int(n_drop))
    before = count_parameters(model)
    keep = [i for i in range(total) if i not in drop]
    keep_layers(model, keep)
    return model, {"dropped": drop, "kept": keep, "params_before": before, "params_after": count_parameters(model)}


# --------------------------------------------------------------------------- attention heads


@contextmanager
def head_gates(model, gates: list[torch.Tensor]):
    """Scale each head's context by ``gates[layer][head]`` while inside (Michel et al.'s head mask).

    transformers 5 dropped ``head_mask``; a pre-hook on the attention output projection does the
    same job in every family: its input [batch, seq, heads*size] is viewed per head and scaled.
    """
    family = family_of(model)
    handles = []
    for layer, gate in zip(encoder_layers(model), gates):
        size = head_size(family, layer)

        def hook(module, args, gate=gate, size=size):
            context = args[0]
            shape = context.shape
            return (context.view(*shape[:-1], gate.numel(), size) * gate[:, None]).view(shape), *args[1:]

        handles.append(get_path(layer, family.attention_output).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def head_importance(model, batches: Iterable[dict], normalize: bool = True) -> torch.Tensor:
    """Michel et al. (2019) head importance: sum over batches of |d loss / d gate|.

    ``batches`` yields dicts of model inputs including ``labels``. With ``normalize`` each
    layer's scores are divided by their L2 norm, as the paper does before global ranking.
    Returns [layers, max_heads]; layers with fewer heads are padded with NaN.
    """
    family, layers = family_of(model), encoder_layers(model)
    gates = [torch.ones(head_count(family, layer), requires_grad=True) for layer in layers]
    scores = [torch.zeros(head_count(family, layer)) for layer in layers]
    was_training = model.training
    model.eval()  # no dropout: importance should not depend on the random mask
    try:
        with head_gates(model, gates):
            for batch in batches:
                loss = model(**batch).loss
                grads = torch.autograd.grad(loss, gates)
                for score, grad in zip(scores, grads):
                    score += grad.abs().detach()
    finally:
        model.train(was_training)
    if normalize:
        scores = [s / s.norm().clamp_min(1e-20) for s in scores]
    out = torch.full((len(layers), max(len(s) for s in scores)), float("nan"))
    for i, s in enumerate(scores):
        out[i, : len(s)] = s
    return out


def select_heads(importance: torch.Tensor, ratio: float | None = None, count: int | None = None,
                 scope: str = "global") -> dict[int, list[int]]:
    """Least important heads to prune: ``ratio`` or ``count`` of them, globally or per layer.

    Per layer, ``count`` is heads per layer. Never selects every head of a layer. NaN entries
    (padding from ``head_importance``) are not heads.
    """
    if (ratio is None) == (count is None):
        raise ValueError("Give exactly one of ratio or count.")
    if scope not in ("global", "per_layer"):
        raise ValueError(f"Unknown scope {scope!r}; use 'global' or 'per_layer'.")
    present = ~torch.isnan(importance)
    per_layer = present.sum(dim=1).tolist()
    total = int(present.sum())
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(f"Head ratio must be in [0, 1), got {ratio}: every layer keeps a head.")
    if scope == "per_layer":
        chosen = {}
        for layer, n_heads in enumerate(per_layer):
            n = round(ratio * n_heads) if ratio is not None else int(count)
            if n >= n_heads:
                raise ValueError(f"Cannot prune {n} of {n_heads} heads in layer {layer}.")
            if n > 0:
                order = torch.argsort(importance[layer][: n_heads])
                chosen[layer] = sorted(order[:n].tolist())
        return chosen
    n = round(ratio * total) if ratio is not None else int(count)
    if n >= total:
        raise ValueError(f"Cannot prune {n} of {total} heads.")
    flat = [(float(importance[l, h]), l, h) for l in range(len(per_layer)) for h in range(per_layer[l])]
    chosen, left = {}, dict(enumerate(per_layer))
    for _, layer, head in sorted(flat):
        if n == 0:
            break
        if left[layer] > 1:  # a layer's last head stays even if it ranks low
            chosen.setdefault(layer, []).append(head)
            left[layer] -= 1
            n -= 1
    if n:
        raise ValueError(f"Cannot prune that many heads while keeping one per layer ({n} left over).")
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def prune_heads(model, heads_to_prune: dict[int, list[int]]):
    """Physically remove heads ``{layer: [head, ...]}`` (indices into the layer's current heads).

    Returns (model, report). Records the kept heads in ``config.bertshrink_heads_per_layer``.
    """

    family, layers = family_of(model), encoder_layers(model)
    before = count_parameters(model)
    for layer_idx, heads in heads_to_prune.items():
        layer = layers[int(layer_idx)]
        n_heads, heads = head_count(family, layer), sorted(set(int(h) for h in heads))
        if any(not 0 <= h < n_heads for h in heads):
            raise ValueError(f"Layer {layer_idx} has {n_heads} heads; cannot prune {heads}.")
        if len(heads) >= n_heads:
            raise ValueError(f"Cannot prune all {n_heads} heads of layer {layer_idx}; keep at least one.")
        if heads:
            _remove_heads(family, layer, n_heads, heads)
    model.config.bertshrink_heads_per_layer = [head_count(family, layer) for layer in layers]
    return model, {"heads_per_layer": model.config.bertshrink_heads_per_layer,
                   "params_before": before, "params_after": count_parameters(model)}


def _remove_heads(family, layer, n_heads: int, heads: list[int]) -> None:
    """Cut ``heads`` out of one layer's projections (rows in, columns out)."""
    from transformers.pytorch_utils import prune_linear_layer

    size = head_size(family, layer)
    keep = torch.tensor([h * size + j for h in range(n_heads) if h not in heads for j in range(size)])
    if family.fused_qkv:  # [q; k; v] stacked: the same heads from each third
        fused = get_path(layer, family.fused_qkv)
        third = n_heads * size
        set_path(layer, family.fused_qkv, prune_linear_layer(fused, torch.cat([keep, keep + third, keep + 2 * third]), dim=0))
    for path in head_row_paths(family, layer):
        set_path(layer, path, prune_linear_layer(get_path(layer, path), keep, dim=0))
    set_path(layer, family.attention_output, prune_linear_layer(get_path(layer, family.attention_output), keep, dim=1))
    set_head_attributes(family, layer, n_heads - len(heads))


# --------------------------------------------------------------------------- feed-forward neurons


@contextmanager
def ffn_masks(model, masks: list[torch.Tensor]):
    """Multiply each layer's FFN activations (the input of its output projection) by ``masks[layer]``."""
    family = family_of(model)
    handles = [get_path(layer, family.ffn_out).register_forward_pre_hook(
                   lambda m, args, mask=mask: (args[0] * mask, *args[1:]))
               for layer, mask in zip(encoder_layers(model), masks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ffn_weight_norms(family, layer) -> torch.Tensor:
    """||input row(s)|| * ||output column|| per neuron: how much a neuron can contribute, data-free.
    A gated FFN (GLU) multiplies the value row's norm by the gate row's."""
    rows = get_path(layer, family.ffn_in).weight.norm(dim=1)
    width = ffn_width(family, layer)
    if family.ffn_gated:
        rows = rows[:width] * rows[width:]
    return rows * get_path(layer, family.ffn_out).weight.norm(dim=0)


def ffn_importance(model, batches: Iterable[dict] | None = None) -> list[torch.Tensor]:
    """Per-layer neuron scores: |d loss / d mask| over ``batches`` if given, else weight magnitude."""
    family, layers = family_of(model), encoder_layers(model)
    if batches is None:
        with torch.no_grad():
            return [_ffn_weight_norms(family, layer) for layer in layers]
    masks = [torch.ones(ffn_width(family, layer), requires_grad=True) for layer in layers]
    scores = [torch.zeros_like(m) for m in masks]
    was_training = model.training
    model.eval()
    try:
        with ffn_masks(model, masks):
            for batch in batches:
                grads = torch.autograd.grad(model(**batch).loss, masks)
                for score, grad in zip(scores, grads):
                    score += grad.abs().detach()
    finally:
        model.train(was_training)
    return scores


def ffn_keep_indices(importance: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Per layer, the sorted indices of the round((1-ratio)*width) most important neurons."""
    if not 0 <= ratio < 1:
        raise ValueError(f"FFN prune ratio must be in [0, 1), got {ratio}.")
    keep = []
    for scores in importance:
        n = max(1, round((1 - ratio) * len(scores)))
        keep.append(torch.sort(torch.argsort(scores, descending=True)[:n]).values)
    return keep


def prune_ffn(model, ratio: float, importance: list[torch.Tensor] | None = None, batches=None):
    """Remove ``ratio`` of each layer's FFN neurons (least important first). Returns (model, report)."""
    from transformers.pytorch_utils import prune_linear_layer

    before = count_parameters(model)
    importance = importance if importance is not None else ffn_importance(model, batches)
    family, layers = family_of(model), encoder_layers(model)
    for layer, keep in zip(layers, ffn_keep_indices(importance, ratio)):
        rows = torch.cat([keep, keep + ffn_width(family, layer)]) if family.ffn_gated else keep
        set_path(layer, family.ffn_in, prune_linear_layer(get_path(layer, family.ffn_in), rows, dim=0))
        set_path(layer, family.ffn_out, prune_linear_layer(get_path(layer, family.ffn_out), keep, dim=1))
    sizes = [ffn_width(family, layer) for layer in layers]
    model.config.bertshrink_intermediate_sizes = sizes
    if len(set(sizes)) == 1:
        setattr(model.config, family.ffn_width_key, sizes[0])
    return model, {"intermediate_sizes": sizes, "params_before": before, "params_after": count_parameters(model)}


# --------------------------------------------------------------------------- vocabulary


def prune_vocab(model, tokenizer, texts: Iterable[str], keep_tokens: Iterable[str] = (), output_dir=None):
    """Keep only the tokens ``texts`` use, plus special tokens, ``keep_tokens`` and what the
    tokenizer's algorithm needs to segment them as before (TextPruner).

    WordPiece, byte-level BPE and SentencePiece/Unigram tokenizers are supported (see
    ``compression.vocab``): the corpus segments exactly as before, into renumbered ids whose
    embedding rows are the old ones, so predictions on it are unchanged; only never-used rows go.
    Returns (model, tokenizer, report); saves both to ``output_dir`` if given.
    """
    old_ids = kept_token_ids(tokenizer, texts, keep_tokens)
    embeddings = model.get_input_embeddings()
    if old_ids[-1] >= embeddings.num_embeddings:
        raise ValueError(f"The tokenizer produces id {old_ids[-1]} but the model has only "
                         f"{embeddings.num_embeddings} embedding rows: tokenizer and model do not belong together.")
    new_ids = {old: new for new, old in enumerate(old_ids)}
    _check_positions_survive(model, new_ids)
    new_tokenizer = tokenizer_with_ids(tokenizer, old_ids)
    before = count_parameters(model)
    pad_id = new_ids.get(model.config.pad_token_id)
    model.set_input_embeddings(_embedding_rows(embeddings, old_ids, pad_id))
    model.config.vocab_size = len(old_ids)
    _renumber_config_token_ids(model.config, new_ids)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        new_tokenizer.save_pretrained(output_dir)
    # Embedding rows, not len(vocab): checkpoints often pad the matrix past the tokenizer's vocab.
    report = {"vocab_before": embeddings.num_embeddings, "vocab_after": len(old_ids),
              "params_before": before, "params_after": count_parameters(model)}
    return model, new_tokenizer, report


TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id",
                 "unk_token_id", "mask_token_id")


def _check_positions_survive(model, new_ids: dict[int, int]) -> None:
    """RoBERTa numbers positions from its pad id: if the pad id moved, every position would shift."""
    pad = model.config.pad_token_id
    if family_of(model).pad_sets_positions and pad is not None and new_ids.get(pad) != pad:
        raise ValueError(f"prune_vocab would move the pad token from id {pad} to {new_ids.get(pad)}, and "
                         f"{family_of(model).name} numbers positions from the pad id, so every prediction would "
                         "change. This tokenizer keeps ids below the pad id that the texts never use; "
                         "add them to keep_tokens, or drop prune_vocab from the recipe.")


def _renumber_config_token_ids(config, new_ids: dict[int, int]) -> None:
    """Special token ids the config records (pad, bos, cls, ...), in the new numbering."""
    for key in TOKEN_ID_KEYS:
        old = getattr(config, key, None)
        if isinstance(old, int) and old in new_ids:
            setattr(config, key, new_ids[old])


def _embedding_rows(embeddings, rows: list[int], pad_id: int | None):
    """A copy of ``embeddings`` holding only ``rows`` (a factorised table keeps its projection)."""
    table = embeddings.low if isinstance(embeddings, FactorizedEmbedding) else embeddings
    kept = nn.Embedding(len(rows), table.embedding_dim, padding_idx=pad_id,
                        device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        kept.weight.copy_(table.weight[torch.tensor(rows)])
    if not isinstance(embeddings, FactorizedEmbedding):
        return kept
    factored = FactorizedEmbedding(len(rows), table.embedding_dim, embeddings.embedding_dim)
    factored.to(table.weight.device, table.weight.dtype)
    factored.low, factored.proj = kept, embeddings.proj
    return factored


def factorize_embeddings(model, rank: int):
    """Replace word embeddings [V, H] by a rank-``rank`` SVD factorisation [V, r] @ [r, H] (ALBERT).

    Saves parameters when r < V*H / (V+H). Records ``config.bertshrink_embedding_rank``; load
    with ``structure.load_classifier``. Returns (model, report) with the relative error.
    """
    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, FactorizedEmbedding):
        raise ValueError("The word embeddings are already factorised.")
    weight = embeddings.weight.detach()
    vocab, hidden = weight.shape
    if not 0 < rank <= min(vocab, hidden):  # full rank is allowed: exact, but saves nothing
        raise ValueError(f"Rank must be between 1 and {min(vocab, hidden)}, got {rank}.")
    before = count_parameters(model)
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    factored = FactorizedEmbedding(vocab, rank, hidden).to(weight.device, weight.dtype)
    with torch.no_grad():
        # Split the singular values evenly so neither factor has an outsized scale.
        root = s[:rank].sqrt()
        factored.low.weight.copy_(u[:, :rank] * root)
        factored.proj.weight.copy_((root[:, None] * vh[:rank]).T)
        error = float((factored.low.weight @ factored.proj.weight.T - weight).norm() / weight.norm())
    model.set_input_embeddings(factored)
    model.config.bertshrink_embedding_rank = rank
    return model, {"rank": rank, "relative_error": error,
                   "params_before": before, "params_after": count_parameters(model)}


# --------------------------------------------------------------------------- unstructured


def encoder_linears(model) -> list[nn.Linear]:
    """The encoder's Linear layers (attention and FFN), the usual target of weight pruning."""
    return list(encoder_linear_modules(model).values())


def magnitude_prune(model, sparsity: float):
    """Zero the ``sparsity`` fraction of smallest-|w| encoder Linear weights, ranked globally.

    Weights stay dense tensors with zeros, so dense kernels run no faster and the file is no
    smaller unless compressed; this is for sparse runtimes or a sparsity/accuracy study.
    Returns (model, report) with the sparsity measured after pruning.
    """
    from torch.nn.utils import prune

    if not 0 <= sparsity < 1:
        raise ValueError(f"Sparsity must be in [0, 1), got {sparsity}.")
    linears = encoder_linears(model)
    params = [(m, "weight") for m in linears]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(sparsity))
    for module, name in params:
        prune.remove(module, name)  # bake the mask in: a plain dense weight again
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    return model, {"target_sparsity": sparsity, "measured_sparsity": zeros / total,
                   "pruned_weights": zeros, "encoder_linear_weights": total}
