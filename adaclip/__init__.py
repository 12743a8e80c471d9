"""adaclip: adapt a pretrained CLIP model to your own images.

Library entry points (the CLI is a thin layer over these):

    adaclip.fit(folder, method=..., backbone=..., shots=...) -> Adapter
    adaclip.load(path) -> Adapter
    Adapter.predict(paths_or_images, top_k=5) / .evaluate(folder) / .save(path)
    adaclip.create_backbone(name, pretrained) -> Backbone
    adaclip.list_methods() -> list[str]
    adaclip.compare(folder, methods=[...], seeds=[1, 2, 3]) -> Leaderboard

adaclip logs through the standard `logging` module under the logger named "adaclip":
`logging.getLogger("adaclip").setLevel(logging.ERROR)` silences it; `adaclip.set_progress(False)` turns
progress bars off.

Names are imported on first use (module `__getattr__`), so `import adaclip` and the CLI's help, version
and `info` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import AdaclipError, AdapterFileError, BackboneUnavailableError, InputError, UsageError

if TYPE_CHECKING:
    from .adapter import Adapter
    from .api import fit, load, zero_shot_adapter
    from .backbone import Backbone, create_backbone
    from .comparison import Leaderboard, compare
    from .methods import list_methods
    from .predictions import Prediction
    from .ui import set_progress

_LAZY = {
    "Adapter": "adapter",
    "Prediction": "predictions",
    "fit": "api",
    "load": "api",
    "zero_shot_adapter": "api",
    "Backbone": "backbone",
    "create_backbone": "backbone",
    "Leaderboard": "comparison",
    "compare": "comparison",
    "list_methods": "methods",
    "set_progress": "ui",
}

__all__ = [
    "AdaclipError",
    "Adapter",
    "AdapterFileError",
    "Backbone",
    "BackboneUnavailableError",
    "InputError",
    "Leaderboard",
    "Prediction",
    "UsageError",
    "__version__",
    "compare",
    "create_backbone",
    "fit",
    "list_methods",
    "load",
    "set_progress",
    "zero_shot_adapter",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adaclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
