"""`python -m train.evaluation.harness --model FOLDER --tasks T1,T2`: lm-evaluation-harness scores of an export.

The model is `tttla` (train/evaluation/harness_model.py: scoring in the chunk form, generation with
the constant-size decoding state). The tasks in train/evaluation/tasks/ (held-out Python code, and
the passkey and needle retrieval of train/evaluation/retrieval.py) are always on the task path, and
lm-evaluation-harness's own tasks are there too (those download their data). `--lengths` sets the
contexts of the retrieval tasks, so that one command scores short and long context. The table is
lm-evaluation-harness's own; `--output` keeps its JSON. Bad input (an export folder without its
files, an unknown task, a request longer than `--max-length`, a context too short for a needle)
ends the command with one line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from train.evaluation.harness_model import TTTLAHarnessLM
from train.generation.export import check_exported
from train.generation.generate import DTYPES
from train.job.cli import DEBUG_HELP, run_command

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluation.harness", description=__doc__.split("\n\n")[0], epilog=DEBUG_HELP)
    parser.add_argument("--model", required=True, help="exported model folder (python -m train.generation.export writes one)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-evaluation-harness task names")
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help="contexts of the retrieval tasks (tokens of a byte model)")
    parser.add_argument("--samples", type=int, default=None, help="retrieval samples per length")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="refuse requests longer than this (default: no limit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--include-path", action="append", default=[], help="another folder of task YAMLs (repeatable)")
    parser.add_argument("--output", type=Path, default=None, help="write lm-evaluation-harness's results JSON here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def task_manager(include_paths: list[str], metadata: dict[str, Any]) -> TaskManager:
    """lm-evaluation-harness's task index with the tttla tasks (and `include_paths`) on it; `metadata`
    reaches every task's dataset builder (the retrieval tasks read `lengths` and `samples`)."""
    return TaskManager(include_path=[str(TASKS_DIR), *include_paths], metadata=metadata)


def check_tasks(manager: TaskManager, names: list[str]) -> None:
    """Refuse, before the model loads, a task name the index does not hold (naming close ones)."""
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"--tasks: unknown task {name!r}; {hint}`lm_eval ls tasks` lists them (add folders with --include-path)")


def without_absent_lengths(results: dict) -> dict:
    """The results without the retrieval metrics of lengths that were not asked for (scored -1)."""
    kept = {task: {key: value for key, value in metrics.items() if value != -1 and metrics.get(key.replace("_stderr", "")) != -1}
            for task, metrics in results["results"].items()}  # fmt: skip
    return {**results, "results": kept}


def evaluate(args: argparse.Namespace) -> dict:
    """Check the tasks, load the model, run lm-evaluation-harness; its results dict."""
    check_exported(args.model)  # before the task index (seconds to build) and the model
    names = [name for name in args.tasks.split(",") if name]
    metadata = {key: value for key, value in (("lengths", args.lengths), ("samples", args.samples)) if value is not None}
    manager = task_manager(args.include_path, metadata)
    check_tasks(manager, names)
    model = TTTLAHarnessLM(args.model, args.device, args.dtype, args.batch_size, args.max_length)
    return simple_evaluate(
        model=model, tasks=names, task_manager=manager, num_fewshot=args.num_fewshot, limit=args.limit, log_samples=False,
        random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )  # fmt: skip


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    results = without_absent_lengths(evaluate(args))
    print(make_table(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"results -> {args.output}")


if __name__ == "__main__":
    run_command("train.evaluation.harness", main, sys.argv[1:])
