"""train.evaluation.plot_run reads what the monitor writes: a run's TensorBoard scalars, across resumed event files."""

from __future__ import annotations

from torch.utils.tensorboard import SummaryWriter

from train.evaluation.plot_run import read_scalars


def test_scalars_from_two_event_files_are_merged_in_step_order(tmp_path):
    for steps in ((1, 2, 3), (3, 4)):  # a resumed run writes a second file and repeats a step
        writer = SummaryWriter(str(tmp_path / "tensorboard"))
        for step in steps:
            writer.add_scalar("train/loss", 10.0 - step + (0.5 if steps[0] == 3 else 0.0), step)
        writer.close()
    points = read_scalars(tmp_path)["train/loss"]
    assert [s for s, _ in points] == [1, 2, 3, 4]
    assert points[2][1] == 7.5  # the later file wins on the repeated step
