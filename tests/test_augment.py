"""TinyBERT's augmentation: neighbours from the teacher's embeddings, and the texts they make."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizerFast

from bertshrink.training.augment import augment_texts, candidate_ids, embedding_neighbours, whole_word_ids

# Hand-placed embeddings: good~great, film~movie; the special tokens and the "##s" piece sit right on
# top of "good" and "film", so any neighbour search that let them in would pick them first.
VECTORS = {
    "[PAD]": (1.0, 0.0, 0.0), "[UNK]": (1.0, 0.0, 0.0), "[CLS]": (0.0, 1.0, 0.0), "[SEP]": (0.0, 1.0, 0.0),
    "[MASK]": (1.0, 0.0, 0.0), "##s": (0.0, 1.0, 0.0),
    "good": (1.0, 0.0, 0.0), "great": (0.9, 0.1, 0.0), "bad": (-1.0, 0.2, 0.0),
    "film": (0.0, 1.0, 0.0), "movie": (0.0, 0.95, 0.1), "the": (0.1, 0.0, 1.0), "42": (0.0, 0.0, 1.0),
}


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(VECTORS)}, do_lower_case=True)


@pytest.fixture(scope="module")
def embeddings():
    return torch.tensor(list(VECTORS.values()))


def _ids(tokenizer, *words):
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in words]


def test_candidates_are_whole_words_only(tokenizer):
    names = {p for p, i in tokenizer.get_vocab().items() if i in set(candidate_ids(tokenizer).tolist())}
    assert names == {"good", "great", "bad", "film", "movie", "the"}  # no specials, pieces or numbers


def test_neighbours_are_nearest_by_cosine_and_never_the_word_itself(tokenizer, embeddings):
    good, great, bad, film, movie, the = _ids(tokenizer, "good", "great", "bad", "film", "movie", "the")
    near = embedding_neighbours(embeddings, [good, film], candidate_ids(tokenizer), k=2)
    assert near[good] == [great, the]         # cos 0.99, then 0.10 (film and movie: 0)
    assert near[film][0] == movie
    assert bad not in near[good]               # cos -0.98: the farthest


def test_whole_word_ids_lowercase_and_skip_unknown_or_split_words(tokenizer):
    found = whole_word_ids(tokenizer, {"Good", "film", "films", "zzz", "42"})
    assert found == {"Good": tokenizer.get_vocab()["good"], "film": tokenizer.get_vocab()["film"]}


def test_every_word_swapped_for_its_nearest_at_probability_one(tokenizer, embeddings):
    texts = ["good film", "zzz good film", "bad", "great movie ."]
    new = augment_texts(texts, tokenizer, embeddings, copies=3, replace_prob=1.0, neighbours=1, min_words=2, seed=0)
    # "good film" -> "great movie" and "great movie ." -> "good film ." ("." is no word), "bad" is too
    # short; three copies of one outcome are one text; "zzz" is not in the vocabulary and stays.
    assert new == ["great movie", "zzz great movie", "good film ."]
    assert augment_texts(["great movie", "good film"], tokenizer, embeddings, copies=1, replace_prob=1.0,
                         neighbours=1, min_words=1, seed=0) == []  # each equals an input: nothing new


def test_swap_rate_follows_replace_prob_and_seed_fixes_the_texts(tokenizer, embeddings):
    text = " ".join(["good", "film", "the"] * 100)
    kw = dict(copies=1, neighbours=1, min_words=1)
    new = augment_texts([text], tokenizer, embeddings, replace_prob=0.4, seed=3, **kw)[0].split()
    swapped = sum(a != b for a, b in zip(text.split(), new))
    assert 90 <= swapped <= 150                 # 300 words at p 0.4: 120 expected, sd 8.5
    assert augment_texts([text], tokenizer, embeddings, replace_prob=0.4, seed=3, **kw)[0].split() == new
    assert augment_texts([text], tokenizer, embeddings, replace_prob=0.4, seed=4, **kw)[0].split() != new
