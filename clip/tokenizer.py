"""CLIP's byte-level BPE tokenizer, written to be read.

Gives the same ids as OpenAI's clip/simple_tokenizer.py for every input. The pipeline is

    text --clean--> "a photo of a cat." --split into words--> ["a", "photo", "of", "a", "cat", "."]
         --BPE each word--> [["a</w>"], ["photo</w>"], ...]
         --look up ids--> [320, 1125, 539, 320, 2368, 269]

and `tokenize` wraps that as [SOT] + ids + [EOT], zero-padded to 77 positions.

Byte-pair encoding (BPE) in one paragraph: start from a word spelled as single characters, then
repeatedly glue together the adjacent pair that the training run merged *earliest* (it was the most
frequent pair at that time). Frequent words end up as one token ("photo</w>"), rare words as a few
pieces ("kaiyangzhou" -> "kai", "yang", "zhou</w>"), and nothing is ever out of vocabulary because
every single byte is a token too. The vocab file lists the merges in the order they were learned.
"""

import functools
import gzip
import heapq
import html
import os

import ftfy
import numpy as np
import regex
import torch

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file: 49,408 ids in all
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# The pre-tokenizer: BPE never merges across the pieces this regex cuts, so it decides what a "word"
# is. Alternatives are tried left to right at each position:
#   <|startoftext|>, <|endoftext|>  the special tokens, kept whole if they appear in the text;
#   's 't 're 've 'm 'll 'd         English contractions become words ("it's" -> "it", "'s");
#   [\p{L}]+                        a run of letters in any script (accents, CJK, Arabic...);
#   [\p{N}]                         ONE digit: "2023" is four words, so numbers need no big
#                                   vocabulary and every number is spelled the same way;
#   [^\s\p{L}\p{N}]+                a run of anything else but whitespace: punctuation, emoji.
# Whitespace matches nothing, so it is dropped; the end of each word is marked by END_OF_WORD
# instead. The text is lower-cased before this, but IGNORECASE still matters at the edges ("'ſ",
# long s, matches 's).
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
    r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a visible unicode character (GPT-2's trick).

    BPE here works on UTF-8 *bytes*, so any text at all can be spelled with the 256 base tokens.
    But the merge rules are stored and applied as text, and bytes such as 0x20 (space) or 0x0A
    (newline) would be invisible or split by `str.split`. So the 188 bytes that are already
    printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, and the other
    68 are shifted to chr(256 + n), e.g. space -> 'Ġ'. The dict's order matters: it is the order of
    ids 0..255, so id 0 is '!'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in byte_to_char):
        byte_to_char[b] = chr(256 + n)
    return byte_to_char


def clean_text(text: str) -> str:
    """OpenAI's cleaning: repair mojibake, unescape HTML twice, collapse whitespace, lower-case.

    ftfy alone costs ~20 us a string. On printable ASCII without '&' (most prompts) it and the
    unescaping are exact no-ops (they only change non-ASCII, control characters and '&' entities),
    and the only whitespace is ' ', so a cheap path gives the identical result.
    """
    if text.isascii() and text.isprintable() and "&" not in text:
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return WHITESPACE.sub(" ", text).strip().lower()


def load_merges(path: str = VOCAB_PATH) -> list[tuple[str, str]]:
    """The merge rules in the order they were learned; line 0 of the file is a version header."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]
    return [tuple(line.split()) for line in lines]


class SimpleTokenizer:
    """Text <-> CLIP token ids. `encode`/`decode` handle bare ids; `tokenize`
    below adds SOT/EOT/padding."""

    def __init__(self, vocab_path: str = VOCAB_PATH):
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        merges = load_merges(vocab_path)
        # lower rank = learned earlier
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}

        # The vocabulary, in id order: 256 single bytes inside a word, the same 256
        # ending a word ("a" inside "cat" is not the word "a</w>"), one token per merge,
        # then the two special tokens.
        base = list(self.byte_to_char.values())
        vocab = base + [c + END_OF_WORD for c in base] + ["".join(pair) for pair in merges] + [SOT,
                                                                                               EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]  # 49406, 49407
        # chunk -> ids. Prompts repeat the same few words, so after the first few prompts almost
        # every chunk is a hit, and BPE (the slow part) runs once per distinct chunk.
        self.cache: dict[str, tuple[int, ...]] = {}

    def bpe(self, chars: str) -> list[str]:
        """Split one word (already in byte characters) into vocabulary tokens.

        Start from single characters, the last one marked as the end of the word: "cat" -> c, a,
        t</w>. Then replay the merges in the order training learned them: each round takes the
        adjacent pair learned first (lowest rank) and merges all its occurrences, left to right (so
        "aaa" -> aa, a). Stop when no adjacent pair is a known merge.

        Rescanning every pair each round costs O(n^2) for a word of n characters (13 s for 8,000
        random letters). Here every adjacent pair waits in a heap keyed by (rank, position), so each
        merge costs O(log n): popping in that order is the same rounds, in the same left-to-right
        order, because a merge only creates pairs of higher rank (a pair with the new token was
        learned after the token itself), and never a new occurrence of the pair being merged.
        """
        # None once merged into its left neighbour
        symbols = list(chars[:-1]) + [chars[-1] + END_OF_WORD]
        after = list(range(1, len(symbols))) + [None]  # index of the next live symbol
        before = [None] + list(range(len(symbols) - 1))
        heap = []

        def push(i):  # the pair starting at symbol i, if it is a merge
            rank = self.merge_rank.get((symbols[i],
                                        symbols[after[i]])) if after[i] is not None else None
            if rank is not None:
                heapq.heappush(heap, (rank, i))

        for i in range(len(symbols)):
            push(i)
        while heap:
            rank, i = heapq.heappop(heap)
            j = after[i]
            if symbols[i] is None or j is None or self.merge_rank.get((symbols[i],
                                                                       symbols[j])) != rank:
                continue  # stale: a neighbour merged first since this pair was pushed
            symbols[i], symbols[j] = symbols[i] + symbols[j], None
            after[i] = after[j]
            if after[i] is not None:
                before[after[i]] = i
            push(i)
            if before[i] is not None:
                push(before[i])
        return [s for s in symbols if s is not None]

    def word_ids(self, word: str, limit: int | None = None) -> list[int]:
        """Ids of one word cut out by WORD_PATTERN (with limit: its first `limit` ids)."""
        if word in (SOT, EOT):  # typed into the text: still the special token, as in OpenAI's code
            return [self.encoder[word]]
        # UTF-8 bytes -> their stand-in characters. Decoding as Latin-1 turns byte b into
        # chr(b), and translate() then maps each ordinal b to byte_to_char[b], all in C
        # instead of a Python loop.
        chars = word.encode("utf-8").decode("latin-1").translate(self.byte_to_char)
        return [self.encoder[token] for token in self.bpe(chars)][:limit]

    def chunk_ids(self, chunk: str, limit: int | None = None) -> tuple[int, ...]:
        """Ids of one space-free chunk of cleaned text ("cat." -> words "cat", "." -> [2368, 269]).

        With limit: its first `limit` ids, and words after those are not
        encoded (not cached either)."""
        ids = self.cache.get(chunk)
        # a short chunk: encode and cache it whole
        if ids is None and (limit is None or len(chunk) <= limit):
            ids = self.cache[chunk] = tuple(
                i for word in WORD_PATTERN.findall(chunk) for i in self.word_ids(word)
            )
        if ids is not None:
            return ids[:limit]
        ids = []
        for match in WORD_PATTERN.finditer(chunk):
            ids += self.word_ids(match.group(), limit - len(ids))
            if len(ids) >= limit:
                break
        return tuple(ids)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text`, without SOT/EOT. With limit: encode(text)[:limit], with only the
        work those ids need (so a huge text costs about as much as a short one)."""
        # No word contains a space, so splitting at spaces first changes nothing, and lets the cache
        # skip the (slow) regex too: a prompt of known chunks costs a few dict look-ups.
        ids = []
        for chunk in clean_text(text).split(" "):
            if limit is not None and len(ids) >= limit:
                break
            ids += self.chunk_ids(chunk, None if limit is None else limit - len(ids))
        return ids

    def decode(self, ids) -> str:
        """Inverse of encode up to cleaning: each '</w>' becomes a space (so
        the text ends in one)."""
        chars = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.char_to_byte[c] for c in chars)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> SimpleTokenizer:
    """The shared instance, built on first use (~0.1 s) so that `import clip` stays fast."""
    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = 77,
             truncate: bool = False) -> torch.IntTensor:
    """[SOT] + ids + [EOT], zero-padded: an int32 tensor of shape [number of texts, context_length].

    Padding uses id 0, which is also the real token '!', so never find padding with `ids == 0`: the
    text ends at the EOT token, the largest id (49407), i.e. at `ids.argmax(-1)`. That is where CLIP
    reads its sentence feature, and `arange(L) <= argmax` is the mask of real tokens.
    """
    tokenizer = default_tokenizer()
    if isinstance(texts, str):
        texts = [texts]
    # filled row by row: far faster than torch
    result = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, text in enumerate(texts):
        # One id more than fits is enough to know the text is too long: the rest is never encoded.
        ids = [tokenizer.sot_token, *tokenizer.encode(text, limit=context_length - 1),
               tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                shown = (
                    repr(text)
                    if len(text) <= 1000
                    else f"{text[:1000]!r}... ({len(text)} characters)"
                )
                raise RuntimeError(
                    f"Input {shown} is too long for context length {context_length} (more than "
                    f"{context_length} tokens with SOT/EOT); shorten it or pass truncate=True "
                    f"to cut it and end it with EOT"
                )
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_token
        result[row, : len(ids)] = ids
    return torch.from_numpy(result)
