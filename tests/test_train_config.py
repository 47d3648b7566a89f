"""The run config: composition by `include:`, schema errors that name the key, derived layout, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import ConfigError
from train.__main__ import DEFAULT_CONFIG, split_arguments
from parallel.groups import ParallelDims
from train.config import flat_compile_options, load_run_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((REPO / "configs/train").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_train_config_loads(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.data.seq_len % cfg.parallel.sp == 0


def test_includes_merge_in_order_and_the_file_wins() -> None:
    cfg = load_run_config(REPO / "configs/train/tiny_cpu.yaml")
    assert cfg.model.vocab_size == 256 and cfg.model.num_layers == 2  # from configs/model/tiny.yaml
    assert cfg.zero.stage == 2  # from configs/zero/zero2.yaml
    assert cfg.data.path == "data/stdlib"  # from configs/corpus/stdlib.yaml
    assert cfg.train.steps == 200  # the file's own key


def test_overrides_apply_last() -> None:
    cfg = load_run_config(REPO / "configs/train/tiny_cpu.yaml", ["train.lr=3e-4", "zero.stage=3", "model.ttt.chunk_size=32"])
    assert (cfg.train.lr, cfg.zero.stage, cfg.model.ttt.chunk_size) == (3e-4, 3, 32)


def test_nested_includes_resolve_relative_to_their_file(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts/inner.yaml").write_text("train:\n  lr: 0.5\n")
    (tmp_path / "parts/outer.yaml").write_text("include: [inner.yaml]\ntrain:\n  steps: 70\n")
    (tmp_path / "run.yaml").write_text("include: [parts/outer.yaml]\n")
    cfg = load_run_config(tmp_path / "run.yaml")
    assert (cfg.train.lr, cfg.train.steps) == (0.5, 70)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.learning_rate=1e-3", "learning_rate"),  # unknown key
        ("train.steps=many", "train.steps"),  # wrong type
        ("zero.stage=4", "zero.stage"),
        ("train.schedule=linear", "train.schedule"),
        ("model.ttt.chunk_size=0", "model.ttt.chunk_size"),
        ("eval.every=-1", "eval.every"),
        ("train.compile_options.cpp_wraper=true", "train.compile_options.cpp_wraper"),  # not an Inductor option
    ],
)
def test_bad_values_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_run_config(REPO / "configs/train/tiny_cpu.yaml", [override])


def test_an_override_error_names_the_override_not_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^override train.steps=many: Value 'many' .* \(key train.steps\)"):
        load_run_config(REPO / "configs/train/tiny_cpu.yaml", ["train.steps=many"])


def test_an_override_without_a_value_says_so() -> None:
    with pytest.raises(ConfigError, match=r"^override 'train.steps' has no '=': write it as section.key=value"):
        load_run_config(REPO / "configs/train/tiny_cpu.yaml", ["train.lr=1e-3", "train.steps"])


def test_sp_is_checked_against_the_processes_before_the_sequence_length() -> None:
    cfg = load_run_config(REPO / "configs/train/tiny_cpu.yaml", ["parallel.sp=3"])  # the processes are not known yet
    with pytest.raises(ConfigError, match=r"parallel.sp=3 must divide the number of processes \(2\)"):
        ParallelDims(world=2, rank=0, sp=3)
    with pytest.raises(ConfigError, match="parallel.sp=3 must divide data.seq_len=512"):
        cfg.resolve_layout(ParallelDims(world=3, rank=0, sp=3))


def test_document_resets_refuse_sequence_parallelism() -> None:
    with pytest.raises(ConfigError, match="data.reset_at_doc_boundaries"):
        load_run_config(REPO / "configs/train/tiny_cpu.yaml", ["parallel.sp=2", "data.reset_at_doc_boundaries=true"])


def test_missing_include_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("include: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_run_config(tmp_path / "run.yaml")


def test_dp_is_derived_from_world_and_sp() -> None:
    cfg = load_run_config(REPO / "configs/train/tiny_cpu.yaml", ["parallel.sp=2"]).resolve_layout(ParallelDims(world=8, rank=0, sp=2))
    assert cfg.parallel.dp == 4
    with pytest.raises(ConfigError, match="parallel.dp"):
        load_run_config(REPO / "configs/train/tiny_cpu.yaml", ["parallel.dp=3"]).resolve_layout(ParallelDims(world=8, rank=0, sp=1))


def test_cli_takes_config_then_overrides_and_drops_launcher_local_rank() -> None:
    assert split_arguments(["--local_rank=3", "c.yaml", "train.lr=1"]) == ("c.yaml", ["train.lr=1"])
    assert split_arguments(["c.yaml", "--local_rank", "0"]) == ("c.yaml", [])
    assert split_arguments(["train.lr=1"]) == (DEFAULT_CONFIG, ["train.lr=1"])


def test_compile_options_reach_inductor_when_the_blocks_compile(monkeypatch) -> None:
    """`train.compile_options` (a sub-config's options nested, as the dotted override gives them) load
    from overrides and are set process-wide when the blocks are compiled."""
    import torch._inductor.config as inductor_config
    from torch import nn

    from train.compile import compile_blocks

    cfg = load_run_config(REPO / "configs/train/tiny_cpu.yaml",
                          ["train.compile_options.cpp_wrapper=true", "train.compile_options.triton.cudagraphs=true"])
    assert flat_compile_options(cfg.train.compile_options) == {"cpp_wrapper": True, "triton.cudagraphs": True}
    with inductor_config.patch({"cpp_wrapper": False, "triton.cudagraphs": False}):  # restores both on exit
        compile_blocks(nn.Linear(2, 2), options=cfg.train.compile_options)
        assert inductor_config.cpp_wrapper and inductor_config.triton.cudagraphs
    assert not inductor_config.cpp_wrapper
