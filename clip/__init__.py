"""CLIP from scratch, with OpenAI's API: clip.load, clip.tokenize, clip.available_models.

As in openai/CLIP, `from clip import clip` gives the module with `_MODELS`, `_download`,
`_transform` and `build_model`, and `clip.simple_tokenizer.SimpleTokenizer` is the tokenizer.
"""
from . import simple_tokenizer
from .clip import available_models, load
from .model import CLIP, build_model
from .tokenizer import tokenize

__all__ = ["available_models", "load", "tokenize", "CLIP", "build_model"]
