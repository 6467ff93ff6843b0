"""Class names and prompt templates for zero-shot classification; ``{}`` is replaced by the class name.

OpenAI's ImageNet-1k class names and its 80 templates, the set the field reports ImageNet zero-shot with, ship
as package data (``imagenet1k.json``, its provenance inside). Beside them: the single default prompt, and the
7-template ensemble that OpenAI's prompt-engineering notebook selected and open_clip ships as
``SIMPLE_IMAGENET_TEMPLATES`` (most of the 80-template gain at a tenth of the text-encoding cost). Any of
CLIP_benchmark's data sets reads from its own ``en_classnames.json`` / ``en_zeroshot_classification_templates.json``.
"""

import functools
import json
import pathlib

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

IMAGENET_FILE = pathlib.Path(__file__).with_name("imagenet1k.json")


@functools.cache
def imagenet1k() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(1000 class names in the standard index order, i.e. sorted WordNet ids; OpenAI's 80 templates)."""
    data = json.loads(IMAGENET_FILE.read_text(encoding="utf-8"))
    return tuple(data["classnames"]), tuple(data["templates"])


def clip_benchmark(dataset: str, classnames_file: str | pathlib.Path,
                   templates_file: str | pathlib.Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, templates) of `dataset` from CLIP_benchmark's two JSON files (its '{c}' placeholder read
    as '{}'); a one-line error naming the file when the data set is not in it."""
    out = []
    for path, what in ((classnames_file, "class names"), (templates_file, "templates")):
        try:
            table = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read CLIP_benchmark {what} ({e})") from None
        if dataset not in table:
            raise ValueError(f"{path}: no {what} for {dataset!r} (it has {', '.join(sorted(table)[:8])}, ...)")
        out.append(tuple(str(t).replace("{c}", "{}") for t in table[dataset]))
    return out[0], out[1]


# Named sets, so a config can say ``templates = "simple_imagenet"``.
TEMPLATE_SETS = {
    "default": DEFAULT_TEMPLATES,
    "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES,
    "openai_imagenet": imagenet1k()[1],
}
