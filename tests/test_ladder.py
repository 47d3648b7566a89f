"""The simplification ladder (arXiv 2602.21204, Table 2) as configs: each step removes one thing, trains,
and its benchmark runs."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch

from benchmarks.ladder import STEPS, ladder_config, markdown, run_ladder
from model.config import load_model_config
from model.lm import TTTLM

# What each step changes in model.ttt relative to the step before it (mode follows the first step
# where the parallel form is exact; V3 drops W0/W2, so their low-rank init goes with them).
STEP_CHANGES = {
    "v1": {"fast_weights"},
    "v2": {"weight_norm", "mode"},
    "v3": {"feature_map", "w02_rank"},
    "v4": {"per_token_lr"},
    "v5": {"momentum"},
    "v6": {"muon"},
}


def test_ladder_starts_from_the_released_760m_layer_with_muon() -> None:
    preset = load_model_config("configs/model/lact_760m.yaml")
    assert asdict(ladder_config("v0", smoke=False)) == asdict(replace(preset, ttt=replace(preset.ttt, muon=True)))


@pytest.mark.parametrize("step", sorted(STEP_CHANGES))
def test_each_step_removes_one_thing(step: str) -> None:
    previous = asdict(ladder_config(STEPS[STEPS.index(step) - 1], smoke=False))
    current = asdict(ladder_config(step, smoke=False))
    changed = {key for key in current["ttt"] if current["ttt"][key] != previous["ttt"][key]}
    assert changed == STEP_CHANGES[step]
    assert {k: v for k, v in current.items() if k != "ttt"} == {k: v for k, v in previous.items() if k != "ttt"}


@pytest.mark.parametrize("step", STEPS)
def test_each_step_trains_at_tiny_scale(step: str) -> None:
    """A few AdamW steps on one batch of a shrunk model (the step's options, tiny width) lower the loss."""
    cfg = replace(ladder_config(step, smoke=True), vocab_size=64, num_layers=1, tie_embeddings=True).validate()
    torch.manual_seed(0)
    model = TTTLM(cfg)
    tokens = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_ladder_benchmark_smoke_times_every_step_in_its_valid_forms() -> None:
    rows = run_ladder(smoke=True, device=torch.device("cpu"))
    assert [row["step"] for row in rows] == list(STEPS)
    for row in rows:
        assert row["recurrent_fwdbwd_tok_s"] > 0
        assert ("parallel_fwdbwd_tok_s" in row) == (row["step"] not in ("v0", "v1"))
    table = markdown(rows, "CPU")
    assert table.count("\n| V") == len(STEPS)
