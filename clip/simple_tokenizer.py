"""openai/CLIP's module name for the tokenizer, for ported code
(CoOp, MaPLe: `from clip.simple_tokenizer import SimpleTokenizer as _Tokenizer`).

The tokenizer itself is clip/tokenizer.py: the same ids as OpenAI's for every input, and the same
`encode(text) -> ids` and `decode(ids) -> text`.
"""
from .tokenizer import VOCAB_PATH, SimpleTokenizer, bytes_to_unicode

__all__ = ["SimpleTokenizer", "bytes_to_unicode", "default_bpe"]


def default_bpe():
    """Path of the BPE merges file (OpenAI's function name)."""
    return VOCAB_PATH
