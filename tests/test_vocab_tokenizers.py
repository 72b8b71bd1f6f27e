"""Tokenizer-side vocabulary pruning (compression.vocab) on WordPiece, byte-level BPE and Unigram
tokenizers trained here on a small corpus (no downloads).

Each kind is wrapped two ways: in its model class built from vocab (+ merges) as transformers 5's
``from_pretrained`` builds it from a tokenizer.json (BertTokenizer, RobertaTokenizer, AlbertTokenizer),
and as a plain ``PreTrainedTokenizerFast`` around the trained backend (ModernBERT's way).
"""

from __future__ import annotations

import json
import os
import re

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AlbertTokenizer, AutoTokenizer, BertTokenizer, PreTrainedTokenizerFast, RobertaTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from bertshrink.compression.vocab import kept_token_ids, tokenizer_with_ids

PRUNE_TEXTS = [
    "The central bank raised interest rates again this quarter.",
    "Shares of the company fell after the profit warning.",
    "Investors expect inflation to slow down next year.",
    "The striker scored twice in the second half.",
    "Our team lost the final match on penalties.",
    "The coach praised the defenders after the game.",
    "A new film by the famous director opens on Friday.",
    "The actress won an award for her leading role.",
    "Critics called the movie a bold and moving drama.",
    "Tokenizers split text into smaller pieces called tokens.",
    "The market rallied when the trade talks resumed.",
    "Oil prices climbed to their highest level in months.",
    "The league announced a new schedule for the season.",
    "Fans cheered as the players walked onto the pitch.",
    "The studio released the trailer for the sequel.",
    "Analysts warned that growth could weaken further.",
    "The goalkeeper saved a penalty in the last minute.",
    "Audiences loved the music and the costumes of the show.",
    "Banks reported higher earnings than analysts expected.",
    "The champions celebrated their victory in the city.",
    "The festival screened films from many countries.",
    "Unemployment fell to its lowest level in a decade.",
    "The referee showed a red card to the captain.",
    "Newer, lower, wider: the newest model is the widest.",
]
HELD_OUT_WORDS = ["zebra", "giraffe", "elephant"]  # whole tokens in all three kinds
HELD_OUT_TEXTS = [
    "The zebra and the giraffe live at the zoo.",
    "An elephant walked past the kangaroo and the zebra.",
    "The giraffe ate leaves while the elephant drank water.",
    "A kangaroo jumped over the zebra near the giraffe.",
    "The elephant, the giraffe, the zebra and the kangaroo slept.",
]
CORPUS = (PRUNE_TEXTS + HELD_OUT_TEXTS * 3) * 2  # the animal words become whole tokens
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
UNUSED = [f"[unused{i}]" for i in range(10)]  # BERT's plain vocabulary rows between [PAD] and [UNK]
# Where the specials sit, as in the real checkpoints, so that pruning really moves ids:
# BERT: [PAD] 0, [unused*], [UNK] [CLS] [SEP] [MASK] -> after pruning 0..4.
# RoBERTa: <s> <pad> </s> <unk> first, <mask> last. The "generic" BPE (ModernBERT-like) appends
# <s> </s> <mask> as added tokens after the vocabulary. ALBERT-like Unigram: <pad> <unk> [CLS] [SEP]
# first, [MASK] last (DeBERTa-v3 appends its [MASK] too).
# The word-initial marker of each kind: a held-out word is one token, this prefix + word.
WORD_START = {"wordpiece": "", "bpe": "\u0120", "unigram": "\u2581"}
MAX_LENGTH = 64
CASES = [(kind, wrapper) for kind in ("wordpiece", "bpe", "unigram") for wrapper in ("class", "generic")]


def _train(backend: Tokenizer, trainer) -> Tokenizer:
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def wordpiece_vocab() -> dict[str, int]:
    """A trained WordPiece vocabulary laid out as BERT's: [PAD], [unused0-9], [UNK], [CLS], ..."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    _train(backend, trainers.WordPieceTrainer(vocab_size=400, special_tokens=BERT_SPECIALS, show_progress=False))
    trained = backend.get_vocab()
    tokens = ["[PAD]"] + UNUSED + sorted(set(trained) - {"[PAD]"}, key=trained.get)
    return {token: i for i, token in enumerate(tokens)}


def wordpiece_backend(vocab: dict[str, int]) -> Tokenizer:
    """BERT's pipeline: lower-casing BertNormalizer, BertPreTokenizer, "[CLS] $A [SEP]"."""
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.add_special_tokens(BERT_SPECIALS)
    return backend


def bpe_backend(specials: list[str]) -> Tokenizer:
    """RoBERTa's pipeline: byte-level BPE over all 256 byte symbols (post-processor set by the caller)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return _train(backend, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))


def unigram_backend() -> Tokenizer:
    """A SentencePiece-style Unigram with Metaspace and ALBERT's specials and template ([MASK] added later)."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    _train(backend, trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "<unk>", "[CLS]", "[SEP]"],
                                            unk_token="<unk>", show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return backend


def class_tokenizer(kind: str):
    """The model class built from vocab (+ merges), as transformers 5 loads a tokenizer.json."""
    if kind == "wordpiece":
        return BertTokenizer(vocab=wordpiece_vocab(), model_max_length=MAX_LENGTH)
    if kind == "bpe":
        backend = bpe_backend(["<s>", "<pad>", "</s>", "<unk>"])
        vocab = backend.get_vocab()
        vocab["<mask>"] = len(vocab)
        merges = [tuple(m) for m in json.loads(backend.to_str())["model"]["merges"]]
        return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    pieces = [tuple(piece) for piece in json.loads(unigram_backend().to_str())["model"]["vocab"]]
    return AlbertTokenizer(vocab=pieces + [("[MASK]", 0.0)], model_max_length=MAX_LENGTH)


def generic_tokenizer(kind: str):
    """A PreTrainedTokenizerFast around the backend, specials appended as added tokens where noted."""
    if kind == "wordpiece":
        return PreTrainedTokenizerFast(tokenizer_object=wordpiece_backend(wordpiece_vocab()), unk_token="[UNK]",
                                       pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       model_max_length=MAX_LENGTH)
    if kind == "bpe":
        backend = bpe_backend(["<pad>", "<unk>"])
        backend.add_special_tokens(["<s>", "</s>", "<mask>"])  # after the vocabulary
        backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                              ("<s>", backend.token_to_id("<s>")))
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                       model_input_names=["input_ids", "attention_mask"], model_max_length=MAX_LENGTH)
    backend = unigram_backend()
    backend.add_special_tokens(["[MASK]"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LENGTH)


def original_tokenizer(kind: str, wrapper: str):
    """A fresh tokenizer of ``kind`` ('wordpiece', 'bpe', 'unigram'), wrapped as 'class' or 'generic'."""
    return class_tokenizer(kind) if wrapper == "class" else generic_tokenizer(kind)


def known_special_ids(kind: str, wrapper: str, size: int, pruned: bool) -> dict[str, int]:
    """cls/sep/pad/mask ids of a tokenizer of ``size`` ids, from the layouts above (pruned: no [unused])."""
    if kind == "wordpiece":
        unused = 0 if pruned else len(UNUSED)
        return {"pad": 0, "cls": 2 + unused, "sep": 3 + unused, "mask": 4 + unused}
    if kind == "bpe" and wrapper == "generic":
        return {"pad": 0, "cls": size - 3, "sep": size - 2, "mask": size - 1}
    if kind == "bpe":
        return {"pad": 1, "cls": 0, "sep": 2, "mask": size - 1}
    return {"pad": 0, "cls": 2, "sep": 3, "mask": size - 1}


@pytest.fixture(params=CASES, ids=[f"{kind}-{wrapper}" for kind, wrapper in CASES])
def case(request):
    """(kind, wrapper, original tokenizer, kept ids for PRUNE_TEXTS, pruned tokenizer)."""
    kind, wrapper = request.param
    old = original_tokenizer(kind, wrapper)
    kept = kept_token_ids(old, PRUNE_TEXTS)
    return kind, wrapper, old, kept, tokenizer_with_ids(old, kept)


def remapped(rows, kept: list[int]):
    index = {old: new for new, old in enumerate(kept)}
    return [[index[i] for i in row] for row in rows]


def assert_same_encoding(old, new, kept, *args, **kwargs):
    """``new`` encodes as ``old`` with every id replaced by its position in ``kept``."""
    before, after = old(*args, **kwargs), new(*args, **kwargs)
    assert set(after) == set(before)
    assert after["input_ids"] == remapped(before["input_ids"], kept)
    for key in set(before) - {"input_ids"}:
        assert after[key] == before[key], key


# --------------------------------------------------------------------------- all three kinds


def test_vocabulary_shrinks_and_held_out_words_go(case):
    kind, _wrapper, old, kept, new = case
    assert len(new) == len(kept) == new.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    for word in HELD_OUT_WORDS:
        token = WORD_START[kind] + word
        assert old.tokenize(f"the {word}")[-1:] == [token]  # one whole token in the original ...
        assert token not in new.get_vocab()  # ... that only the held-out texts use
    assert len(new) <= len(old) - len(HELD_OUT_WORDS)


def test_wordpiece_keeps_exactly_the_used_tokens():
    old = original_tokenizer("wordpiece", "class")
    used = {token for text in PRUNE_TEXTS for token in old.tokenize(text)} | set(BERT_SPECIALS)
    new = tokenizer_with_ids(old, kept_token_ids(old, PRUNE_TEXTS))
    assert set(new.get_vocab()) == used
    assert len(new) < len(old)


def test_corpus_ids_are_the_remapped_original_ids(case):
    _kind, _wrapper, old, kept, new = case
    assert_same_encoding(old, new, kept, PRUNE_TEXTS, padding=True)
    assert_same_encoding(old, new, kept, PRUNE_TEXTS, padding="max_length", truncation=True, max_length=8)
    assert_same_encoding(old, new, kept, PRUNE_TEXTS[:-1], PRUNE_TEXTS[1:], padding=True, truncation=True,
                         max_length=20)
    for text in PRUNE_TEXTS:
        assert new(text)["input_ids"] == remapped([old(text)["input_ids"]], kept)[0]


def test_decode_gives_the_same_text(case):
    _kind, _wrapper, old, _kept, new = case
    for text in PRUNE_TEXTS:
        for skip in (False, True):
            assert new.decode(new(text)["input_ids"], skip_special_tokens=skip) == \
                old.decode(old(text)["input_ids"], skip_special_tokens=skip)


def test_special_tokens_and_settings_carry_over(case):
    kind, wrapper, old, kept, new = case
    assert type(new) is type(old)
    for tokenizer, pruned in ((old, False), (new, True)):  # the known layouts, before and after
        known = known_special_ids(kind, wrapper, len(tokenizer), pruned)
        assert {name: getattr(tokenizer, f"{name}_token_id") for name in known} == known
        assert tokenizer("goal")["input_ids"][0] == known["cls"]
        assert tokenizer("goal")["input_ids"][-1] == known["sep"]
    assert old.cls_token_id != new.cls_token_id or old.mask_token_id != new.mask_token_id  # ids did move
    for attr in old.SPECIAL_TOKENS_ATTRIBUTES:
        assert str(getattr(new, attr)) == str(getattr(old, attr)), attr
        if getattr(old, attr) is not None:
            assert getattr(new, f"{attr}_id") == kept.index(getattr(old, f"{attr}_id")), attr
    assert new.all_special_tokens == old.all_special_tokens
    assert new.all_special_ids == [kept.index(i) for i in old.all_special_ids]
    assert new.model_max_length == old.model_max_length == MAX_LENGTH
    assert new.model_input_names == old.model_input_names
    assert json.loads(new.backend_tokenizer.to_str())["normalizer"] == \
        json.loads(old.backend_tokenizer.to_str())["normalizer"]


def test_settings_changed_after_loading_carry_over_and_reload(tmp_path):
    old = original_tokenizer("wordpiece", "class")
    old.model_max_length, old.padding_side, old.truncation_side = 48, "left", "left"
    old.model_input_names = ["input_ids", "attention_mask"]  # BERT's default has token_type_ids too
    kept = kept_token_ids(old, PRUNE_TEXTS)
    new = tokenizer_with_ids(old, kept)
    new.save_pretrained(tmp_path)
    for tokenizer in (new, AutoTokenizer.from_pretrained(tmp_path)):
        assert (tokenizer.model_max_length, tokenizer.padding_side, tokenizer.truncation_side) == (48, "left", "left")
        assert tokenizer.model_input_names == ["input_ids", "attention_mask"]
        assert_same_encoding(old, tokenizer, kept, PRUNE_TEXTS, padding=True, truncation=True, max_length=9)


def test_save_and_reload_reproduces_the_pruned_tokenizer(case, tmp_path):
    _kind, _wrapper, old, _kept, new = case
    new.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    # Stale vocabulary files of the original, as if the folder had been copied from it: ignored.
    vocab = old.get_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = json.loads(old.backend_tokenizer.to_str())["model"].get("merges", [])
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")
    (tmp_path / "spiece.model").write_bytes(b"stale, and no SentencePiece model at all")
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is type(new)
    assert reloaded.get_vocab() == new.get_vocab()
    assert reloaded.all_special_ids == new.all_special_ids
    assert reloaded.model_max_length == MAX_LENGTH
    for kwargs in ({"padding": True}, {"padding": "max_length", "truncation": True, "max_length": 8}):
        assert dict(reloaded(PRUNE_TEXTS, **kwargs)) == dict(new(PRUNE_TEXTS, **kwargs))
    assert [reloaded.decode(ids) for ids in reloaded(PRUNE_TEXTS)["input_ids"]] == \
        [new.decode(ids) for ids in new(PRUNE_TEXTS)["input_ids"]]


def test_keep_tokens_keeps_an_unused_token_and_names_unknown_ones(case):
    kind, _wrapper, old, _kept, _new = case
    token = WORD_START[kind] + "zebra"
    kept = kept_token_ids(old, PRUNE_TEXTS, keep_tokens=[token])
    new = tokenizer_with_ids(old, kept)
    assert new.convert_tokens_to_ids(token) == kept.index(old.convert_tokens_to_ids(token))
    assert new.convert_ids_to_tokens(kept.index(old.convert_tokens_to_ids(token))) == token
    with pytest.raises(ValueError, match="qqxyzzy"):
        kept_token_ids(old, PRUNE_TEXTS, keep_tokens=[token, "qqxyzzy"])


def test_texts_are_read_in_chunks_from_any_iterable():
    old = original_tokenizer("wordpiece", "generic")
    # A generator over three chunks of 512: the first holds only one sentence, the last the others.
    many = (PRUNE_TEXTS[0] if i < 1100 else PRUNE_TEXTS[i % len(PRUNE_TEXTS)] for i in range(1300))
    assert kept_token_ids(old, many) == kept_token_ids(old, PRUNE_TEXTS)


# --------------------------------------------------------------------------- byte-level BPE


@pytest.mark.parametrize("wrapper", ["class", "generic"])
def test_bpe_keeps_intermediate_merge_tokens(wrapper):
    """A used token is built through merges whose parts no output uses; they must stay, with the merge."""
    old = original_tokenizer("bpe", wrapper)
    model = json.loads(old.backend_tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) for m in model["merges"]]
    used = {i for ids in old(PRUNE_TEXTS)["input_ids"] for i in ids}
    used_tokens = {old.convert_ids_to_tokens(i) for i in used}
    # A used token whose merge has a part that no corpus output uses.
    token, (a, b) = next((a + b, (a, b)) for a, b in merges
                         if a + b in used_tokens and len(a) > 1 and a not in used_tokens)
    assert vocab[a] not in used
    kept = kept_token_ids(old, PRUNE_TEXTS)
    assert {vocab[a], vocab[b], vocab[token]} <= set(kept)
    # Pruned to the used ids (plus the whole byte alphabet), the token is no longer reachable.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    only_used = {t: i for t, i in vocab.items() if i in used or t in alphabet}
    only_used = {t: n for n, t in enumerate(sorted(only_used, key=only_used.get))}
    broken = models.BPE(only_used, [m for m in merges if m[0] in only_used and m[1] in only_used
                                    and m[0] + m[1] in only_used])
    assert [t.value for t in models.BPE(vocab, merges).tokenize(token)] == [token]
    assert [t.value for t in broken.tokenize(token)] != [token]
    # And tokenizer_with_ids refuses such ids instead of building the broken tokenizer.
    with pytest.raises(ValueError, match="lack tokens"):
        tokenizer_with_ids(old, sorted(used | set(old.all_special_ids) | {vocab[t] for t in alphabet}))
    with pytest.raises(ValueError, match=re.escape(repr(a))):
        tokenizer_with_ids(old, [i for i in kept if i != vocab[a]])
    pruned_model = tokenizer_with_ids(old, kept).backend_tokenizer.model
    assert [t.value for t in pruned_model.tokenize(token)] == [token]


def test_bpe_keeps_the_byte_alphabet_so_other_texts_still_tokenize():
    old = original_tokenizer("bpe", "generic")
    kept = kept_token_ids(old, PRUNE_TEXTS)
    new = tokenizer_with_ids(old, kept)
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(new.get_vocab())
    for text in HELD_OUT_TEXTS + ["Ünïcödé ✓ 東京"]:
        ids = new(text)["input_ids"]
        assert new.unk_token_id not in ids
        assert new.decode(ids, skip_special_tokens=True) == text
    for text in HELD_OUT_TEXTS:  # the pruned words come back in smaller pieces
        assert len(new(text)["input_ids"]) > len(old(text)["input_ids"])


# --------------------------------------------------------------------------- Unigram


@pytest.mark.parametrize("wrapper", ["class", "generic"])
def test_unigram_keeps_scores_exactly_and_remaps_unk(wrapper):
    old = original_tokenizer("unigram", wrapper)
    kept = kept_token_ids(old, PRUNE_TEXTS)
    new = tokenizer_with_ids(old, kept)
    old_model = json.loads(old.backend_tokenizer.to_str())["model"]
    new_model = json.loads(new.backend_tokenizer.to_str())["model"]
    pieces = len(old_model["vocab"])  # the generic one's [MASK] is an added token after them
    assert new_model["vocab"] == [old_model["vocab"][i] for i in kept if i < pieces]  # the very same floats
    assert (old_model["unk_id"], new_model["unk_id"], new.unk_token_id) == (1, 1, 1)


def test_unigram_keeps_the_lowest_scoring_piece():
    """<unk> scores min(score) - 10: dropping the unused lowest piece would make "xab" -> <unk>, "ab"."""
    pieces = [("zz", -5.0), ("<unk>", 0.0), ("xa", -15.0), ("b", -15.0), ("ab", -1.0), ("qq", -100.0)]
    old = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, 1, False)), unk_token="<unk>")
    assert old.tokenize("xab") == ["xa", "b"]  # -30 beats <unk>(x) + "ab" = -110 - 1
    without_qq = Tokenizer(models.Unigram(pieces[:5], 1, False))
    assert without_qq.encode("xab").ids == [1, 4]  # -30 loses to <unk>(x) + "ab" = -25 - 1
    kept = kept_token_ids(old, ["xab", "ab"])
    assert kept == [1, 2, 3, 4, 5]  # "qq" too, though no text uses it; "zz" goes
    new = tokenizer_with_ids(old, kept)
    assert new.tokenize("xab") == ["xa", "b"]
    assert new("wab")["input_ids"] == [0, 3] == [new.unk_token_id, new.convert_tokens_to_ids("ab")]  # unk_id moved
    with pytest.raises(ValueError, match="qq"):
        tokenizer_with_ids(old, [1, 2, 3, 4])


# --------------------------------------------------------------------------- refusals


def test_refuses_a_wordlevel_tokenizer():
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    old = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="TokenizersBackend.*WordLevel"):
        kept_token_ids(old, ["hello world"])
    with pytest.raises(ValueError, match="WordLevel"):
        tokenizer_with_ids(old, [0, 1])


def test_refuses_a_unigram_without_unk():
    """Without unk_id, a character whose single piece was pruned makes encoding fail outright."""
    pieces = [("ab", -1.0), ("a", -2.0), ("b", -2.0)]
    old = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, None, False)))
    assert old.tokenize("ab") == ["ab"]
    with pytest.raises(ValueError, match="without unk_id"):
        kept_token_ids(old, ["ab"])


def test_refuses_a_tokenizer_without_fast_backend(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(BERT_SPECIALS + ["hello", "world"]) + "\n", encoding="utf-8")
    slow = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"))
    with pytest.raises(ValueError, match="BertTokenizerLegacy.*no fast"):
        kept_token_ids(slow, ["hello world"])
    with pytest.raises(ValueError, match="no fast"):
        tokenizer_with_ids(slow, [0, 1, 2, 3, 4, 5])


def test_tokenizer_with_ids_refuses_ids_that_drop_a_special_or_are_unsorted():
    old = original_tokenizer("wordpiece", "class")
    kept = kept_token_ids(old, PRUNE_TEXTS)
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        tokenizer_with_ids(old, [i for i in kept if i != old.mask_token_id])
    with pytest.raises(ValueError, match="ascending"):
        tokenizer_with_ids(old, kept[::-1])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer_with_ids(old, kept + [len(old) + 7])
