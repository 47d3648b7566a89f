"""`python -m train CONFIG.yaml [key=value ...]`: train a model (under torchrun or deepspeed).

The `deepspeed` launcher appends `--local_rank=N`; the rank comes from the environment instead,
so that argument is dropped here.
"""

from __future__ import annotations

import sys

from model.config import ConfigError
from train.config import load_run_config
from train.loop import NonFiniteLossError, train

DEFAULT_CONFIG = "configs/train/tiny_cpu.yaml"


def split_arguments(argv: list[str]) -> tuple[str, list[str]]:
    """(config path, dotlist overrides) with launcher-added --local_rank arguments removed."""
    kept: list[str] = []
    skip_next = False
    for argument in argv:
        if skip_next:
            skip_next = False
        elif argument == "--local_rank":
            skip_next = True
        elif not argument.startswith("--local_rank="):
            kept.append(argument)
    if kept and kept[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    if kept and "=" not in kept[0]:
        return kept[0], kept[1:]
    return DEFAULT_CONFIG, kept


def main(argv: list[str]) -> None:
    path, overrides = split_arguments(argv)
    try:
        train(load_run_config(path, overrides))
    except (ConfigError, NonFiniteLossError) as error:
        raise SystemExit(f"train: {error}") from error


if __name__ == "__main__":
    main(sys.argv[1:])
