"""Every command-line entry point ends an expected failure with one line naming the file, key or path.

Each case runs a command's `__main__` entry and breaks one thing a user might: a deleted data shard,
a YAML syntax error, a missing input, a corrupt tokenizer.json, a missing, damaged (truncated,
garbled, changed at the same size) or unreadable export, an empty split, a missing checkpoint. The
command must exit with status 1 and print exactly one line on stderr, starting with its name and
naming what is wrong; `--debug` brings the traceback back. Training runs in a fresh interpreter (it
joins a process group); the other commands run in this one through runpy, which executes their
`if __name__ == "__main__"` block as `python -m` does, without paying the imports again.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from tests.multiprocess import REPO, small_corpus, worker_environment

HELP_WITHIN_S = 1.0
# runpy notes that the package already imported the module it re-executes; that is what `python -m` does too.
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")


def run(*arguments: str) -> subprocess.CompletedProcess:
    """`python -m ARGUMENTS` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", *arguments], cwd=REPO, env=worker_environment(), capture_output=True, text=True, timeout=120)


def run_here(capsys: pytest.CaptureFixture, module: str, *arguments: str, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """`python -m MODULE ARGUMENTS` executed in this interpreter; (returncode, stderr) like subprocess."""
    monkeypatch.setattr(sys, "argv", [module, *arguments])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    return SimpleNamespace(returncode=exit_info.value.code, stderr=capsys.readouterr().err)


def assert_one_line(finished: subprocess.CompletedProcess | SimpleNamespace, command: str, *named: str) -> None:
    assert finished.returncode == 1, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: "), finished.stderr
    for text in named:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("cli") / "data", 64, val_fraction=0.1)


@pytest.mark.slow
def test_train_names_a_deleted_shard(corpus: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "data"
    damaged.mkdir()
    for split in ("train", "val"):
        (damaged / split).mkdir()
        (damaged / split / "index.json").write_bytes((corpus / split / "index.json").read_bytes())
    (damaged / "val/shard.00000.mds").write_bytes((corpus / "val/shard.00000.mds").read_bytes())
    finished = run("train", f"data.path={damaged}", "data.seq_len=64", f"logging.run_dir={tmp_path / 'runs/new'}")
    assert_one_line(finished, "train", f"{damaged}/train/shard.00000.mds is missing", "prepare the data again")
    assert not (tmp_path / "runs").exists()  # the run directory it created is not left behind


@pytest.mark.slow
def test_train_says_sp_must_divide_the_processes(tmp_path: Path) -> None:
    finished = run("train", "parallel.sp=3", f"logging.run_dir={tmp_path / 'run'}")
    assert_one_line(finished, "train", "parallel.sp=3 must divide the number of processes (1)")


def test_train_names_the_line_of_a_yaml_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("train:\n  steps: 10\n  lr: [3e-4\n")
    assert_one_line(run("train", str(tmp_path / "run.yaml")), "train", f"{tmp_path / 'run.yaml'} is not valid YAML at line")


def test_prepare_names_a_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    finished = run_here(capsys, "train.data.prepare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--seq-len", "64", monkeypatch=monkeypatch)
    assert_one_line(finished, "train.data.prepare", str(tmp_path / "nowhere"), "does not exist")


def test_prepare_names_a_corrupt_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "doc.txt").write_text("some text")
    (tmp_path / "tokenizer.json").write_text('{"model": {1: 2}}')
    finished = run_here(
        capsys, "train.data.prepare", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "out"), "--seq-len", "4",
        "--tokenizer", str(tmp_path / "tokenizer.json"), monkeypatch=monkeypatch,
    )
    assert_one_line(finished, "train.data.prepare", f"{tmp_path / 'tokenizer.json'} is not a valid tokenizer.json")


def test_generate_names_a_missing_export(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    finished = run_here(capsys, "train.generation.generate", "--model", str(tmp_path / "export"), "--prompt", "x", monkeypatch=monkeypatch)
    assert_one_line(finished, "train.generation.generate", str(tmp_path / "export" / "model.safetensors"), "python -m train.generation.export")


def test_eval_names_a_missing_export(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    finished = run_here(capsys, "train.evaluation.eval", "--model", str(tmp_path / "export"), "--data", str(tmp_path / "data"), monkeypatch=monkeypatch)
    assert_one_line(finished, "train.evaluation.eval", str(tmp_path / "export" / "model.safetensors"))


def test_retrieval_refuses_a_too_short_length_before_loading_anything(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    finished = run_here(capsys, "train.evaluation.retrieval", "--model", str(tmp_path / "export"), "--lengths", "4096", "200", monkeypatch=monkeypatch)
    assert_one_line(finished, "train.evaluation.retrieval", "--lengths 200 is too short", "passkey needs", "niah_multiquery needs")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_header(path: Path) -> None:
    path.write_bytes(b"\xff" * 16 + path.read_bytes()[16:])


def flip_a_weight_byte(path: Path) -> None:
    """The same size, one byte of the last tensor changed: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))


def invalid_yaml(path: Path) -> None:
    path.write_text("hidden_size: [64\n")


def unrecorded(spoil: Callable[[Path], None]) -> Callable[[Path], None]:
    """`spoil` in an export written before checksums.json existed: the reading itself must name the file."""

    def spoil_unrecorded(path: Path) -> None:
        (path.parent / "checksums.json").unlink()
        spoil(path)

    return spoil_unrecorded


DAMAGES = {
    "truncated weights": ("model.safetensors", truncate),
    "garbled weights": ("model.safetensors", garble_header),
    "same-size weights": ("model.safetensors", flip_a_weight_byte),
    "truncated unrecorded weights": ("model.safetensors", unrecorded(truncate)),
    "garbled unrecorded weights": ("model.safetensors", unrecorded(garble_header)),
    "invalid yaml": ("model.yaml", invalid_yaml),
}
COMMANDS = {
    "train.generation.generate": ["--prompt", "x", "--max-new-tokens", "2"],
    "train.evaluation.eval": ["--data", "nowhere"],
    "train.evaluation.retrieval": ["--lengths", "1024", "--samples", "1"],
}


def damaged_export(folder: Path, damage: str) -> Path:
    from tests.test_generate_cli import tiny_model
    from train.generation.export import save_exported

    save_exported(tiny_model(), folder)
    name, spoil = DAMAGES[damage]
    spoil(folder / name)
    return folder / name


@pytest.mark.parametrize("damage", DAMAGES)
def test_generate_names_a_damaged_export_file(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    spoiled = damaged_export(tmp_path / "export", damage)
    finished = run_here(capsys, "train.generation.generate", "--model", str(tmp_path / "export"), *COMMANDS["train.generation.generate"], monkeypatch=monkeypatch)
    assert_one_line(finished, "train.generation.generate", str(spoiled), "export the checkpoint again")


@pytest.mark.parametrize("command", ["train.evaluation.eval", "train.evaluation.retrieval"])
def test_evaluations_name_a_damaged_export_file(command: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    spoiled = damaged_export(tmp_path / "export", "truncated weights")
    finished = run_here(capsys, command, "--model", str(tmp_path / "export"), *COMMANDS[command], monkeypatch=monkeypatch)
    assert_one_line(finished, command, str(spoiled), "export the checkpoint again")


def test_eval_names_an_empty_split(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_generate_cli import tiny_model
    from train.generation.export import save_exported

    save_exported(tiny_model(), tmp_path / "export")
    small_corpus(tmp_path / "data", 64, val_fraction=0.0)
    finished = run_here(capsys, "train.evaluation.eval", "--model", str(tmp_path / "export"), "--data", str(tmp_path / "data"), "--split", "val", monkeypatch=monkeypatch)
    assert_one_line(finished, "train.evaluation.eval", f"{tmp_path / 'data' / 'val'} holds no samples", "--val-fraction")


def test_export_names_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    finished = run_here(capsys, "train.generation.export", str(tmp_path / "checkpoints"), str(tmp_path / "out"), monkeypatch=monkeypatch)
    assert_one_line(finished, "train.generation.export", str(tmp_path / "checkpoints"), "complete.json")


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.generation.generate", "--model", str(tmp_path / "export"), "--prompt", "x", "--debug"])
    with pytest.raises(FileNotFoundError):  # raised through, so Python prints its traceback
        runpy.run_module("train.generation.generate", run_name="__main__", alter_sys=False)


def test_train_help_lists_the_config_sections_quickly() -> None:
    started = time.perf_counter()
    finished = run("train", "configs/train/tiny_cpu.yaml", "--help")
    elapsed = time.perf_counter() - started
    assert finished.returncode == 0, finished.stderr
    for section in ("model", "data", "train", "parallel", "zero", "logging", "checkpoint", "eval"):
        assert f"\n  {section} " in finished.stdout
    assert "local_rank" not in finished.stdout
    assert elapsed < HELP_WITHIN_S, elapsed
