"""Zero-shot CLIP (Radford et al., ICML 2021, Sec. 3.1.4): the first row of
every table, nothing learned.

Each class is the text feature of the data set's hand-crafted template ("a photo of a {}.",
CoOp's per-data-set templates in data/datasets.py); an image goes to the class of highest cosine.
"""
from prompts.common import PromptedCLIP, zeroshot_classifier


class CustomCLIP(PromptedCLIP):
    def __init__(self, clip_model, classnames, template, cfg=None):
        super().__init__()
        self.clip = clip_model
        self.register_buffer("class_features",
                             zeroshot_classifier(clip_model, classnames, template),
                             persistent=False)

    def text_features(self):
        return self.class_features  # [n_cls, D]
