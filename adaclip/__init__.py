"""adaclip: adapt a pretrained CLIP model to your own images."""

from ._version import __version__

__all__ = ["__version__"]
