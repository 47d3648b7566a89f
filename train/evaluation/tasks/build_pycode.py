"""`python -m train.evaluation.tasks.build_pycode`: write the data of the held-out Python code tasks.

The source is this repository's own `model/*.py`: Python the standard-library corpus of `make train`
never holds. `pycode/files.jsonl` holds the files whole (perplexity, `tttla_pycode_ppl`);
`pycode/lines.jsonl` holds `ITEMS` next-line questions: the `CONTEXT_LINES` lines before a line of
at least `MIN_LINE_CHARS` characters, that line, and three such lines of other files as the wrong
choices, all different (`tttla_pycode_mc`, and `tttla_pycode_line`, which asks for the line itself). The files
shipped were written from the commit that added them; rerunning after `model/` changes writes other
data (and other scores).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
OUT = Path(__file__).resolve().parent / "pycode"
SOURCES = "model/*.py"
ITEMS = 200
CONTEXT_LINES = 8
MIN_LINE_CHARS = 16
WRONG_CHOICES = 3
SEED = 0


def question_lines(text: str) -> list[int]:
    """Indices of the lines worth asking for: long enough to tell apart, after a full context."""
    lines = text.splitlines()
    return [i for i in range(CONTEXT_LINES, len(lines)) if len(lines[i].strip()) >= MIN_LINE_CHARS]


def line_items(files: dict[str, str], rng: random.Random) -> list[dict]:
    """`ITEMS` questions: context, four choices (the true line among them) and the true one's index."""
    candidates = [(name, i) for name, text in files.items() for i in question_lines(text)]
    items = []
    for name, index in rng.sample(candidates, ITEMS):
        lines = files[name].splitlines()
        others = sorted({files[n].splitlines()[i] for n, i in candidates if n != name} - {lines[index]})
        choices = rng.sample(others, WRONG_CHOICES) + [lines[index]]
        rng.shuffle(choices)
        context = "\n".join(lines[index - CONTEXT_LINES : index]) + "\n"
        items.append({"source": f"{name}:{index + 1}", "context": context, "choices": choices, "gold": choices.index(lines[index])})
    return items


def main() -> None:
    files = {path.relative_to(REPO).as_posix(): path.read_text() for path in sorted(REPO.glob(SOURCES)) if path.stat().st_size}
    OUT.mkdir(exist_ok=True)
    with open(OUT / "files.jsonl", "w") as out:
        out.writelines(json.dumps({"source": name, "text": text}) + "\n" for name, text in files.items())
    with open(OUT / "lines.jsonl", "w") as out:
        out.writelines(json.dumps(item) + "\n" for item in line_items(files, random.Random(SEED)))
    print(f"{len(files)} files, {ITEMS} line questions -> {OUT}")


if __name__ == "__main__":
    main()
