"""The sequence-parallel layout rules, checked without processes: slices, chunk re-cutting, config errors."""

from __future__ import annotations

import pytest
import torch

from model.config import LMConfig, TTTConfig
from model.lm import TTTLM
from parallel.groups import ParallelDims, slice_sequence
from parallel.layout import SliceLayout
from parallel.sequence_parallel import SequenceParallelLM


def grid_position(sp: int, sp_rank: int, dp: int = 1, dp_rank: int = 0) -> ParallelDims:
    """A rank of a dp x sp grid, without process groups (enough for layout arithmetic)."""
    return ParallelDims(world=dp * sp, rank=dp_rank * sp + sp_rank, sp=sp)


def config(chunk: int = 16, window: int = 8, **ttt) -> LMConfig:
    return LMConfig(hidden_size=32, num_attn_heads=2, window_size=window, ttt=TTTConfig(chunk_size=chunk, **ttt))


def test_slices_are_contiguous_and_in_rank_order():
    tokens = torch.arange(24).reshape(2, 12)
    pieces = [slice_sequence(tokens, grid_position(3, r)) for r in range(3)]
    assert torch.equal(torch.cat(pieces, dim=1), tokens)


def test_slice_of_indivisible_length_names_both_numbers():
    with pytest.raises(ValueError, match=r"10 is not divisible by parallel.sp=4"):
        slice_sequence(torch.zeros(1, 10), grid_position(4, 0))


def test_world_not_divisible_by_sp_names_parallel_sp():
    with pytest.raises(ValueError, match=r"parallel.sp=2 must divide the number of processes \(1\)"):
        ParallelDims.build(2)


def test_aligned_slices_move_nothing():
    layout = SliceLayout.build(32, config(chunk=16), grid_position(2, 1))
    assert (layout.start, layout.lent_to_previous, layout.borrowed_from_next) == (32, 0, 0)
    assert layout.halo_from_previous == 7  # window - 1 keys before the first token


def test_straddling_chunk_is_computed_where_it_starts():
    # T = 4 x 20, C = 16: chunks start at 0, 16, 32, 48, 64; slices start at 0, 20, 40, 60.
    layouts = [SliceLayout.build(20, config(chunk=16), grid_position(4, r)) for r in range(4)]
    assert [layout.start for layout in layouts] == [0, 32, 48, 64]
    assert [layout.computed_len for layout in layouts] == [32, 16, 16, 16]
    assert [layout.lent_to_previous for layout in layouts] == [0, 12, 8, 4]
    assert [layout.borrowed_from_next for layout in layouts] == [12, 8, 4, 0]


def test_chunk_spanning_three_slices_is_refused_naming_the_chunk_size():
    with pytest.raises(ValueError, match=r"model.ttt.chunk_size=16 is longer than a rank's slice"):
        SliceLayout.build(10, config(chunk=16), grid_position(4, 1))


def test_window_reaching_past_the_previous_rank_is_refused_naming_the_window():
    with pytest.raises(ValueError, match=r"model.window_size=40"):
        SliceLayout.build(32, config(chunk=16, window=40), grid_position(3, 0))  # rank 2 needs 39 keys, rank 1 has 32


def test_muon_in_the_parallel_form_is_refused_naming_the_key():
    model = TTTLM(config(muon=True))
    with pytest.raises(ValueError, match=r"model.ttt.muon=true cannot run with parallel.sp > 1"):
        SequenceParallelLM(model, grid_position(2, 0))
