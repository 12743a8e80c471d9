"""`python -m adaclip` (also what `torchrun -m adaclip` runs)."""

from ._interrupt import main

if __name__ == "__main__":
    main()
