"""`python -m train [CONFIG.yaml] [section.key=value ...]`: train a model (under torchrun or deepspeed).

The `deepspeed` launcher appends `--local_rank=N`; the rank comes from the environment instead,
so that argument is dropped here. `--help` lists the config sections without importing the
training stack (DeepSpeed takes seconds to import).
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap

from train.config import RunConfig, load_run_config
from train.job.cli import DEBUG_HELP, StoppedBySignal, run_command

DEFAULT_CONFIG = "configs/train/tiny_cpu.yaml"
HELP_FLAGS = ("-h", "--help")


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
    if kept and "=" not in kept[0]:
        return kept[0], kept[1:]
    return DEFAULT_CONFIG, kept


def help_text() -> str:
    """Usage and the config sections: each one's purpose and keys (train/config.py holds the defaults)."""
    lines = [
        "usage: python -m train [CONFIG.yaml] [section.key=value ...] [--debug]",
        "",
        f"Trains the run CONFIG.yaml describes (default {DEFAULT_CONFIG}), overridden key by key;",
        "launch several processes with torchrun (`make train`, launch/torchrun.sh).",
        DEBUG_HELP + ".",
        "",
        "config sections:",
    ]
    for section in dataclasses.fields(RunConfig):
        schema = section.default_factory
        summary = (schema.__doc__ or "").strip().splitlines()[0]
        keys = ", ".join(field.name for field in dataclasses.fields(schema))
        lines.append(f"  {section.name:<11}{summary}")
        lines.extend(textwrap.wrap(keys, width=100, initial_indent=" " * 13, subsequent_indent=" " * 13))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if any(argument in HELP_FLAGS for argument in argv):
        print(help_text())
        return
    path, overrides = split_arguments(argv)
    cfg = load_run_config(path, overrides)
    import torch.distributed as dist

    from train.loop import train  # imports DeepSpeed: only once there is something to train

    try:
        result = train(cfg)
    finally:
        # The job is over in this process. Left to interpreter exit, the process group's teardown
        # aborted a failing rank now and then ("terminate called without an active exception"),
        # adding a line and a signal to its exit. (Not in `train` itself: a process may train twice.)
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.stop_signal is not None:
        raise StoppedBySignal(result.stop_signal)


if __name__ == "__main__":
    run_command("train", main, sys.argv[1:])
