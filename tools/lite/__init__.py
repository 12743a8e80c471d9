"""Scripts that reproduce adaclip/lite/heads.safetensors from installed packages (docs/lite.md)."""
