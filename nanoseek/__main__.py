"""`python -m nanoseek` (and `torchrun -m nanoseek`) run the command-line interface."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
