"""Prompt templates for zero-shot classification: data only; ``{}`` is replaced by the class name.

OpenAI's full ImageNet set has 80 templates (CLIP's ``data/prompts.md``; open_clip's
``OPENAI_IMAGENET_TEMPLATES``). Kept here: the single default prompt, and the 7-template ensemble that OpenAI's
prompt-engineering notebook selected and open_clip ships as ``SIMPLE_IMAGENET_TEMPLATES`` -- most of the
80-template gain at a tenth of the text-encoding cost.
"""

DEFAULT_TEMPLATE = "a photo of a {}."

DEFAULT_TEMPLATES = (DEFAULT_TEMPLATE,)

SIMPLE_IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Named sets, so a config can say ``templates = "simple_imagenet"``.
TEMPLATE_SETS = {
    "default": DEFAULT_TEMPLATES,
    "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES,
}
