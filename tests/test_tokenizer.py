"""Tests for clip/tokenizer.py.

The reference is open_clip's copy of OpenAI's tokenizer (open_clip_torch==3.3.0, installed by
.ci/run with --no-deps). `import open_clip` would pull in torchvision, so its tokenizer.py and
zero_shot_metadata.py are loaded as single files; neither has relative imports.

Class names of the ten non-ImageNet benchmarks are in bench_classnames.json, taken from the
prompt lists OpenAI published with CLIP (data/prompts.md). ImageNet's come from open_clip.
"""
import hashlib
import html
import json
import os
import random

import ftfy
import pytest
import regex
import torch

from clip.tokenizer import (
    VOCAB_PATH,
    SimpleTokenizer,
    bytes_to_unicode,
    clean_text,
    default_tokenizer,
    tokenize,
)
from tests.synthetic import load_open_clip_file

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "bench_classnames.json")
EXPECTED_CLASS_COUNTS = {
    "Caltech101": 102, "OxfordPets": 37, "StanfordCars": 196, "Flowers102": 102, "Food101": 101,
    "FGVCAircraft": 100, "SUN397": 397, "DTD": 47, "EuroSAT": 10, "UCF101": 101,
}
# The hand-crafted (CoOp) template of each dataset.
TEMPLATES = {
    "ImageNet": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "OxfordPets": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of a {}.",
    "Flowers102": "a photo of a {}, a type of flower.",
    "Food101": "a photo of {}, a type of food.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "SUN397": "a photo of a {}.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.",
}

EDGE_CASES = [
    # accents and other scripts
    "café crème brûlée", "Ångström naïve façade Ærøskøbing", "Straße ß ẞ", "İstanbul ǅ Ǉ",
    "Ελληνικά λέξεις", "русский текст", "日本語のテキスト", "中文 汉字 測試", "한국어 문장", "العربية نص عربي",
    "עברית", "हिन्दी", "ภาษาไทย",
    # emoji, ZWJ sequences, skin tones, flags, variation selectors
    "I ❤️ NY", "🐶🐱 pets", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "👍🏽 thumbs up", "🇯🇵🇫🇷", "a 😀 dog", "🧑🏿‍🚀",
    # what ftfy repairs or normalises
    "Ã©tÃ© cafÃ©", "donâ€™t", "SchrÃ¶dinger", "e\u0301te\u0301 cafe\u0301", "ﬁne ﬂour",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "“curly” ‘quotes’", "\ud83d\ude00 surrogate pair", "lone \ud800 surrogate",
    # HTML entities, unescaped twice after ftfy
    "&amp;", "&lt;b&gt;", "&#39;", "it&#39;s", "&amp;amp;", "&amp;lt;b&amp;gt;", "fish &amp; chips",
    "&nbsp;nbsp", "&copy; 2024", "&#x1F600;", "a &unknown; entity", "&", "a&b",
    "<b>bold</b> &amp; more", "&#133;", "&#28;x",
    # digits: one token each
    "3.14 apples", "2023-10-05", "1,000,000", "007 agent", "½ cup", "Ⅻ roman", "٣ arabic digit",
    "x²³", "12345678901234567890",
    # apostrophes and contractions
    "it's", "they'll", "O'Neil", "we're", "I've", "I'm", "he'd", "don't", "IT'S LOUD",
    "rock 'n' roll", "'s", "it’s", "it'ſ", "'''", "'twas",
    # whitespace
    "  leading and trailing  ", "tabs\tand\nnewlines\r\n",
    "non\u00a0breaking\u2009thin\u3000ideographic", "zero\u200bwidth", "\u2028line separator", "",
    "   ", "\x0bvertical tab", "\x1cfile separator", "a\x85b",
    # punctuation and symbols
    "!", "!!!", "...", "C++ & C#", "e-mail@example.com", "https://example.com/a?b=c",
    "$100 €50 £20 ¥1000", "#hashtag @mention", "(round) [square] {curly}", "snake_case camelCase",
    "a/b\\c", "~`^|<>", "°C ±5%",
    # control characters and terminal escapes
    "bell\x07char", "null\x00byte", "\x1b[31mred\x1b[0m",
    # case and long words
    "HELLO World", "MiXeD CaSe", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious" * 3,
]
OVER_LONG = [
    "a " * 100,
    "word " * 80 + "end",
    "1" * 100,
    "日本語のテキスト、" * 30,
    "🐶" * 80,
    "a photo of a " + "very " * 90 + "big dog.",
]


@pytest.fixture(scope="module")
def reference():
    return load_open_clip_file("tokenizer.py").SimpleTokenizer()


@pytest.fixture(scope="module")
def imagenet():
    return load_open_clip_file("zero_shot_metadata.py")


@pytest.fixture(scope="module")
def classnames(imagenet):
    with open(FIXTURE, encoding="utf-8") as f:
        names = json.load(f)
    return {"ImageNet": list(imagenet.IMAGENET_CLASSNAMES), **names}


def fuzz_strings(n=300, seed=0):
    """Random mixes of ASCII, whitespace, accents, CJK, emoji, entities and apostrophes."""
    rng = random.Random(seed)
    pieces = list("abcXYZ019 .,!?'&;#-_/") + ["é", "ß", "日", "本", "😀", "\u200d", "❤️", "\t", "\n",
                                              "\u00a0", "&amp;", "&#39;", "'s", "'ll", "Ã©", "ﬁ",
                                              "Ⅻ", "٣", "  "]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(classnames, imagenet):
    """{group: [strings]}: every class name bare and in its template, plus edge cases."""
    groups = {}
    for dataset, names in classnames.items():
        groups[dataset] = names + [TEMPLATES[dataset].format(name) for name in names]
    # 80 functions name -> prompt; use each on 12-13 classes
    templates = imagenet.OPENAI_IMAGENET_TEMPLATES
    names = classnames["ImageNet"]
    groups["ImageNet 80 templates"] = [
        templates[i % len(templates)](name) for i, name in enumerate(names)
    ]
    groups["edge cases"] = EDGE_CASES
    groups["fuzz"] = fuzz_strings()
    groups["over-long"] = OVER_LONG
    return groups


def test_vocab_file_is_the_openai_one():
    with open(VOCAB_PATH, "rb") as f:
        data = f.read()
    assert len(data) == 1_356_917
    assert (
        hashlib.sha256(data).hexdigest()
        == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    )


def test_vocabulary_layout():
    tokenizer = default_tokenizer()
    byte_to_char = bytes_to_unicode()
    assert len(set(byte_to_char.values())) == 256 and byte_to_char[ord(" ")] == "Ġ"
    assert len(tokenizer.encoder) == len(tokenizer.decoder) == 49408
    # pad id 0 is a real token
    assert tokenizer.decoder[0] == "!" and tokenizer.decoder[256] == "!</w>"
    assert (tokenizer.sot_token, tokenizer.eot_token) == (49406, 49407)
    assert tokenizer.decoder[49405] == "jekyll</w>"  # the last merge CLIP uses ("jeky ll</w>")


@pytest.mark.parametrize("text, ids", [
    ("Hello World!", [49406, 3306, 1002, 256, 49407]),
    ("a diagram", [49406, 320, 22697, 49407]),
    ("a dog", [49406, 320, 1929, 49407]),
    ("a photo of a cat.", [49406, 320, 1125, 539, 320, 2368, 269, 49407]),
    ("X X X X a photo of a", [49406, 343, 343, 343, 343, 320, 1125, 539, 320, 49407]),
])
def test_documented_ids(text, ids):
    tokens = tokenize(text)
    assert tokens.shape == (1, 77) and tokens.dtype == torch.int32
    assert tokens[0, : len(ids)].tolist() == ids
    assert not tokens[0, len(ids):].any()
    assert tokens.argmax(-1).item() == len(ids) - 1  # EOT, found by argmax as CLIP does


@pytest.mark.parametrize("text, ids", [
    ("kaiyangzhou", [12752, 23818, 17384]),
    ("3.14 apples", [274, 269, 272, 275, 14032]),
])
def test_documented_encode(text, ids):
    assert default_tokenizer().encode(text) == ids


def test_special_tokens_typed_in_text_stay_special():
    # OpenAI's pre-tokenizer keeps "<|endoftext|>" whole; open_clip spells its specials differently,
    # so these strings are left out of the comparison with it.
    tokenizer = default_tokenizer()
    assert tokenizer.encode("<|startoftext|>a dog<|ENDOFTEXT|>") == [49406, 320, 1929, 49407]
    assert 49406 not in tokenizer.encode("<start_of_text>")


def test_corpus_covers_all_benchmarks(classnames, corpus):
    assert {dataset: len(names) for dataset, names in classnames.items()} == {
        "ImageNet": 1000,
        **EXPECTED_CLASS_COUNTS,
    }
    assert set(TEMPLATES) == set(classnames)
    assert sum(len(texts) for texts in corpus.values()) >= 500


@pytest.mark.parametrize("group",
                         [*TEMPLATES, "ImageNet 80 templates", "edge cases", "fuzz", "over-long"])
def test_same_ids_as_reference(group, corpus, reference):
    texts = corpus[group]
    ours = default_tokenizer()
    mismatches = [(t, ours.encode(t),
                   reference.encode(t)) for t in texts if ours.encode(t) != reference.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]}"
    # The padded tensors too; open_clip truncates over-long texts, as truncate=True does.
    assert torch.equal(tokenize(texts, truncate=True).long(), reference(texts))


def test_fast_cleaning_path_matches_full_pipeline(corpus):
    def full_clean(text):  # OpenAI's basic_clean + whitespace_clean + lower, step by step
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    rng = random.Random(1)
    ascii_texts = ["".join(rng.choice(" abcXYZ09.,'&;#<>!\\") for _ in range(rng.randint(0, 30)))
                   for _ in range(500)]
    for text in ascii_texts + [t for texts in corpus.values() for t in texts]:
        assert clean_text(text) == full_clean(text), repr(text)


def test_too_long_raises_and_truncate_cuts():
    text = "word " * 80 + "end"
    with pytest.raises(RuntimeError, match="truncate=True") as error:
        tokenize(["a dog", text])
    assert text in str(error.value)

    tokens = tokenize(["a dog", text], truncate=True)
    assert tokens.shape == (2, 77)
    assert tokens[1, -1].item() == 49407
    assert tokens[1, :76].tolist() == [49406] + default_tokenizer().encode(text)[:75]


def test_context_length_boundary():
    fits = tokenize("a " * 75)  # 75 tokens + SOT + EOT = 77
    assert fits[0, -1].item() == 49407 and fits[0, 1:76].eq(320).all()
    with pytest.raises(RuntimeError):
        tokenize("a " * 76)
    assert tokenize("a dog", context_length=5).tolist() == [[49406, 320, 1929, 49407, 0]]


def test_tokenize_accepts_str_list_and_empty():
    assert torch.equal(tokenize("a dog"), tokenize(["a dog"]))
    assert tokenize(["a", "b", "c"]).shape == (3, 77)
    assert tokenize([]).shape == (0, 77)
    assert tokenize("")[0, :3].tolist() == [49406, 49407, 0]


@pytest.mark.parametrize("text", [
    "a photo of a cat", "the quick brown fox jumps over the lazy dog", "kaiyangzhou",
    "great white shark", "supercalifragilisticexpialidocious", "café 日本語",
])
def test_decode_round_trip(text):
    tokenizer = default_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text + " "


def test_decode_special_and_pad():
    tokenizer = default_tokenizer()
    assert tokenizer.decode([49406, 320, 1929, 49407]) == "<|startoftext|>a dog <|endoftext|>"
    assert tokenizer.decode([0]) == "!"


def test_separate_instances_agree():
    texts = ["a photo of a cat.", "Ã©tÃ© cafÃ©", "👨‍👩‍👧‍👦"]
    fresh = SimpleTokenizer()
    assert [fresh.encode(t) for t in texts] == [default_tokenizer().encode(t) for t in texts]


def long_words(seed=0):
    """Single words of 1,000 to 2,000 characters: repeated letters, random letters (the slow
    case of a rescanning BPE), glued common words, CJK, accented letters and emoji
    (multi-byte characters)."""
    rng = random.Random(seed)
    pieces = ["photo", "cat", "dog", "the", "ing", "tion", "kaiyang", "zhou"]
    return ["a" * 2000, "ab" * 1000,
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1500)),
            "".join(rng.choice(pieces) for _ in range(300)),
            "".join(rng.choice("日本語中文漢字測試") for _ in range(1000)), "é" * 1500, "😂" * 400,
            "".join(rng.choice("aeiouxyz") for _ in range(1500))]


def test_long_words_same_ids_as_reference(reference):
    tokenizer = SimpleTokenizer()
    for word in long_words():
        assert tokenizer.encode(word) == reference.encode(word), word[:20]


def test_a_32000_letter_word_is_tokenized(reference):
    """BPE runs in O(n log n) on a word, and only the words needed for the first 77 tokens
    are encoded. The reference rescans all pairs every round, so here it only sees the
    repeated letter (few rounds)."""
    word = "a" * 32000
    assert torch.equal(tokenize([word, "a dog " + word], truncate=True).long(),
                       reference([word, "a dog " + word]))
    rng = random.Random(1)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(32000))
    tokens = tokenize(letters, truncate=True)
    assert (
        tokens[0, -1] == 49407
        and tokens[0, :76].tolist() == [49406] + default_tokenizer().encode(letters)[:75]
    )
    with pytest.raises(RuntimeError,
                       match=r"\.\.\. \(32000 characters\) is too long for context length 77"):
        tokenize(letters)


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 75, 76])
def test_encode_with_limit_is_the_head_of_encode(limit, corpus):
    tokenizer = SimpleTokenizer()  # an empty cache: the limit must not store partial chunks
    texts = (
        corpus["over-long"] + corpus["edge cases"] + long_words(seed=2)[:3] + ["word " * 80 + "end"]
    )
    for text in texts:
        assert tokenizer.encode(text,
                                limit=limit) == default_tokenizer().encode(text)[:limit], text[:20]
    assert [tokenizer.encode(t) for t in texts] == [default_tokenizer().encode(t) for t in texts]


def test_every_merge_uses_tokens_learned_before_it():
    """What makes the heap BPE replay the reference's rounds: a merge creates
    only pairs of higher rank."""
    tokenizer = default_tokenizer()
    learned_at = {}  # token -> the first merge that makes it
    for (first, second), rank in sorted(tokenizer.merge_rank.items(), key=lambda item: -item[1]):
        learned_at[first + second] = rank
    late = [(pair, rank) for pair, rank in tokenizer.merge_rank.items()
            if any(learned_at.get(part, -1) >= rank for part in pair)]
    assert not late, late[:3]
