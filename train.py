"""Entry point for `accelerate launch train.py --config configs/X.yaml`: the whole refcal pipeline, the same
as `refcal run` (its flags, and its one-line errors). Any other refcal command runs the same way when named
first: `accelerate launch train.py retrain --config X --adapter DIR --tasks NEW.yaml`, `... train.py train ...`.
"""

import sys

from refcal.train.cli import COMMANDS, main

if __name__ == "__main__":
    argv = sys.argv[1:]
    main(argv if argv and argv[0] in COMMANDS else ["run", *argv])
