"""Defaults that the library and the command line share, in a module that imports nothing: the CLI
shows them in its help without importing torch, and the library's functions take them from here."""

DEFAULT_BACKBONE = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"  # open_clip's tag for OpenAI's CLIP weights
DEFAULT_METHOD = "adaring"
