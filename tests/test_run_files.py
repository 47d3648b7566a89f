"""What a run leaves on disk and reads back: data shards checked against their index, a resumed
run's config compared with its checkpoint's, metrics without repeated steps, exported file modes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from model.config import ConfigError, load_model_config
from model.lm import TTTLM
from train.checkpoint import RUN_CONFIG
from train.config import DataConfig, load_run_config, to_yaml
from train.config_changes import check_config_changes
from train.data.loader import check_split
from train.data.prepare import prepare
from train.data.tokenizer import ByteTokenizer
from train.generation.export import WEIGHTS_FILE, save_exported
from train.monitor import truncate_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/train/tiny_cpu.yaml"


def test_a_truncated_shard_is_named_with_both_sizes(tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_text("abc " * 500)
    prepare([tmp_path / "doc.txt"], tmp_path / "data", 15, ByteTokenizer(), val_fraction=0.0, show_progress=False)
    shard = tmp_path / "data/train/shard.00000.mds"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"shard {shard} is 100 bytes but .*index.json records {size}"):
        check_split(DataConfig(path=str(tmp_path / "data"), seq_len=15), "train")


def checkpoint_of(tmp_path: Path, *overrides: str) -> Path:
    folder = tmp_path / "step_00000010"
    folder.mkdir()
    (folder / RUN_CONFIG).write_text(to_yaml(load_run_config(TINY, list(overrides))))
    return folder


def test_resume_lists_the_settings_it_changes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = checkpoint_of(tmp_path)
    check_config_changes(load_run_config(TINY, ["train.lr=1e-4", "train.resume=auto"]), checkpoint)
    printed = capsys.readouterr().out
    assert "changes 1 setting(s)" in printed and "train.lr: 0.003 -> 0.0001" in printed


def test_resume_refuses_another_model_shape(tmp_path: Path) -> None:
    checkpoint = checkpoint_of(tmp_path)
    with pytest.raises(ConfigError, match=r"model.hidden_size: 128 -> 64 changes \d+ parameter"):
        check_config_changes(load_run_config(TINY, ["model.hidden_size=64"]), checkpoint)


def test_metrics_of_steps_after_the_resumed_one_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 7)) + '{"step": 7, "lo')
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_exported_weights_get_the_usual_file_mode(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        torch.manual_seed(0)
        folder = save_exported(TTTLM(load_model_config("configs/model/tiny.yaml")), tmp_path / "export")
    finally:
        os.umask(previous)
    assert (folder / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644
