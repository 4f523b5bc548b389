"""Train, validate, test or predict: ``python train.py fit --config configs/sft.yaml``."""

import sys

from src.callbacks import DivergenceError
from src.cli import cli_main
from src.datamodules import DataError

if __name__ == "__main__":
    try:
        cli_main()
    except DataError as err:  # the user's data: a message, not a traceback
        sys.exit(f"data error: {err}")
    except DivergenceError as err:  # a NaN/Inf loss or gradient: the step, not a traceback
        sys.exit(f"training diverged: {err}")
