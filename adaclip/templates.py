"""Prompt templates that turn class names into text for the text encoder."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError

DEFAULT_TEMPLATE = "a photo of a {}."

# A small, general-purpose ensemble in the style of CLIP's prompt-engineering study (Radford et al.,
# 2021). Averaging the text features of several phrasings makes zero-shot scores less sensitive to one
# wording; the set is short because every template multiplies text-encoder cost during training.
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a low resolution photo of a {}.",
    "a drawing of a {}.",
    "art of the {}.",
    "itap of a {}.",
)


def resolve_templates(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`default`, `ensemble`, a path to a text file (one template per line), or a list of templates.

    Every template must contain exactly one `{}` where the class name goes.
    """
    if spec is None or spec == "default":
        templates = [DEFAULT_TEMPLATE]
        source = "default"
    elif spec == "ensemble":
        templates = list(ENSEMBLE_TEMPLATES)
        source = "ensemble"
    elif isinstance(spec, (list, tuple)):
        templates = [str(t) for t in spec]
        source = "the template list"
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(
                "templates must be 'default', 'ensemble' or a text file; no such file",
                path=path,
                fix="give a file with one template per line, each containing {}",
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read template file ({exc})", path=path) from None
        templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        source = str(path)
    if not templates:
        raise InputError("no templates found", path=source, fix="add at least one line such as 'a photo of a {}.'")
    for template in templates:
        if template.count("{}") != 1:
            raise InputError(
                f"template {template!r} must contain exactly one {{}}",
                path=source,
                fix="e.g. 'a photo of a {}.'",
            )
    return templates
