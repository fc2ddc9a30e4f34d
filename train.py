"""Entry point for `accelerate launch train.py --config configs/X.yaml`: the whole refcal pipeline, the same
as `refcal run` (its flags, and its one-line errors)."""

import sys

from train.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
