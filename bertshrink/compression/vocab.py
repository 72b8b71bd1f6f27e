"""Tokenizer-side vocabulary pruning (TextPruner) for the fast tokenizers of BERT-family models.

Works on the backend JSON of a transformers fast tokenizer (``backend_tokenizer.to_str()``) for its
three model types. Each keeps the corpus segmentation exactly; the argument is per type:

* WordPiece (BERT, DistilBERT, ELECTRA) is greedy longest-match-first. Every token it picked for the
  corpus is kept and no entry is added, so no longer match can appear: the corpus segments as before
  (a word that was [UNK] still cannot be segmented, so it stays [UNK]).
* BPE (RoBERTa, ModernBERT) starts from the word's symbols and applies, among the merges whose pair is
  adjacent, the one of lowest rank, until none applies. The kept tokens are closed under "a kept merge
  result keeps both its parts", so every merge applied in the original run is kept, and the kept
  merges are a subset in the same relative order. The symbols are the same (the base alphabet, every
  token no merge produces, is kept: the 256 byte symbols for byte-level BPE). At each step the
  applicable kept merges are a subset of the applicable original ones that contains the original
  winner, so the lowest-rank one is the same; when no original merge applies, no kept one does.
* Unigram / SentencePiece (ALBERT, XLM-RoBERTa, DeBERTa-v3) takes the best-scoring path (Viterbi).
  The kept pieces keep their scores and still hold the original best path. Any other path is a path
  of the original lattice (scoring no better) or passes an <unk> node where a dropped single-character
  piece was. <unk> scores min(score) - 10 over the vocabulary, so the lowest-scoring piece is kept:
  such a node scores below the piece it replaces, hence below the original path. Viterbi keeps the
  first strictly better candidate in position order, so ties resolve as before too.

``kept_token_ids`` picks the original ids to keep; ``tokenizer_with_ids`` builds the tokenizer whose
id i is the original ``kept_ids[i]``, so the caller takes the embedding rows ``kept_ids``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from itertools import islice
from typing import Iterable

from tokenizers import Tokenizer, models
from transformers import AutoTokenizer

CHUNK_SIZE = 512  # texts tokenized per batch: large corpora never sit in memory as ids
SUPPORTED_MODELS = ("WordPiece", "BPE", "Unigram")
# Tokenizer init kwargs that describe where the original vocabulary came from, not its behaviour;
# carried over they would rebuild (or save) the unpruned vocabulary.
_SOURCE_KWARGS = ("vocab", "merges", "vocab_file", "merges_file", "tokenizer_file", "tokenizer_object",
                  "added_tokens_decoder", "name_or_path", "is_local", "local_files_only")


# --------------------------------------------------------------------------- public


def kept_token_ids(tokenizer, texts: Iterable[str], keep_tokens: Iterable[str] = ()) -> list[int]:
    """Sorted ORIGINAL ids to keep: ids the texts tokenize to (with special tokens), all special/added
    tokens, keep_tokens (ValueError listing any not in the vocabulary), plus what the tokenizer's
    algorithm needs (BPE merge parents, base alphabet; Unigram unk and lowest-scoring piece)."""
    spec = _backend_spec(tokenizer)
    kept = _keep_token_ids(tokenizer, keep_tokens) | _required_ids(tokenizer, spec)  # fails before the long pass
    kept |= _used_ids(tokenizer, texts)
    if spec["model"]["type"] == "BPE":
        kept = _closed_under_merges(kept, spec)
    return sorted(kept)


def tokenizer_with_ids(tokenizer, kept_ids: list[int]):
    """A new tokenizer of the same class and settings whose id i is the original kept_ids[i]
    (kept_ids sorted ascending so the relative order, specials first, is kept). Same special tokens,
    same model_max_length, same lower-casing/normalizer/pre-tokenizer/decoder behaviour.

    Refuses (ValueError) ids that would change segmentation: a missing special/added token or
    algorithm requirement, or a BPE token kept without the parts its merge needs.
    """
    spec = _backend_spec(tokenizer)
    kept_ids = _checked_kept_ids(tokenizer, spec, kept_ids)
    new_id = {old: new for new, old in enumerate(kept_ids)}
    pruned_spec = _pruned_spec(spec, new_id)
    backend = Tokenizer.from_str(json.dumps(pruned_spec))
    _check_ids_point_to_same_tokens(tokenizer, backend, kept_ids)
    pruned = _same_kind_tokenizer(tokenizer, backend, new_id)
    _set_exact_unigram_scores(pruned, pruned_spec)
    _check_backend_as_built(tokenizer, pruned, pruned_spec)
    _check_reloads_identically(tokenizer, pruned)
    return pruned


# --------------------------------------------------------------------------- reading the backend


def _name(tokenizer) -> str:
    """The tokenizer as error messages name it: class and where it was loaded from."""
    path = getattr(tokenizer, "name_or_path", "")
    return f"{type(tokenizer).__name__}({path!r})" if path else type(tokenizer).__name__


def _backend_spec(tokenizer) -> dict:
    """The backend JSON, refused unless its model type is one whose pruning we can prove exact."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{_name(tokenizer)} has no fast (tokenizers) backend: vocabulary pruning edits "
                         "tokenizer.json, so load the tokenizer with its fast class (use_fast=True)")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    kind = model.get("type")
    if kind not in SUPPORTED_MODELS:
        raise ValueError(f"{_name(tokenizer)} has a {kind} backend model; vocabulary pruning keeps "
                         f"segmentation identical only for {', '.join(SUPPORTED_MODELS)}")
    if kind == "BPE" and model.get("dropout"):
        raise ValueError(f"{_name(tokenizer)} uses BPE dropout {model['dropout']}: its segmentation is "
                         "random, so no pruned vocabulary can reproduce it")
    if kind == "Unigram" and model.get("unk_id") is None:
        raise ValueError(f"{_name(tokenizer)} has a Unigram model without unk_id: where a dropped piece "
                         "leaves a character uncovered, encoding would fail instead of giving <unk>")
    return spec


def _model_vocab(model: dict) -> dict[str, int]:
    """token -> id of the backend model (Unigram stores a [piece, score] list in id order)."""
    if model["type"] == "Unigram":
        return {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    return dict(model["vocab"])


def _all_token_ids(spec: dict) -> dict[int, str]:
    """id -> token over the model vocabulary and the added tokens."""
    id_to_token = {i: token for token, i in _model_vocab(spec["model"]).items()}
    id_to_token.update((added["id"], added["content"]) for added in spec["added_tokens"])
    return id_to_token


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """BPE merges as pairs; older files store them as "a b" strings."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _merge_result(model: dict, a: str, b: str) -> str:
    """The token a merge produces: tokenizers drops the continuing-subword prefix of the right part."""
    prefix = model.get("continuing_subword_prefix") or ""
    if b.startswith(prefix):
        return a + b[len(prefix):]
    return a + b.encode()[len(prefix.encode()):].decode("utf-8", "replace")  # byte slicing, as in Rust


# --------------------------------------------------------------------------- which ids to keep


def _chunks(items: Iterable, size: int):
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _used_ids(tokenizer, texts: Iterable[str]) -> set[int]:
    """Every id the texts tokenize to, special tokens included, untruncated."""
    used: set[int] = set()
    for chunk in _chunks(texts, CHUNK_SIZE):
        # verbose=False: long texts would warn about model_max_length, which is irrelevant here
        encoded = tokenizer(chunk, add_special_tokens=True, truncation=False, padding=False, verbose=False)
        for ids in encoded["input_ids"]:
            used.update(ids)
    return used


def _keep_token_ids(tokenizer, keep_tokens: Iterable[str]) -> set[int]:
    vocab = tokenizer.get_vocab()
    keep_tokens = list(keep_tokens)
    missing = [token for token in keep_tokens if token not in vocab]
    if missing:
        raise ValueError(f"keep_tokens not in the vocabulary of {_name(tokenizer)}: {missing}")
    return {vocab[token] for token in keep_tokens}


def _required_ids(tokenizer, spec: dict) -> set[int]:
    """Ids kept whatever the corpus: special and added tokens, the ids the post-processor and padding
    insert, and what the model type needs (see the module docstring)."""
    required = set(tokenizer.all_special_ids) | {added["id"] for added in spec["added_tokens"]}
    required |= set(_post_processor_ids(spec.get("post_processor")))
    if spec.get("padding"):
        required.add(spec["padding"]["pad_id"])
    model = spec["model"]
    if model["type"] == "Unigram":
        return required | _unigram_required(model)
    vocab = model["vocab"]
    if model.get("unk_token") in vocab:
        required.add(vocab[model["unk_token"]])
    if model["type"] == "BPE":
        required |= _bpe_alphabet(model)
    return required


def _unigram_required(model: dict) -> set[int]:
    """unk, byte-fallback pieces, and the lowest-scoring piece (it fixes the <unk> score)."""
    pieces = model["vocab"]
    required = {min(range(len(pieces)), key=lambda i: pieces[i][1])}
    if model.get("unk_id") is not None:
        required.add(model["unk_id"])
    if model.get("byte_fallback"):
        byte_pieces = {f"<0x{b:02X}>" for b in range(256)}
        required |= {i for i, (piece, _score) in enumerate(pieces) if piece in byte_pieces}
    return required


def _bpe_alphabet(model: dict) -> set[int]:
    """Tokens no merge produces: the initial symbols (bytes, characters, byte-fallback pieces)."""
    produced = {_merge_result(model, a, b) for a, b in _merge_pairs(model)}
    return {i for token, i in model["vocab"].items() if token not in produced}


def _merge_parents(model: dict) -> dict[str, list[tuple[str, str]]]:
    """result token -> the merges producing it (usually one; several are allowed)."""
    parents: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merge_pairs(model):
        parents.setdefault(_merge_result(model, a, b), []).append((a, b))
    return parents


def _closed_under_merges(kept: set[int], spec: dict) -> set[int]:
    """``kept`` plus, recursively, both parts of every merge whose result is kept."""
    model = spec["model"]
    vocab, parents = model["vocab"], _merge_parents(model)
    id_to_token = _all_token_ids(spec)
    closed, todo = set(kept), [id_to_token[i] for i in kept]
    while todo:
        for a, b in parents.get(todo.pop(), ()):
            for part in (a, b):
                if vocab[part] not in closed:
                    closed.add(vocab[part])
                    todo.append(part)
    return closed


def _checked_kept_ids(tokenizer, spec: dict, kept_ids) -> list[int]:
    """kept_ids as a list, refused unless sorted, valid and containing all that pruning needs."""
    kept_ids = [int(i) for i in kept_ids]
    if any(b <= a for a, b in zip(kept_ids, kept_ids[1:])):
        raise ValueError(f"kept_ids for {_name(tokenizer)} must be strictly ascending (original order)")
    unknown = sorted(set(kept_ids) - set(_all_token_ids(spec)))
    if unknown:
        raise ValueError(f"kept_ids not in the vocabulary of {_name(tokenizer)}: {unknown[:20]}")
    missing = sorted(_required_ids(tokenizer, spec) - set(kept_ids))
    if spec["model"]["type"] == "BPE":
        missing = sorted(set(missing) | (_closed_under_merges(set(kept_ids), spec) - set(kept_ids)))
    if missing:
        id_to_token = _all_token_ids(spec)
        raise ValueError(f"kept_ids for {_name(tokenizer)} lack tokens that segmentation needs (special/added "
                         f"tokens, BPE merge parts and alphabet, Unigram unk/lowest-score piece): "
                         f"{[id_to_token[i] for i in missing[:20]]}{' ...' if len(missing) > 20 else ''}; "
                         "use kept_token_ids")
    return kept_ids


# --------------------------------------------------------------------------- building the pruned JSON


def _pruned_spec(spec: dict, new_id: dict[int, int]) -> dict:
    """The backend JSON with only the kept ids, renumbered, and every id it carries remapped."""
    pruned = copy.deepcopy(spec)
    pruned["model"] = _pruned_model(spec["model"], new_id)
    for added in pruned["added_tokens"]:
        added["id"] = new_id[added["id"]]
    pruned["post_processor"] = _map_post_processor_ids(spec.get("post_processor"), new_id.__getitem__)
    if pruned.get("padding"):
        pruned["padding"]["pad_id"] = new_id[pruned["padding"]["pad_id"]]
    return pruned


def _pruned_model(model: dict, new_id: dict[int, int]) -> dict:
    pruned = dict(model)
    if model["type"] == "Unigram":
        pruned["vocab"] = [piece for i, piece in enumerate(model["vocab"]) if i in new_id]  # scores kept
        if model.get("unk_id") is not None:
            pruned["unk_id"] = new_id[model["unk_id"]]
        return pruned
    pruned["vocab"] = {token: new_id[i] for token, i in model["vocab"].items() if i in new_id}
    if model["type"] == "BPE":
        kept = pruned["vocab"]
        # Same relative order: ranks are compared, never used as ids (see the module docstring).
        pruned["merges"] = [merge for merge, (a, b) in zip(model["merges"], _merge_pairs(model))
                            if a in kept and b in kept and _merge_result(model, a, b) in kept]
    return pruned


def _map_post_processor_ids(processor: dict | None, new_id) -> dict | None:
    """A copy of the post-processor JSON with ``new_id`` applied to every token id it inserts."""
    if processor is None:
        return None
    processor = copy.deepcopy(processor)
    kind = processor["type"]
    if kind == "Sequence":
        processor["processors"] = [_map_post_processor_ids(p, new_id) for p in processor["processors"]]
    elif kind == "TemplateProcessing":
        for special in processor["special_tokens"].values():
            special["ids"] = [new_id(i) for i in special["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            token, old = processor[key]
            processor[key] = [token, new_id(old)]
    elif kind != "ByteLevel":  # ByteLevel only fixes offsets
        raise ValueError(f"unknown post-processor {kind}: cannot tell which token ids it inserts")
    return processor


def _post_processor_ids(processor: dict | None) -> list[int]:
    seen: list[int] = []
    _map_post_processor_ids(processor, lambda i: seen.append(i) or i)
    return seen


# --------------------------------------------------------------------------- the transformers tokenizer


def _same_kind_tokenizer(tokenizer, backend: Tokenizer, new_id: dict[int, int]):
    """``type(tokenizer)`` around the pruned backend, with the original's settings and special tokens.

    Built from ``tokenizer_object``, never from vocab files: nothing of the original vocabulary is
    carried, so saving writes only tokenizer.json + tokenizer_config.json and reloading reads the
    pruned tokenizer.json (transformers 5 prefers it over any vocab.txt / merges.txt / spiece.model).
    """
    kwargs = {k: v for k, v in tokenizer.init_kwargs.items() if k not in _SOURCE_KWARGS}
    kwargs.update({attr: getattr(tokenizer, attr) for attr in tokenizer.SPECIAL_TOKENS_ATTRIBUTES
                   if getattr(tokenizer, attr, None) is not None})
    kwargs["added_tokens_decoder"] = {new_id[i]: token for i, token in tokenizer.added_tokens_decoder.items()}
    # Settings that may have been changed after loading; as kwargs they are also saved in the config.
    kwargs.update(model_max_length=tokenizer.model_max_length, padding_side=tokenizer.padding_side,
                  truncation_side=tokenizer.truncation_side, model_input_names=list(tokenizer.model_input_names))
    if kwargs.get("unk_id") is not None:  # DeBERTa-v2 saves the Unigram unk id in its config
        kwargs["unk_id"] = new_id[kwargs["unk_id"]]
    return type(tokenizer)(tokenizer_object=backend, **kwargs)


def _set_exact_unigram_scores(pruned, pruned_spec: dict) -> None:
    """Give the Unigram model the original scores bit for bit. tokenizers' JSON parser may move a
    score by one ulp (from_str, and the deepcopy transformers makes of tokenizer_object), which could
    flip a near-tie in Viterbi; Python's json, which read the scores here, is exact."""
    model = pruned_spec["model"]
    if model["type"] == "Unigram":
        pieces = [(piece, score) for piece, score in model["vocab"]]
        pruned.backend_tokenizer.model = models.Unigram(pieces, model.get("unk_id"), model.get("byte_fallback", False))


def _check_ids_point_to_same_tokens(tokenizer, backend: Tokenizer, kept_ids: list[int]) -> None:
    """New id i must be the original kept_ids[i]: the caller copies embedding rows by this."""
    old = tokenizer.backend_tokenizer
    if backend.get_vocab_size(with_added_tokens=True) != len(kept_ids):
        raise ValueError(f"{_name(tokenizer)}: the pruned backend has {backend.get_vocab_size(True)} ids, "
                         f"expected {len(kept_ids)} (ids of added tokens are not contiguous after the vocabulary)")
    wrong = [old_id for new, old_id in enumerate(kept_ids) if backend.id_to_token(new) != old.id_to_token(old_id)]
    if wrong:
        raise ValueError(f"{_name(tokenizer)}: pruned ids do not keep the original order for tokens "
                         f"{[old.id_to_token(i) for i in wrong[:20]]}")


def _check_backend_as_built(tokenizer, pruned, pruned_spec: dict) -> None:
    """The tokenizer class may rebuild parts of the backend (BERT rebuilds its post-processor);
    that is fine only when it rebuilds them exactly as pruned."""
    differing = _differing_parts(json.dumps(pruned_spec), pruned.backend_tokenizer.to_str())
    if differing:
        raise ValueError(f"{_name(tokenizer)}: {type(tokenizer).__name__} rebuilds {differing} of the pruned "
                         "tokenizer differently from the original's; the original was not built the way "
                         "its class builds it (wrap its backend in PreTrainedTokenizerFast instead)")


def _check_reloads_identically(tokenizer, pruned) -> None:
    """save_pretrained + AutoTokenizer.from_pretrained must give the same tokenizer back: some classes
    rebuild their pipeline from settings and hard-coded ids (ALBERT's unk id 1) on loading."""
    with tempfile.TemporaryDirectory() as folder:
        pruned.save_pretrained(folder)
        reloaded = AutoTokenizer.from_pretrained(folder)
    differing = _differing_parts(pruned.backend_tokenizer.to_str(), reloaded.backend_tokenizer.to_str())
    if type(reloaded) is not type(pruned):
        differing.append(f"class {type(reloaded).__name__}")
    if reloaded.all_special_ids != pruned.all_special_ids or reloaded.all_special_tokens != pruned.all_special_tokens:
        differing.append("special tokens")
    if differing:
        raise ValueError(f"{_name(tokenizer)}: the pruned tokenizer would not reload identically "
                         f"(differs in {differing} after save_pretrained + AutoTokenizer.from_pretrained)")


def _differing_parts(expected: str, actual: str) -> list[str]:
    """Top-level parts of two backend JSONs that differ (padding/truncation are per-call state).

    Both sides pass once through tokenizers' own parser, as any tokenizer.json loaded by
    ``Tokenizer.from_file`` does: it may move a Unigram score by one ulp, the same for both.
    """
    expected, actual = (json.loads(Tokenizer.from_str(side).to_str()) for side in (expected, actual))
    return [key for key in sorted(set(expected) | set(actual))
            if key not in ("padding", "truncation") and expected.get(key) != actual.get(key)]
