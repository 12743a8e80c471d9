"""`python -m adaclip` (also what `torchrun -m adaclip` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
