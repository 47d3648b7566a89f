"""Specification of the evaluations: perplexity by position (train/evaluation/eval.py) and synthetic retrieval (train/evaluation/retrieval.py)."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.config import load_model_config
from model.lm import TTTLM
from train.data.prepare import prepare
from train.data.tokenizer import ByteTokenizer
from train.evaluation import eval as ppl_eval
from train.evaluation import retrieval
from train.generation.export import save_exported


def tiny_model(seed: int = 0) -> TTTLM:
    torch.manual_seed(seed)
    return TTTLM(load_model_config("configs/model/tiny.yaml", ["ttt.chunk_size=16", "window_size=16"])).eval()


def test_buckets_partition_the_positions_and_average_to_the_model_loss() -> None:
    model = tiny_model()
    batches = [torch.randint(0, 256, (2, 51), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = ppl_eval.evaluate_perplexity_by_position(model, batches, bucket_size=16)
    assert [(b["start"], b["end"]) for b in result["buckets"]] == [(0, 16), (16, 32), (32, 48), (48, 50)]
    with torch.no_grad():
        expected = sum(model(t[:, :-1], t[:, 1:]).loss for t in batches) / len(batches)
    weighted = sum(b["loss"] * b["tokens"] for b in result["buckets"]) / result["tokens"]
    # float32 model; the sums are taken in float64, so agreement is at float32 rounding of the logits
    assert weighted == pytest.approx(expected.item(), rel=1e-5)
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_eval_len_cuts_the_sequences() -> None:
    batches = [torch.randint(0, 256, (1, 65))]
    result = ppl_eval.evaluate_perplexity_by_position(tiny_model(), batches, bucket_size=10, eval_len=20)
    assert result["buckets"][-1]["end"] == 20 and result["tokens"] == 20


def test_command_line_reads_mds_and_writes_json_figure_and_tensorboard(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    prepare([corpus, corpus], tmp_path / "data", seq_len=64, tokenizer=ByteTokenizer(), val_fraction=0.5, show_progress=False)
    save_exported(tiny_model(), tmp_path / "export")
    out = tmp_path / "eval"
    ppl_eval.main(["--model", str(tmp_path / "export"), "--data", str(tmp_path / "data"), "--bucket-size", "16",
                   "--max-batches", "3", "--batch-size", "2", "--out", str(out), "--train-len", "32"])  # fmt: skip
    result = json.loads((out / "ppl_by_position.json").read_text())
    assert len(result["buckets"]) == 4 and result["tokens"] == 3 * 2 * 64
    assert (out / "ppl_by_position.png").stat().st_size > 0
    assert list(out.glob("events.out.tfevents.*"))


NEEDLE = re.compile(r"The pass key is \d+\. Remember it\. \d+ is the pass key\. |One of the special magic numbers for \w+ is: \d+\. ")


@pytest.mark.parametrize("task", retrieval.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_samples_have_the_requested_length_and_hide_the_needles_at_their_depth(task: str, depth: float) -> None:
    sample = retrieval.make_sample(task, 2000, depth, random.Random(0))
    ids, owner = sample.tokens()
    assert len(ids) == len(owner) == 2000
    assert sum(o >= 0 for o in owner) == sum(len(a) for a, _ in sample.answers)
    haystack = sample.prompt[sample.prompt.index("\n") + 1 : sample.prompt.rindex("\n")]  # between intro and question
    first_needle = NEEDLE.search(haystack)
    filler = NEEDLE.sub("", haystack)
    assert len(NEEDLE.findall(haystack)) == {"niah_multiquery": 4}.get(task, 1)
    # needles sit at a sentence start, at most one filler sentence (< 25 characters) before the depth
    assert 0 <= depth * len(filler) - first_needle.start() < 25


class OracleModel(nn.Module):
    """Predicts the true next token of known sequences, except at the positions listed in `wrong`."""

    def __init__(self, sequences: torch.Tensor, wrong: list[tuple[int, int]]) -> None:
        super().__init__()
        self.embed = nn.Embedding(1, 1)
        self.sequences, self.wrong = sequences, wrong

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        targets = self.sequences[:, 1 : ids.shape[1] + 1].clone()
        for row, position in self.wrong:
            targets[row, position] = (targets[row, position] + 1) % 256
        return SimpleNamespace(logits=10.0 * F.one_hot(targets, 256).float())


def test_an_answer_counts_only_when_every_token_is_right() -> None:
    samples = [retrieval.make_sample("niah_multiquery", 1200, 0.5, random.Random(i)) for i in range(2)]
    ids = torch.tensor([s.tokens()[0] for s in samples])
    assert retrieval.score_samples(OracleModel(ids, []), samples)[0] == 1.0
    owner = samples[1].tokens()[1]
    first_answer_token = owner.index(0) - 1  # the prediction whose target is the answer's first token
    accuracy, _ = retrieval.score_samples(OracleModel(ids, [(1, first_answer_token)]), samples)
    assert accuracy == pytest.approx(7 / 8)  # 2 samples x 4 queries, one of them broken


def test_retrieval_command_writes_a_heat_map_per_task(tmp_path) -> None:
    save_exported(tiny_model(), tmp_path / "export")
    out = tmp_path / "retrieval"
    retrieval.main(["--model", str(tmp_path / "export"), "--lengths", "1000", "1500", "--depths", "0", "1",
                    "--samples", "2", "--out", str(out)])  # fmt: skip
    for task in retrieval.TASKS:
        result = json.loads((out / f"{task}.json").read_text())
        assert len(result["accuracy"]) == 2 and len(result["accuracy"][0]) == 2
        assert (out / f"{task}.png").stat().st_size > 0


def test_batches_across_the_cells_of_a_length_score_as_one_sample_at_a_time() -> None:
    """Batches of 3 over 2 depths x 2 samples straddle cells; every cell must come out as unbatched."""
    model = tiny_model()
    batched = retrieval.evaluate_retrieval(model, "passkey", [1000], [0.0, 1.0], 2, batch_size=3)
    single = retrieval.evaluate_retrieval(model, "passkey", [1000], [0.0, 1.0], 2, batch_size=1)
    assert batched["accuracy"] == single["accuracy"]
    assert batched["logprob"][0] == pytest.approx(single["logprob"][0], rel=1e-5)  # float32 model, batched matmuls
