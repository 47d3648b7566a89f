"""Datasets of the tttla tasks, read from files beside the task YAMLs (no hub, no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def jsonl(file: str, **_: Any) -> dict[str, datasets.Dataset]:
    """The test split of the JSON-lines `file` (relative to this folder); a task's `dataset_kwargs`
    name it, and lm-evaluation-harness passes the task metadata too (ignored)."""
    rows = [json.loads(line) for line in (HERE / file).read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
