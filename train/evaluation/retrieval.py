"""`python -m train.evaluation.retrieval --model FOLDER`: synthetic long-context retrieval over lengths x depths.

Three generated tasks (no download), byte-level text as the byte tokenizer reads it:
* `passkey`: a 5-digit pass key hidden in repeated filler text (Mohtashami & Jaggi, 2023);
* `niah_single`: RULER's S-NIAH, "One of the special magic numbers for <word> is: <7 digits>";
* `niah_multiquery`: RULER's multi-query NIAH in the spirit of MQAR: a block of `num_needles`
  key-value needles at the depth, every key queried afterwards (each answer follows the previous one).

`depth` is where the needle (block) sits in the haystack, 0 = start, 1 = end; every sample has exactly
the requested length in tokens. Answers are scored by teacher forcing: an answer is correct when the
argmax at each of its tokens is that token, which is exactly "greedy decoding reproduces it" but costs
one forward pass per batch. The mean log-probability of the answer tokens is reported beside it.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch.utils.tensorboard import SummaryWriter

from train.evaluation.eval import LanguageModel, add_model_arguments, load_for_eval, publish
from train.job.cli import DEBUG_HELP, run_command

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASKS = ("passkey", "niah_single", "niah_multiquery")
BYTE_VOCAB = 256


@dataclass
class RetrievalSample:
    """Text pieces: the prompt, then (answer, following text) pairs; the answers are what is scored."""

    prompt: str
    answers: list[tuple[str, str]]

    def tokens(self) -> tuple[list[int], list[int]]:
        """Byte ids [T] and, per position, the index of the answer the token belongs to (-1: not scored)."""
        ids = list(self.prompt.encode("utf-8"))
        owner = [-1] * len(ids)
        for index, (answer, following) in enumerate(self.answers):
            answer_ids, following_ids = list(answer.encode("utf-8")), list(following.encode("utf-8"))
            ids += answer_ids + following_ids
            owner += [index] * len(answer_ids) + [-1] * len(following_ids)
        return ids, owner


def _haystack(length: int) -> str:
    return (FILLER * (length // len(FILLER) + 1))[:length]


def _insert(haystack: str, depth: float, needle: str) -> str:
    """Put `needle` at fraction `depth` of the haystack, moved back to the nearest sentence start."""
    cut = int(depth * len(haystack))
    boundary = haystack.rfind(". ", 0, cut)
    cut = 0 if boundary < 0 or cut == 0 else boundary + 2
    return haystack[:cut] + needle + haystack[cut:]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(8))


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _sample_parts(task: str, rng: random.Random, num_needles: int) -> tuple[str, str, list[tuple[str, str]]]:
    """(intro, needle text, [(question, answer)]) of one sample of `task`."""
    if task == "passkey":
        key = _digits(rng, 5)
        intro = "There is important information hidden inside a lot of irrelevant text. Find it and remember it.\n"
        needles = f"The pass key is {key}. Remember it. {key} is the pass key. "
        return intro, needles, [("\nWhat is the pass key? The pass key is ", key)]
    if task in ("niah_single", "niah_multiquery"):
        count = 1 if task == "niah_single" else num_needles
        facts = [(_word(rng), _digits(rng, 7)) for _ in range(count)]
        intro = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
        needles = "".join(f"One of the special magic numbers for {word} is: {number}. " for word, number in facts)
        rng.shuffle(facts)
        questions = [
            (f"\nWhat is the special magic number for {word} mentioned in the provided text? The special magic number for {word} is ", number)
            for word, number in facts
        ]
        return intro, needles, questions
    raise ValueError(f"task={task!r} must be one of {TASKS}")


def minimum_length(task: str, num_needles: int = 4) -> int:
    """The shortest sample of `task` in tokens: its fixed text plus one filler sentence block
    (the same for every sample: keys and words have fixed lengths)."""
    intro, needles, questions = _sample_parts(task, random.Random(0), num_needles)
    return len(intro) + len(needles) + sum(len(q) + len(a) for q, a in questions) + len(FILLER)


def check_lengths(tasks: list[str], lengths: list[int]) -> None:
    """Refuse, before any task runs, lengths too short for some task."""
    too_short = [f"{task} needs >= {minimum_length(task)}" for task in tasks if min(lengths) < minimum_length(task)]
    if too_short:
        raise ValueError(f"--lengths {min(lengths)} is too short: {', '.join(too_short)} tokens; raise the smallest length")


def make_sample(task: str, length: int, depth: float, rng: random.Random, num_needles: int = 4) -> RetrievalSample:
    """One sample of `task` whose byte length is exactly `length`, needle(s) at `depth` in [0, 1]."""
    intro, needles, questions = _sample_parts(task, rng, num_needles)
    fixed = len(intro) + len(needles) + sum(len(q) + len(a) for q, a in questions)
    if length < fixed + len(FILLER):
        raise ValueError(f"length={length} is too short for {task}: it needs at least {fixed + len(FILLER)} tokens")
    text = intro + _insert(_haystack(length - fixed), depth, needles)
    answers = [(answer, questions[i + 1][0] if i + 1 < len(questions) else "") for i, (_, answer) in enumerate(questions)]
    return RetrievalSample(text + questions[0][0], answers)


@torch.no_grad()
def score_each(model: LanguageModel, samples: list[RetrievalSample]) -> list[tuple[float, float]]:
    """Per sample of an equal-length batch: (fraction of its answers greedy decoding reproduces, mean
    log-probability of its answer tokens), from one teacher-forced forward pass."""
    encoded = [s.tokens() for s in samples]
    device = model.embed.weight.device
    ids = torch.tensor([e[0] for e in encoded], device=device)  # [B, T]
    owner = torch.tensor([e[1] for e in encoded], device=device)[:, 1:]  # [B, T-1]: answer of each prediction's target
    logits = model(ids[:, :-1]).logits  # [B, T-1, V]
    targets = ids[:, 1:]
    hits = (logits.argmax(dim=-1) == targets).tolist()
    token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(2, targets[..., None])[..., 0]  # [B, T-1]
    scored = owner >= 0
    logprobs = ((token_logprobs * scored).sum(dim=1) / scored.sum(dim=1)).tolist()
    owners = owner.tolist()
    scores = []
    for row, sample in enumerate(samples):
        correct = [all(h for h, o in zip(hits[row], owners[row]) if o == answer) for answer in range(len(sample.answers))]
        scores.append((sum(correct) / len(correct), logprobs[row]))
    return scores


def score_samples(model: LanguageModel, samples: list[RetrievalSample]) -> tuple[float, float]:
    """(fraction of answers greedy decoding reproduces, mean log-probability per answer token) of
    equal-length samples (every sample of a task has as many answers and answer tokens)."""
    scores = score_each(model, samples)
    return sum(a for a, _ in scores) / len(scores), sum(lp for _, lp in scores) / len(scores)


def evaluate_retrieval(
    model: LanguageModel,
    task: str,
    lengths: list[int],
    depths: list[float],
    samples_per_cell: int,
    seed: int = 0,
    batch_size: int = 4,
) -> dict:
    """Accuracy and answer log-probability of `task` on every (length, depth) cell: [len(lengths)][len(depths)].

    All samples of one length (every depth) have the same token count, so they are scored together
    in batches of `batch_size` that run across the cells of a row of the grid.
    """
    if model.cfg.vocab_size < BYTE_VOCAB:
        raise ValueError(f"model.vocab_size={model.cfg.vocab_size}: the retrieval tasks are byte-level text and need >= {BYTE_VOCAB}")
    rng = random.Random(seed)
    accuracy, logprob = [], []
    for length in lengths:
        samples = [make_sample(task, length, depth, rng) for depth in depths for _ in range(samples_per_cell)]
        scores = [score for i in range(0, len(samples), batch_size) for score in score_each(model, samples[i : i + batch_size])]
        cells = [scores[d * samples_per_cell : (d + 1) * samples_per_cell] for d in range(len(depths))]
        accuracy.append([sum(a for a, _ in cell) / samples_per_cell for cell in cells])
        logprob.append([sum(lp for _, lp in cell) / samples_per_cell for cell in cells])
    return {"task": task, "lengths": lengths, "depths": depths, "samples_per_cell": samples_per_cell, "accuracy": accuracy, "logprob": logprob}


def plot_heatmap(result: dict) -> plt.Figure:
    """Accuracy heat map: context length (rows) x needle depth (columns), each cell annotated."""
    figure, axis = plt.subplots(figsize=(1.2 * len(result["depths"]) + 2.5, 0.6 * len(result["lengths"]) + 1.8))
    image = axis.imshow(result["accuracy"], vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    axis.set_xticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    axis.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    axis.set_xlabel("needle depth")
    axis.set_ylabel("context length (tokens)")
    for row, values in enumerate(result["accuracy"]):
        for column, value in enumerate(values):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axis.set_title(f"{result['task']}: accuracy ({result['samples_per_cell']} samples per cell)")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluation.retrieval", description=__doc__.split("\n\n")[0], epilog=DEBUG_HELP)
    add_model_arguments(parser)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples", type=int, default=10, help="samples per (length, depth) cell")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/retrieval"), help="folder for <task>.{json,png}")
    parser.add_argument("--tensorboard", type=Path, default=None, help="TensorBoard log folder (default: --out)")
    parser.add_argument("--step", type=int, default=0)
    args = parser.parse_args(argv)
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error(f"--depths {args.depths} must lie in [0, 1]")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    check_lengths(args.tasks, args.lengths)
    model = load_for_eval(args)
    writer = SummaryWriter(str(args.tensorboard or args.out))
    for task in args.tasks:
        result = evaluate_retrieval(model, task, args.lengths, args.depths, args.samples, args.seed, args.batch_size)
        publish(plot_heatmap(result), result, task, args.out, writer, args.step)
        mean = sum(map(sum, result["accuracy"])) / (len(args.lengths) * len(args.depths))
        print(f"{task}: mean accuracy {mean:.3f} over {len(args.lengths)} lengths x {len(args.depths)} depths -> {args.out}/{task}.json")
    writer.close()


if __name__ == "__main__":
    run_command("train.evaluation.retrieval", main, sys.argv[1:])
