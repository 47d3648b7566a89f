"""The training loader's batches reach the GPU without stopping the host.

A copy from pageable host memory may first wait for everything queued on the device; on a step whose
host time is close to its device time (the 125M trainer at 16K), one such wait per micro-batch leaves
the GPU idle while the host queues the next forward. The loader pins its batches, so the copy joins
the queue and returns at once. The test queues a long device sleep, then times the copies the
trainer makes (tokens, and the document ids sliced on the device) on the host: they return before
the sleep ends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.multiprocess import small_corpus

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SLEEP_CYCLES = 500_000_000  # about 0.3 s on a 1.7 GHz clock
SEQ_LEN = 8192  # 2 x 8193 int64 tokens: the 128 KB a 16K-token micro-batch copies


def host_seconds_to_queue(copy: Callable[[], object]) -> float:
    """Host time of `copy()` issued behind a long device sleep."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    start = time.perf_counter()
    copy()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds


def sleep_seconds() -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(SLEEP_CYCLES)
    torch.cuda.synchronize()
    return time.perf_counter() - start


@requires_cuda
def test_loader_batches_are_pinned_and_copy_without_waiting(tmp_path: Path) -> None:
    from train.config import DataConfig
    from train.data.loader import build_loader, input_doc_ids

    data = DataConfig(path=str(small_corpus(tmp_path / "data", SEQ_LEN, val_fraction=0.0)), seq_len=SEQ_LEN,
                      reset_at_doc_boundaries=True)
    batch = next(iter(build_loader(data, "train", 2, sp=1, shuffle=False)))  # 2 rows: a host slice would be strided
    assert batch["tokens"].is_pinned() and batch["doc_ids"].is_pinned()
    sleep = sleep_seconds()
    assert sleep > 0.05, f"the device sleep took {sleep:.3f} s: too short to tell a wait from none"
    # What the loader avoids (how long a pageable copy of the same batch waits), for the failure message.
    pageable = host_seconds_to_queue(lambda: batch["tokens"].clone().to("cuda", non_blocking=True))
    copies = {"tokens": lambda: batch["tokens"].to("cuda", non_blocking=True),
              "doc_ids": lambda: input_doc_ids(batch, data, torch.device("cuda"))}
    for name, copy in copies.items():
        waited = host_seconds_to_queue(copy)
        assert waited < sleep / 10, (f"the loader's {name} waited {waited:.3f} s for a {sleep:.3f} s queue "
                                     f"(a pageable copy: {pageable:.3f} s)")
