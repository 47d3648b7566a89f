"""Sample placement of the training loader on a world of 2 ranks: with sp = 1 the two ranks are
two data-parallel groups and read disjoint samples; with sp = 2 they are one sequence-parallel
group and read the same samples. Both ranks run as separate processes (streaming coordinates
ranks through shared memory, as under torchrun); one launch reads both layouts."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BATCHES = 4


def read_batches(data: Path, rank: int, out: Path) -> None:
    """The per-rank side: the first BATCHES micro-batches' token rows for sp = 1 and sp = 2."""
    from train.config import DataConfig
    from train.data.loader import build_loader

    for sp in (1, 2):
        loader = build_loader(DataConfig(path=str(data), seq_len=32), "train", micro_batch_size=2, sp=sp, shuffle=True)
        rows = [row for _, batch in zip(range(BATCHES), loader) for row in batch["tokens"].tolist()]
        (out / f"sp{sp}_rank{rank}.json").write_text(json.dumps(rows))
        del loader
        gc.collect()  # release the dataset's shared memory before the next layout


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[list[list[int]]]]:
    """sp -> [rank 0 rows, rank 1 rows]."""
    from train.data.prepare import prepare, stdlib_files
    from train.data.tokenizer import ByteTokenizer

    tmp = tmp_path_factory.mktemp("loader")
    prepare(stdlib_files()[:5], tmp / "data", 32, ByteTokenizer(), val_fraction=0.0, show_progress=False)
    processes, port = [], 29000 + os.getpid() % 1000
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}  # fmt: skip
        command = [sys.executable, __file__, str(tmp / "data"), str(rank), str(tmp)]
        processes.append(subprocess.Popen(command, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-4000:]
    return {sp: [json.loads((tmp / f"sp{sp}_rank{rank}.json").read_text()) for rank in range(2)] for sp in (1, 2)}


@pytest.mark.slow
def test_data_parallel_ranks_read_disjoint_samples(rows: dict) -> None:
    rank0, rank1 = rows[1]
    assert len(rank0) == len(rank1) == 2 * BATCHES
    assert not {tuple(r) for r in rank0} & {tuple(r) for r in rank1}


@pytest.mark.slow
def test_sequence_parallel_ranks_read_the_same_samples(rows: dict) -> None:
    rank0, rank1 = rows[2]
    assert len(rank0) == 2 * BATCHES and rank0 == rank1


if __name__ == "__main__":
    read_batches(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
