"""The passkey and single-needle tasks of train/evaluation/retrieval.py as lm-evaluation-harness tasks.

Samples are generated here (`custom_dataset`), `samples` per context length in `lengths` (the task
metadata: `--lengths`, `--samples` of `python -m train.evaluation.harness`, or lm_eval's
`--metadata`), needles spread over the depths 0, 0.25, 0.5, 0.75, 1. A length counts UTF-8 bytes,
which are the tokens of a byte-level model. The model continues the prompt greedily; an answer is
right when its text starts with the needle's value, as retrieval.py scores it by teacher forcing.
Each length has its own metric, `acc@<length>` (RULER's layout): a sample scores under its length
and leaves -1 (absent) under the others.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import datasets

from train.evaluation.retrieval import make_sample

LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)  # one metric each in _retrieval.yaml; all hold a needle
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_SAMPLES = 10
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ABSENT = -1.0


def metric_name(length: int) -> str:
    return f"acc@{length}"


def retrieval_dataset(task: str, lengths: Sequence[int] = DEFAULT_LENGTHS, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> dict[str, datasets.Dataset]:
    """`samples` prompts of `task` per length, with the answer, length and depth of each."""
    unknown = sorted(set(lengths) - set(LENGTHS))
    if unknown:
        raise ValueError(f"--lengths {unknown}: the retrieval tasks score the lengths {list(LENGTHS)}")
    if samples < 1:
        raise ValueError(f"--samples {samples} must be >= 1")
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for index in range(samples):
            depth = DEPTHS[index % len(DEPTHS)]
            sample = make_sample(task, length, depth, rng)
            rows.append({"context": sample.prompt, "answer": sample.answers[0][0], "length": length, "depth": depth})
    return {"test": datasets.Dataset.from_list(rows)}


def passkey(lengths: Sequence[int] = DEFAULT_LENGTHS, samples: int = DEFAULT_SAMPLES, **_: Any) -> dict[str, datasets.Dataset]:
    return retrieval_dataset("passkey", lengths, samples)


def niah_single(lengths: Sequence[int] = DEFAULT_LENGTHS, samples: int = DEFAULT_SAMPLES, **_: Any) -> dict[str, datasets.Dataset]:
    return retrieval_dataset("niah_single", lengths, samples)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    correct = float(results[0].strip().startswith(doc["answer"]))
    return {metric_name(length): correct if length == doc["length"] else ABSENT for length in LENGTHS}


def mean_of_present(scores: list[float]) -> float:
    """The mean over the samples of one length; -1 when that length was not asked for."""
    present = [score for score in scores if score != ABSENT]
    return sum(present) / len(present) if present else ABSENT
