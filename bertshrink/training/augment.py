"""TinyBERT's data augmentation: new unlabelled texts by swapping words for their neighbours.

Jiao et al. (2020) grow a task's training set ~20x by replacing each word, with probability
``replace_prob``, by one of its ``neighbours`` nearest words, then let the teacher label the new
texts. A small student then sees the teacher's function on many more inputs like the task's own
(on SST-2 the paper's 4-layer student loses ~3 points without it). The paper finds neighbours
with BERT's masked-LM head and GloVe; here they come from the teacher's own input embeddings
(cosine), so nothing is downloaded and any BERT-family teacher works. Only words that are one
whole word-piece are replaced; a word the tokenizer splits stays as it is.
"""

from __future__ import annotations

import random
import re

import torch

# A replaceable word: letters only (numbers, punctuation and names of pieces stay as they are).
_WORD = re.compile(r"^[^\W\d_]{2,}$")


def whole_word_ids(tokenizer, words: set[str]) -> dict[str, int]:
    """Each of ``words`` that the tokenizer keeps as one word-piece, with its id."""
    vocab = tokenizer.get_vocab()
    lower = getattr(tokenizer, "do_lower_case", False) or getattr(tokenizer, "init_kwargs", {}).get("do_lower_case")
    found = {}
    for word in words:
        key = word.lower() if lower else word
        if _WORD.match(key) and key in vocab:
            found[word] = vocab[key]
    return found


def candidate_ids(tokenizer) -> torch.Tensor:
    """Ids of the vocabulary's whole-word pieces (letters only, not special, not ``##`` pieces)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for piece, i in tokenizer.get_vocab().items() if _WORD.match(piece) and i not in special]
    return torch.tensor(sorted(ids), dtype=torch.long)


def embedding_neighbours(embeddings: torch.Tensor, query_ids: list[int], candidates: torch.Tensor, k: int,
                         chunk: int = 2048) -> dict[int, list[int]]:
    """For each query id, the ``k`` candidate ids nearest by cosine (itself excluded), nearest first."""
    table = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
    pool = table[candidates]
    out: dict[int, list[int]] = {}
    for start in range(0, len(query_ids), chunk):
        ids = query_ids[start:start + chunk]
        sims = table[torch.tensor(ids)] @ pool.T
        sims[candidates.unsqueeze(0) == torch.tensor(ids).unsqueeze(1)] = -2.0  # never a word for itself
        top = sims.topk(min(k, len(candidates) - 1), dim=-1).indices
        for row, qid in enumerate(ids):
            out[qid] = candidates[top[row]].tolist()
    return out


def augment_texts(texts: list[str], tokenizer, embeddings: torch.Tensor, *, copies: int, replace_prob: float,
                  neighbours: int, min_words: int, seed: int) -> list[str]:
    """Up to ``copies`` new texts per text of at least ``min_words`` words, each word swapped with
    probability ``replace_prob`` for one of its ``neighbours`` nearest; new texts that equal an
    input or each other are dropped. Texts are split on whitespace (pre-tokenized corpora such
    as GLUE's keep their spacing)."""
    chosen = [t.split() for t in texts if len(t.split()) >= min_words]
    if not chosen or copies == 0:
        return []
    ids = whole_word_ids(tokenizer, {w for words in chosen for w in words})
    near = embedding_neighbours(embeddings, sorted(set(ids.values())), candidate_ids(tokenizer), neighbours)
    piece = {i: p for p, i in tokenizer.get_vocab().items()}
    rng = random.Random(seed)
    seen, new = set(texts), []
    for words in chosen:
        for _ in range(copies):
            text = " ".join(_swap(w, ids, near, piece, replace_prob, rng) for w in words)
            if text not in seen:
                seen.add(text)
                new.append(text)
    return new


def _swap(word: str, ids: dict[str, int], near: dict[int, list[int]], piece: dict[int, str], p: float,
          rng: random.Random) -> str:
    if word not in ids or rng.random() >= p:
        return word
    return piece[rng.choice(near[ids[word]])]
