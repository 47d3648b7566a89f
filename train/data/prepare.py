"""`python -m train.data.prepare INPUT... --out DIR --seq-len N`: raw text -> packed MDS shards.

Inputs are text files (one document each), folders (their files, recursively, sorted), `.jsonl`
files (one document per line, from `--text-field`) and `.parquet` files (the same column; needs
pyarrow), or `--stdlib`: the `.py` sources of this Python's standard library, the corpus every
checkout has without a network. Documents are tokenised (`--tokenizer bytes` or a tokenizer.json),
each followed by EOS, concatenated and cut into samples of exactly seq_len + 1 tokens (inputs and
shifted targets of one training sequence). Every sample keeps its document boundaries in a second
column, so a model that resets state per document can read them:

    tokens  [seq_len + 1] int32    token ids
    doc_ids [seq_len + 1] int32    index of the document within this sample (0, 0, ..., 1, 1, ...)

A deterministic, evenly spaced `--val-fraction` of documents goes to `<out>/val`, the rest to
`<out>/train`; `<out>/manifest.json` records the tokenizer, seq_len and token counts (a
tokenizer.json is copied beside it). Unreadable or empty inputs are all listed, and the run fails
unless `--skip-bad` is given (then they are listed in the manifest). Output is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm

from train.data.tokenizer import TOKENIZER_FILE, ByteTokenizer, JsonTokenizer, Tokenizer, load_tokenizer
from train.job.cli import DEBUG_HELP, run_command, warn

COLUMNS = {"tokens": "ndarray:int32", "doc_ids": "ndarray:int32"}
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class BadInput(ValueError):
    """One input file that cannot be used; the message says why."""


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0  # document tokens including one EOS each
    samples: int = 0
    dropped_tail_tokens: int = 0  # the final partial sample


@dataclass
class Report:
    files: int = 0
    dropped_eos_collisions: int = 0
    bad_files: list[dict[str, str]] = field(default_factory=list)
    splits: dict[str, SplitStats] = field(default_factory=lambda: {name: SplitStats() for name in SPLITS})


class Packer:
    """Concatenates documents (+EOS) and writes every full window of `seq_len + 1` tokens as a sample."""

    def __init__(self, writer: MDSWriter, seq_len: int, eos_id: int, stats: SplitStats) -> None:
        self.writer, self.length, self.eos_id, self.stats = writer, seq_len + 1, eos_id, stats
        self.tokens: list[np.ndarray] = []
        self.doc_ids: list[np.ndarray] = []
        self.buffered = 0

    def add(self, ids: np.ndarray) -> None:
        document = np.append(ids, np.int32(self.eos_id)).astype(np.int32)
        self.stats.documents += 1
        self.stats.tokens += document.size
        self.tokens.append(document)
        self.doc_ids.append(np.full(document.size, self.stats.documents - 1, dtype=np.int32))
        self.buffered += document.size
        if self.buffered >= self.length:
            self._flush_full_windows()

    def _flush_full_windows(self) -> None:
        tokens, doc_ids = np.concatenate(self.tokens), np.concatenate(self.doc_ids)
        full = tokens.size // self.length * self.length
        for start in range(0, full, self.length):
            window_docs = doc_ids[start : start + self.length]
            self.writer.write({"tokens": tokens[start : start + self.length], "doc_ids": window_docs - window_docs[0]})
            self.stats.samples += 1
        self.tokens, self.doc_ids = [tokens[full:]], [doc_ids[full:]]
        self.buffered = tokens.size - full

    def finish(self) -> None:
        self.stats.dropped_tail_tokens = self.buffered


STDLIB_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test"}  # test data is deliberately malformed


def stdlib_files() -> list[Path]:
    """The standard library's non-empty .py files outside its test suites, sorted: the built-in corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not STDLIB_EXCLUDED_DIRS.intersection(p.parts) and p.stat().st_size > 0
    )


def expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(errno.ENOENT, "input file or folder does not exist; check the path", item)
    return files


def read_documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file; raises BadInput for empty or unreadable files."""
    if path.suffix == ".parquet":
        yield from _parquet_documents(path, text_field)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"not UTF-8 text ({error.reason} at byte {error.start})") from error
    if not text.strip():
        raise BadInput("empty file")
    if path.suffix != ".jsonl":
        yield text
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise BadInput(f"line {number}: no JSON object with a {text_field!r} field ({error}); see --text-field") from error
        if not isinstance(document, str):
            raise BadInput(f"line {number}: field {text_field!r} is {type(document).__name__}, not text")
        yield document


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise BadInput("reading .parquet needs pyarrow (pip install pyarrow)") from error
    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise BadInput(f"no column {text_field!r} (columns: {table.column_names}); see --text-field")
    documents = [text for text in table.column(text_field).to_pylist() if text]
    if not documents:
        raise BadInput(f"column {text_field!r} holds no text")
    yield from documents


def is_validation(index: int, fraction: float) -> bool:
    """Evenly spaced, deterministic: document `index` is held out when the running count of
    held-out documents, floor((index + 1) * fraction), steps up at it."""
    return int((index + 1) * fraction) > int(index * fraction)


def prepare(
    files: list[Path],
    out: Path,
    seq_len: int,
    tokenizer: Tokenizer,
    val_fraction: float = 0.01,
    text_field: str = "text",
    skip_bad: bool = False,
    show_progress: bool = True,
) -> Report:
    """Write `<out>/{train,val}` MDS shards and `<out>/manifest.json`; returns the report."""
    if seq_len < 1:
        raise ValueError(f"--seq-len {seq_len} must be >= 1")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if not files:
        raise ValueError("no input files: pass files or folders, or --stdlib")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    report = Report(files=len(files))
    writers = {name: MDSWriter(columns=COLUMNS, out=str(staging / name), size_limit="32mb") for name in SPLITS}
    packers = {name: Packer(writers[name], seq_len, tokenizer.eos_id, report.splits[name]) for name in SPLITS}
    document_index = 0
    for path in tqdm(files, desc="tokenising", unit="file", disable=not show_progress, file=sys.stderr):
        try:
            documents = list(read_documents(path, text_field))  # the whole file first: a bad line skips all of it
        except BadInput as error:
            report.bad_files.append({"path": str(path), "error": str(error)})
            continue
        for text in documents:
            encoded = tokenizer.encode(text)
            report.dropped_eos_collisions += encoded.dropped
            split = "val" if is_validation(document_index, val_fraction) else "train"
            packers[split].add(encoded.ids)
            document_index += 1
    for name in SPLITS:
        packers[name].finish()
        writers[name].finish()
    if report.bad_files and not skip_bad:
        shutil.rmtree(staging, ignore_errors=True)
        listing = "\n".join(f"  {bad['path']}: {bad['error']}" for bad in report.bad_files)
        raise BadInput(f"{len(report.bad_files)} unusable input file(s); fix or remove them, or pass --skip-bad:\n{listing}")
    if report.splits["train"].samples == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"the inputs hold {report.splits['train'].tokens} training tokens, fewer than one sample of --seq-len {seq_len} + 1")
    if isinstance(tokenizer, JsonTokenizer):  # kept with the data, so that an export of the run can carry it on
        shutil.copyfile(tokenizer.path, staging / TOKENIZER_FILE)
    manifest = {
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "eos_token": tokenizer.eos_token},
        "seq_len": seq_len,
        "sample_length": seq_len + 1,
        "val_fraction": val_fraction,
        **asdict(report),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return report


def read_manifest(path: str | Path) -> Optional[dict]:
    """The manifest of a prepared local dataset folder, or None for remote or foreign datasets."""
    manifest = Path(path) / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def dataset_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a local dataset folder was prepared with: bytes, or the tokenizer.json kept beside
    the shards (or, for a dataset prepared before copies were kept, the file its manifest names)."""
    manifest = read_manifest(path)
    if manifest is None:
        raise FileNotFoundError(errno.ENOENT, "no manifest here to tell the tokenizer by; pass --tokenizer bytes or a tokenizer.json", str(Path(path) / MANIFEST))
    recorded = manifest["tokenizer"]
    if recorded["name"] == ByteTokenizer.name:
        return ByteTokenizer()
    for candidate in (Path(path) / TOKENIZER_FILE, Path(recorded["name"])):
        if candidate.is_file():
            return JsonTokenizer(candidate, recorded.get("eos_token"))
    raise FileNotFoundError(errno.ENOENT, f"the data was prepared with {recorded['name']}, which is gone; pass --tokenizer with that tokenizer.json", str(Path(path) / TOKENIZER_FILE))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.data.prepare", description=__doc__.split("\n\n")[0], epilog=DEBUG_HELP)
    parser.add_argument("inputs", nargs="*", help="text/jsonl/parquet files or folders")
    parser.add_argument("--stdlib", action="store_true", help="add the standard library's .py sources (offline corpus)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (gets train/, val/, manifest.json)")
    parser.add_argument("--seq-len", required=True, type=int, help="training sequence length (samples hold seq_len + 1)")
    parser.add_argument("--tokenizer", default="bytes", help="'bytes' (vocab 256, EOS = byte 0) or a tokenizer.json path")
    parser.add_argument("--eos-token", default=None, help="end-of-document token of a tokenizer.json")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out in val/")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--skip-bad", action="store_true", help="list unusable files in the manifest instead of failing")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    files = expand_inputs(args.inputs) + (stdlib_files() if args.stdlib else [])
    tokenizer = load_tokenizer(args.tokenizer, args.eos_token)
    report = prepare(files, args.out, args.seq_len, tokenizer, args.val_fraction, args.text_field, args.skip_bad)
    for bad in report.bad_files:
        print(f"skipped {bad['path']}: {bad['error']}", file=sys.stderr)
    for name, stats in report.splits.items():
        print(f"{args.out}/{name}: {stats.documents} documents, {stats.tokens} tokens, {stats.samples} samples of {args.seq_len + 1}")
    val = report.splits["val"]
    if args.val_fraction > 0 and val.samples == 0:
        warn(
            f"{args.out}/val holds no sample ({val.documents} documents, {val.tokens} tokens; a sample needs "
            f"{args.seq_len + 1}): training turns evaluation off. Raise --val-fraction, lower --seq-len or add documents"
        )


if __name__ == "__main__":
    run_command("train.data.prepare", main, sys.argv[1:])
