"""adaclip: adapt a pretrained CLIP model to your own images.

Library entry points (the CLI is a thin layer over these):

    adaclip.fit(folder, method=..., backbone=..., shots=...) -> Adapter
    adaclip.load(path) -> Adapter
    Adapter.predict(paths_or_images, top_k=5) / .evaluate(folder) / .save(path)
    adaclip.create_backbone(name, pretrained) -> Backbone
    adaclip.list_methods() -> list[str]
"""

from ._version import __version__
from .adapter import Adapter, Prediction, fit, load, zero_shot_adapter
from .backbone import Backbone, create_backbone
from .errors import AdaclipError, AdapterFileError, BackboneUnavailableError, InputError, UsageError
from .methods import list_methods

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
