"""Entry point for `accelerate launch train.py --config configs/X.yaml`: the whole refcal pipeline."""

import sys

from train.cli import run_pipeline

if __name__ == "__main__":
    run_pipeline(sys.argv[1:])
