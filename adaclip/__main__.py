"""`python -m adaclip` (also what `torchrun -m adaclip` runs)."""

from ._interrupt import exit_130_until_started

exit_130_until_started()

from .cli import main  # noqa: E402

if __name__ == "__main__":
    main()
