from .model import CLIP, build_model
