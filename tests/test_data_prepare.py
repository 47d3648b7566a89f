"""`train.data.prepare`: packing into seq_len + 1 samples with document boundaries, the validation split,
tokenizers, and loud failure on unusable inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streaming import LocalDataset

from train.data.prepare import BadInput, dataset_tokenizer, is_validation, prepare, read_manifest
from train.data.tokenizer import BYTE_EOS_ID, TOKENIZER_FILE, ByteTokenizer, load_tokenizer

SEQ_LEN = 15


def write_corpus(folder: Path, documents: int = 12) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"document {i}: " + "abc" * (i + 1) for i in range(documents)]
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text)
    return texts


def samples(split_dir: Path) -> list[dict[str, np.ndarray]]:
    dataset = LocalDataset(str(split_dir))
    return [dataset[i] for i in range(len(dataset))]


def test_samples_are_seq_len_plus_one_with_document_ids(tmp_path: Path) -> None:
    write_corpus(tmp_path / "in")
    report = prepare(sorted((tmp_path / "in").iterdir()), tmp_path / "out", SEQ_LEN, ByteTokenizer(), val_fraction=0.0, show_progress=False)
    rows = samples(tmp_path / "out/train")
    assert len(rows) == report.splits["train"].samples > 0
    for row in rows:
        tokens, doc_ids = row["tokens"], row["doc_ids"]
        assert tokens.shape == doc_ids.shape == (SEQ_LEN + 1,) and tokens.dtype == np.int32
        assert doc_ids[0] == 0 and np.all(np.diff(doc_ids) >= 0)
        # a new document starts exactly after an EOS token
        assert np.array_equal(np.flatnonzero(np.diff(doc_ids)), np.flatnonzero(tokens[:-1] == BYTE_EOS_ID))


def test_packing_keeps_every_token_in_order_except_the_tail(tmp_path: Path) -> None:
    texts = write_corpus(tmp_path / "in")
    report = prepare(sorted((tmp_path / "in").iterdir()), tmp_path / "out", SEQ_LEN, ByteTokenizer(), val_fraction=0.0, show_progress=False)
    stream = np.concatenate([row["tokens"] for row in samples(tmp_path / "out/train")])
    expected = np.concatenate([np.append(np.frombuffer(t.encode(), np.uint8), BYTE_EOS_ID) for t in texts]).astype(np.int32)
    assert report.splits["train"].tokens == expected.size
    assert np.array_equal(stream, expected[: stream.size])
    assert expected.size - stream.size == report.splits["train"].dropped_tail_tokens < SEQ_LEN + 1


def test_validation_split_is_an_evenly_spaced_disjoint_share_of_documents(tmp_path: Path) -> None:
    write_corpus(tmp_path / "in", documents=40)
    report = prepare(sorted((tmp_path / "in").iterdir()), tmp_path / "out", 7, ByteTokenizer(), val_fraction=0.1, show_progress=False)
    assert [i for i in range(40) if is_validation(i, 0.1)] == [9, 19, 29, 39]
    assert report.splits["val"].documents == 4 and report.splits["train"].documents == 36
    manifest = read_manifest(tmp_path / "out")
    assert manifest["seq_len"] == 7 and manifest["tokenizer"] == {"name": "bytes", "vocab_size": 256, "eos_id": 0, "eos_token": None}
    assert (tmp_path / "out/val/index.json").is_file()


def test_jsonl_documents_come_from_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": "x" * 20, "id": i}) for i in range(3)) + "\n")
    report = prepare([path], tmp_path / "out", SEQ_LEN, ByteTokenizer(), val_fraction=0.0, text_field="body", show_progress=False)
    assert report.splits["train"].documents == 3 and report.splits["train"].tokens == 3 * 21


def test_bad_inputs_are_all_reported_and_fail_the_run(tmp_path: Path) -> None:
    write_corpus(tmp_path / "in", documents=3)
    (tmp_path / "in/empty.txt").write_text("  \n")
    (tmp_path / "in/latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "in/broken.jsonl").write_text('{"text": "ok"}\nnot json\n')
    files = sorted((tmp_path / "in").iterdir())
    with pytest.raises(BadInput) as error:
        prepare(files, tmp_path / "out", 4, ByteTokenizer(), show_progress=False)
    message = str(error.value)
    assert "3 unusable" in message and "empty file" in message and "not UTF-8" in message and "line 2" in message
    assert not (tmp_path / "out").exists()  # nothing half-written is left behind


def test_skip_bad_lists_the_skipped_files_in_the_manifest(tmp_path: Path) -> None:
    write_corpus(tmp_path / "in", documents=3)
    (tmp_path / "in/empty.txt").write_text("")
    prepare(sorted((tmp_path / "in").iterdir()), tmp_path / "out", 4, ByteTokenizer(), skip_bad=True, show_progress=False)
    assert [Path(b["path"]).name for b in read_manifest(tmp_path / "out")["bad_files"]] == ["empty.txt"]


def test_byte_tokenizer_drops_nul_so_eos_stays_unambiguous() -> None:
    encoded = ByteTokenizer().encode("a\x00b")
    assert encoded.ids.tolist() == [97, 98] and encoded.dropped == 1


def write_word_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "<end>": 4}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return path


def test_tokenizer_json_with_its_end_token(tmp_path: Path) -> None:
    loaded = load_tokenizer(str(write_word_tokenizer(tmp_path / "tokenizer.json")))
    assert loaded.eos_id == 1 and loaded.vocab_size == 5
    assert loaded.encode("hello world").ids.tolist() == [2, 3]
    assert loaded.decode([2, 3]) == "hello world"


def test_a_dataset_keeps_its_tokenizer_and_end_token(tmp_path: Path) -> None:
    """An export reads the run's tokenizer from its data: the copy beside the shards outlives the
    original file, and an end token chosen with --eos-token stays the end token."""
    original = write_word_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "doc.txt").write_text("hello world " * 20)
    prepare([tmp_path / "doc.txt"], tmp_path / "out", 4, load_tokenizer(str(original), "<end>"), val_fraction=0.0, show_progress=False)
    original.unlink()
    kept = dataset_tokenizer(tmp_path / "out")
    assert (kept.path, kept.eos_id, kept.eos_token) == (tmp_path / "out" / TOKENIZER_FILE, 4, "<end>")


def test_a_byte_dataset_reads_as_bytes_and_a_folder_without_a_manifest_says_what_to_pass(tmp_path: Path) -> None:
    write_corpus(tmp_path / "in", documents=3)
    prepare(sorted((tmp_path / "in").iterdir()), tmp_path / "out", 4, ByteTokenizer(), val_fraction=0.0, show_progress=False)
    assert isinstance(dataset_tokenizer(tmp_path / "out"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="pass --tokenizer bytes or a tokenizer.json"):
        dataset_tokenizer(tmp_path / "in")


def test_skip_bad_packs_nothing_of_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "half.jsonl"
    path.write_text(json.dumps({"text": "x" * 20}) + "\nnot json\n")  # a good first line, then a bad one
    write_corpus(tmp_path / "in", documents=3)
    report = prepare([*sorted((tmp_path / "in").iterdir()), path], tmp_path / "out", 4, ByteTokenizer(), val_fraction=0.0, skip_bad=True, show_progress=False)
    assert [Path(b["path"]).name for b in report.bad_files] == ["half.jsonl"]
    assert report.splits["train"].documents == 3
    stream = np.concatenate([row["tokens"] for row in samples(tmp_path / "out/train")])
    assert ord("x") not in stream.tolist()
