"""CLIP from scratch, with OpenAI's API: clip.load, clip.tokenize, clip.available_models."""
from .clip import available_models, load
from .model import CLIP, build_model
from .tokenizer import tokenize

__all__ = ["available_models", "load", "tokenize", "CLIP", "build_model"]
