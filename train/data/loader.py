"""Training batches from MDS shards with mosaicml-streaming, resumable mid-epoch.

Sample placement: the `sp` ranks of one sequence-parallel group (consecutive global ranks) read the
same samples (`replication=sp`) and slice them along the sequence; different data-parallel groups
read disjoint samples. `StreamingDataLoader.state_dict()` records how far the epoch got, so a
resumed run sees exactly the samples the interrupted one would have seen next.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from model.config import ConfigError
from train.config import DataConfig, RunConfig
from train.data.prepare import read_manifest
from train.job.cli import warn

REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "hf://", "http://", "https://", "dbfs:/")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def prepare_hint(data: DataConfig) -> str:
    return f"python -m train.data.prepare ... --out {data.path} --seq-len {data.seq_len}, or `make prepare-data`"


def check_split(data: DataConfig, split: str) -> int:
    """A local split's shards against its index.json: each present with the size the index records.

    Returns the number of samples the index lists; raises ConfigError naming the file otherwise.
    """
    folder = Path(data.path) / split
    index = folder / "index.json"
    if not index.is_file():
        raise ConfigError(f"data.path={data.path!r}: {index} not found; prepare it first ({prepare_hint(data)})")
    try:
        shards = json.loads(index.read_text())["shards"]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"data.path={data.path!r}: {index} is not a valid MDS index ({error}); prepare the data again") from error
    for shard in shards:
        files = [entry for entry in (shard.get("raw_data"), shard.get("zip_data")) if entry]
        present = [entry for entry in files if (folder / entry["basename"]).is_file()]
        if not present:
            raise ConfigError(
                f"data.path={data.path!r}: shard {folder / files[0]['basename']} is missing but {index} lists it; "
                f"restore it or prepare the data again ({prepare_hint(data)})"
            )
        entry = present[0]
        size = (folder / entry["basename"]).stat().st_size
        if size != entry["bytes"]:
            raise ConfigError(
                f"data.path={data.path!r}: shard {folder / entry['basename']} is {size} bytes but {index} records "
                f"{entry['bytes']}; it is damaged: restore it or prepare the data again ({prepare_hint(data)})"
            )
    return sum(shard["samples"] for shard in shards)


def check_dataset(cfg: RunConfig, dp: int) -> None:
    """A local prepared dataset must match the run before training starts: shards as index.json lists
    them, the same seq_len, token ids inside the vocabulary. Evaluation is turned off, with a warning,
    when the validation split cannot fill one micro-batch per data-parallel rank."""
    data = cfg.data
    if is_remote(data.path):
        return
    check_split(data, data.train_split)
    if cfg.eval.every > 0:
        _check_validation_split(cfg, dp)
    manifest = read_manifest(data.path)
    if manifest is None:
        return
    if manifest["seq_len"] != data.seq_len:
        raise ConfigError(
            f"data.seq_len={data.seq_len} but {data.path} was packed with seq_len={manifest['seq_len']}; "
            f"set data.seq_len={manifest['seq_len']} or prepare the data again with --seq-len {data.seq_len}"
        )
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of {data.path} "
            f"({manifest['tokenizer']['name']}: {vocab}); raise model.vocab_size to >= {vocab}"
        )


def _check_validation_split(cfg: RunConfig, dp: int) -> None:
    data, needed = cfg.data, cfg.train.micro_batch_size * dp
    if not (Path(data.path) / data.val_split / "index.json").is_file():
        samples, where = 0, f"{Path(data.path) / data.val_split} does not exist"
    else:
        samples = check_split(data, data.val_split)
        where = f"{Path(data.path) / data.val_split} holds {samples} samples"
    if samples < needed:
        warn(
            f"eval.every={cfg.eval.every}: {where}, fewer than one micro-batch per data-parallel rank "
            f"(train.micro_batch_size x dp = {needed}); evaluation is off for this run. Prepare the data "
            f"with a larger --val-fraction to evaluate, or set eval.every=0"
        )
        cfg.eval.every = 0


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks samples into tokens [B, L] and doc_ids [B, L] (int64), L = seq_len + 1."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples]).astype(np.int64)) for key in ("tokens", "doc_ids")}


def build_loader(data: DataConfig, split: str, micro_batch_size: int, sp: int, shuffle: bool) -> StreamingDataLoader:
    """One rank's loader; streaming reads the rank layout from the RANK/WORLD_SIZE environment."""
    remote, local = (data.path.rstrip("/") + "/" + split, None) if is_remote(data.path) else (None, str(Path(data.path) / split))
    if remote is not None:
        if data.cache_dir is None:
            raise ConfigError(f"data.path={data.path!r} is remote; set data.cache_dir to a local folder for its shards")
        local = str(Path(data.cache_dir) / split)
    dataset = StreamingDataset(
        remote=remote,
        local=local,
        batch_size=micro_batch_size,
        shuffle=shuffle,
        shuffle_seed=data.shuffle_seed,
        replication=sp if sp > 1 else None,
    )
    return StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=data.num_workers,
        collate_fn=_collate,
        drop_last=True,
        persistent_workers=data.num_workers > 0,
        # Pinned batches: a copy from pageable memory may wait for the device's queue to drain first
        # (CUDA allows it to), so each micro-batch's `.to(device, non_blocking=True)` could stop the host
        # from running ahead.
        pin_memory=torch.cuda.is_available(),
    )


def split_inputs_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, L] -> input_ids [B, L-1], targets [B, L-1] (targets[t] = tokens[t + 1])."""
    return tokens[:, :-1], tokens[:, 1:]


def input_doc_ids(batch: dict[str, torch.Tensor], data: DataConfig, device: torch.device) -> Optional[torch.Tensor]:
    """The documents of the input positions [B, L-1] when `data.reset_at_doc_boundaries`, else None."""
    if not data.reset_at_doc_boundaries:
        return None
    # Sliced on the device: copying a strided host slice would first gather it into pageable memory.
    return batch["doc_ids"].to(device, non_blocking=True)[:, :-1]


def endless(loader: StreamingDataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches across epoch boundaries; each new pass over the loader is the dataset's next epoch.

    A run resumed exactly at the end of an epoch gets one empty pass; two in a row mean the split
    cannot fill a single micro-batch.
    """
    empty_passes = 0
    while empty_passes < 2:
        empty_passes += 1
        for batch in loader:
            empty_passes = 0
            yield batch
    raise ValueError(
        "the training split yields no full micro-batch on this rank; lower train.micro_batch_size or prepare more data"
    )
