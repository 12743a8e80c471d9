"""adaclip: adapt a pretrained CLIP model to your own images.

Library entry points (the CLI is a thin layer over these):

    adaclip.fit(folder, method=..., backbone=..., shots=...) -> Adapter
    adaclip.load(path) -> Adapter
    Adapter.predict(paths_or_images, top_k=5) / .evaluate(folder) / .save(path)
    adaclip.create_backbone(name, pretrained) -> Backbone
    adaclip.list_methods() -> list[str]
"""

from ._interrupt import exit_130_until_started, started_as_command

if started_as_command():  # before the seconds of torch imports below: Ctrl-C must not print a traceback
    exit_130_until_started()

from ._version import __version__  # noqa: E402
from .adapter import Adapter, Prediction, fit, load, zero_shot_adapter  # noqa: E402
from .backbone import Backbone, create_backbone  # noqa: E402
from .errors import AdaclipError, AdapterFileError, BackboneUnavailableError, InputError, UsageError  # noqa: E402
from .methods import list_methods  # noqa: E402

__all__ = [
    "AdaclipError",
    "Adapter",
    "AdapterFileError",
    "Backbone",
    "BackboneUnavailableError",
    "InputError",
    "Prediction",
    "UsageError",
    "__version__",
    "create_backbone",
    "fit",
    "list_methods",
    "load",
    "zero_shot_adapter",
]
