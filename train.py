"""Train, validate, test or predict: ``python train.py fit --config configs/sft.yaml``.

Search a learning rate or a batch size first (``src/tune.py``):
``python train.py lr_find --config configs/sft.yaml``, ``python train.py scale_batch_size ...``.
"""

import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException

from src.callbacks import DivergenceError
from src.cli import cli_main, close_process_group
from src.datamodules import DataError
from src.errors import ConfigError, PathNotFoundError, one_line
from src.tune import TUNE_COMMANDS
from src.tune import main as tune_main

# errors worded for the user: shown as one line, not as a traceback
PREFIXES: dict[type[Exception], str] = {
    DataError: "data error",  # the user's data
    DivergenceError: "training diverged",  # a NaN/Inf loss or gradient: the step
    PathNotFoundError: "error",  # a mistyped model, tokenizer, adapter or checkpoint path
    ConfigError: "config error",  # a mistyped key or value, settings that cannot work
    # together or on this machine, a refused resume
    MisconfigurationException: "config error",  # Lightning's word for the same
}


def user_error(err: BaseException | None) -> tuple[str, BaseException] | None:
    """The prefix and the error of ours behind ``err``, if any: jsonargparse re-raises what a
    class raises while it is instantiated as a ValueError of its own, caused by the original."""
    while err is not None:
        for kind, prefix in PREFIXES.items():
            if isinstance(err, kind):
                return prefix, err
        err = err.__cause__
    return None


if __name__ == "__main__":
    try:
        if len(sys.argv) > 1 and sys.argv[1] in TUNE_COMMANDS:
            tune_main(sys.argv[1], sys.argv[2:])
        else:
            cli_main()
        close_process_group()
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        sys.exit(f"{found[0]}: {one_line(found[1])}")
