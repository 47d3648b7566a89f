"""`python -m train.evaluation.plot_run RUN_DIR --out plot.png [--tags train/loss ...]`: a run's TensorBoard scalars as one figure.

Reads the event files under RUN_DIR/tensorboard (several files when the run was resumed) with
TensorBoard's own reader, so the picture shows exactly what TensorBoard shows, for docs and
reports where a screenshot would not be reproducible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} over every event file of the run, later files winning on repeated steps."""
    series: dict[str, dict[int, float]] = {}
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir / 'tensorboard'}")
    for path in files:
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in series.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tags", nargs="+", help="scalar tags to plot (default: every tag)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    scalars = read_scalars(args.run_dir)
    tags = args.tags or sorted(scalars)
    missing = [t for t in tags if t not in scalars]
    if missing:
        raise SystemExit(f"tags {missing} not in the run; it has {sorted(scalars)}")
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.2), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, marker=".", linewidth=1)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({', '.join(tags)})")


if __name__ == "__main__":
    main()
