"""Specification of the lm-evaluation-harness model `tttla` and its command (train/evaluation/harness*.py).

Offline, as CI is: the tasks are YAML files over JSON lines written here, loaded by lm-evaluation-
harness through `datasets` with the hub switched off. Every score is checked against a hand
computation with the model's own forward pass: the log-likelihood of each choice summed from
`log_softmax(model(ids))`, the greedy continuation by re-running the whole sequence token by token,
a document's log-likelihood from one forward pass after the end token. The model runs in float64,
so the harness's batched, padded scoring and its decoding state must agree with the single-row
computations to rounding (1e-9 relative); accuracies, which are argmaxes, must agree exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # before `datasets` reads them

import datasets
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from model.config import load_model_config
from model.lm import TTTLM
from train.data.tokenizer import ByteTokenizer, JsonTokenizer, Tokenizer
from train.evaluation import harness
from train.evaluation.harness_model import TTTLAHarnessLM
from train.evaluation.tasks.retrieval_tasks import ABSENT, LENGTHS, mean_of_present, process_results
from train.generation.export import load_exported_tokenizer, load_model, save_exported
from train.job.cli import run_command

TOLERANCE = 1e-9
QUESTIONS = [  # (question, choices, gold): different lengths, so a batch pads its rows
    ("def add(a, b):\n    return", [" a + b", " a - b", " None"], 0),
    ("import", [" os", " sys", " numpy as np", " re"], 1),
    ("class Point:\n    def __init__(self, x, y):\n        self.x =", [" x", " y"], 0),
    ("for i in range(10):\n    print(", ["i)", "10)", "range)"], 0),
    ("x = [1, 2, 3]\ny = len(", ["x)", "y)", "z)"], 0),
]
PROMPTS = ["The answer is", "def main():\n", "print('hello"]
DOCUMENTS = ["A short document.", "import os\n\n\ndef walk(path):\n    for root, dirs, files in os.walk(path):\n        yield root\n"]
MAX_GEN = 10
PROGRESS_BAR = re.compile(r"\d+/\d+ \[.*it/s\]$")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub: `datasets` reads local files only and caches them under the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


def small_model(seed: int, vocab_size: int = 256) -> TTTLM:
    """A model small enough that float64 forward passes of a few hundred tokens take milliseconds."""
    torch.manual_seed(seed)
    overrides = ["hidden_size=32", "num_attn_heads=2", "ttt.chunk_size=8", "window_size=8", f"vocab_size={vocab_size}"]
    return TTTLM(load_model_config("configs/model/tiny.yaml", overrides))


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_exported(small_model(seed=3), tmp_path_factory.mktemp("byte") / "export")


@pytest.fixture(scope="module")
def json_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of 320 ids with a BPE tokenizer.json of 300 (trained here on the test texts: the 256
    byte symbols, the end token </s> and merges)."""
    from tokenizers import Tokenizer as BPETokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("json")
    bpe = BPETokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [q + c for q, choices, _ in QUESTIONS for c in choices] + PROMPTS + DOCUMENTS
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.save(str(folder / "tokenizer.json"))
    return save_exported(small_model(seed=4, vocab_size=320), folder / "export", JsonTokenizer(folder / "tokenizer.json"))


def write_task(folder: Path, name: str, rows: list[dict], settings: str) -> None:
    """A task YAML over a local JSON-lines file, read by `datasets`' json builder."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
        f"test_split: test\n{settings}metadata:\n  version: 1.0\n"
    )


def write_tasks(folder: Path, greedy_answers: list[str]) -> None:
    write_task(folder, "local_mc", [{"question": q, "choices": c, "gold": g} for q, c, g in QUESTIONS],
               'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
               'doc_to_target: "{{gold}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n')  # fmt: skip
    write_task(folder, "local_gen", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, greedy_answers)],
               'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
               f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n'
               "metric_list:\n  - metric: exact_match\n")  # fmt: skip
    write_task(folder, "local_ppl", [{"text": t} for t in DOCUMENTS],
               'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n")  # fmt: skip


def run_tasks(folder: Path, export: Path, tasks: list[str], batch_size: int = 3) -> dict:
    model = TTTLAHarnessLM(str(export), device="cpu", dtype="float64", batch_size=batch_size)
    manager = TaskManager(include_path=[str(folder)], include_defaults=False)
    return simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)


@torch.no_grad()
def logprob(model, ids: list[int], continuation: list[int]) -> float:
    """log p(continuation | ids) from one unpadded forward pass."""
    full = torch.tensor([ids + continuation[:-1]])
    logprobs = torch.log_softmax(model(full).logits[0, len(ids) - 1 :], dim=-1)
    return float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())


@torch.no_grad()
def greedy(model, tokenizer: Tokenizer, prompt: str) -> str:
    """Greedy continuation recomputed from scratch at every step, cut at the end token or a newline."""
    ids = tokenizer.encode(prompt).ids.tolist()
    new: list[int] = []
    for _ in range(MAX_GEN):
        token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_id:
            break
        new.append(token)
    return tokenizer.decode(new).split("\n")[0]


@pytest.mark.parametrize("which", ["byte_export", "json_export"])
def test_scores_equal_a_hand_computation_with_the_forward_pass(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    export = request.getfixturevalue(which)
    model = load_model(export, dtype=torch.float64)[0]
    tokenizer = load_exported_tokenizer(export)
    assert isinstance(tokenizer, ByteTokenizer if which == "byte_export" else JsonTokenizer)
    answers = [greedy(model, tokenizer, p) for p in PROMPTS]
    write_tasks(tmp_path, [answers[0], answers[1] + "x", "never"])  # the first matches, the others cannot
    results = run_tasks(tmp_path, export, ["local_mc", "local_gen", "local_ppl"])
    check_multiple_choice(results, model, tokenizer)
    generated = [sample["resps"][0][0] for sample in sorted(results["samples"]["local_gen"], key=lambda s: s["doc_id"])]
    assert generated == answers
    assert results["results"]["local_gen"]["exact_match,none"] == pytest.approx(1 / 3)
    check_perplexity(results, model, tokenizer)


def check_multiple_choice(results: dict, model, tokenizer: Tokenizer) -> None:
    correct = 0
    for sample in sorted(results["samples"]["local_mc"], key=lambda s: s["doc_id"]):
        question, choices, gold = QUESTIONS[sample["doc_id"]]
        context = tokenizer.encode(question).ids.tolist()
        expected = [logprob(model, context, tokenizer.encode(question + c).ids.tolist()[len(context) :]) for c in choices]
        scored = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        assert scored == pytest.approx(expected, rel=TOLERANCE)
        correct += max(range(len(choices)), key=expected.__getitem__) == gold
    assert results["results"]["local_mc"]["acc,none"] == correct / len(QUESTIONS)


def check_perplexity(results: dict, model, tokenizer: Tokenizer) -> None:
    total = sum(logprob(model, [tokenizer.eos_id], tokenizer.encode(text).ids.tolist()) for text in DOCUMENTS)
    words = sum(len(re.split(r"\s+", text)) for text in DOCUMENTS)  # lm-evaluation-harness's count of words
    size = sum(len(text.encode()) for text in DOCUMENTS)
    metrics = results["results"]["local_ppl"]
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-9)
    assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(-total / size), rel=1e-9)


def test_a_batch_scores_as_its_rows_one_by_one(byte_export: Path, tmp_path: Path) -> None:
    write_tasks(tmp_path, ["", "", ""])
    scores = [
        [s["filtered_resps"] for s in sorted(run_tasks(tmp_path, byte_export, ["local_mc"], size)["samples"]["local_mc"], key=lambda s: s["doc_id"])]
        for size in (1, 8)
    ]
    one_by_one, batched = ([logprob for doc in run for logprob, _ in doc] for run in scores)
    assert batched == pytest.approx(one_by_one, rel=TOLERANCE)


def test_a_retrieval_answer_scores_under_its_own_length_only() -> None:
    scores = process_results({"answer": "12345", "length": 1024}, [" 12345. Remember it."])
    assert scores["acc@1024"] == 1.0 and all(scores[f"acc@{n}"] == ABSENT for n in LENGTHS if n != 1024)
    assert process_results({"answer": "12345", "length": 512}, ["1234 5"])["acc@512"] == 0.0
    assert mean_of_present([ABSENT, 1.0, 0.0, ABSENT]) == 0.5 and mean_of_present([ABSENT]) == ABSENT


def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *arguments: str) -> tuple[int, str, str]:
    """The command as `python -m train.evaluation.harness` runs it, over the tttla tasks alone (the
    index of lm-evaluation-harness's own tasks takes seconds and holds nothing these tests use)."""
    monkeypatch.setattr(harness, "task_manager", lambda paths, metadata: TaskManager(
        include_path=[str(harness.TASKS_DIR), *paths], include_defaults=False, metadata=metadata))  # fmt: skip
    capsys.readouterr()
    try:
        run_command("train.evaluation.harness", harness.main, list(arguments))
        code = 0
    except SystemExit as finished:
        code = finished.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_shipped_tasks_run_short_and_long_context_in_one_command(byte_export: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    code, out, err = cli(capsys, monkeypatch, "--model", str(byte_export), "--tasks", "tttla", "--lengths", "512", "1024",
                         "--samples", "1", "--limit", "2", "--output", str(tmp_path / "results.json"))  # fmt: skip
    assert code == 0, err
    for task in ("tttla_pycode_mc", "tttla_pycode_line", "tttla_pycode_ppl", "tttla_passkey", "tttla_niah_single"):
        assert task in out
    assert "acc@1024" in out and "acc@2048" not in out  # lengths not asked for are left out
    assert json.loads((tmp_path / "results.json").read_text())["results"]["tttla_passkey"]["acc@512,none"] in (0.0, 0.5, 1.0)


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["--model", "{missing}", "--tasks", "tttla_passkey"], ["model.safetensors", "python -m train.generation.export"]),
        (["--tasks", "tttla_paskey"], ["unknown task 'tttla_paskey'", "did you mean tttla_passkey"]),
        (["--tasks", "tttla_passkey", "--lengths", "1024", "--max-length", "512"], ["tokens but max_length=512", "--max-length"]),
        (["--tasks", "tttla_passkey", "--lengths", "300"], ["--lengths [300]", "512"]),
    ],
    ids=["missing-export", "unknown-task", "context-too-long", "unscored-length"],
)
def test_bad_input_ends_with_one_line(byte_export: Path, tmp_path: Path, capsys, monkeypatch, arguments: list[str], named: list[str]) -> None:
    arguments = [a.replace("{missing}", str(tmp_path / "nothing")) for a in arguments]
    if "--model" not in arguments:
        arguments = ["--model", str(byte_export), "--limit", "1", *arguments]
    code, _, err = cli(capsys, monkeypatch, *arguments)
    lines = [line for line in err.strip().splitlines() if not PROGRESS_BAR.search(line)]  # lm-eval's, drawn with \r
    assert code == 1 and len(lines) == 1 and lines[0].startswith("train.evaluation.harness: "), err
    for text in named:
        assert text in lines[0]


def test_lm_eval_finds_the_model_by_its_name(byte_export: Path, tmp_path: Path) -> None:
    write_tasks(tmp_path, ["", "", ""])
    manager = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    results = simple_evaluate(model="tttla", model_args=f"pretrained={byte_export},dtype=float64", tasks=["local_mc"],
                              task_manager=manager, batch_size=2, device="cpu", bootstrap_iters=0)  # fmt: skip
    assert 0.0 <= results["results"]["local_mc"]["acc,none"] <= 1.0
