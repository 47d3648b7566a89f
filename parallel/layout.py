"""Which tokens each sp rank computes: its slice, re-cut at chunk boundaries.

The fast-weight layer is chunk-synchronous: every token of a chunk reads the state left by the
earlier chunks, and the chunk's update (and, with momentum, its decay: the chunk mean of a
per-token gate) needs all of its tokens. When T/sp is not a multiple of the chunk size C, a chunk
straddles two slices. Rank r then computes the tokens of every chunk that *starts* in its slice:

    slice of rank r:      [a_r, a_r + T/sp)
    computed by rank r:   [s_r, s_{r+1}),   s_r = ceil(a_r / C) * C   (s_0 = 0, s_sp = T)

so it borrows the first `borrowed_from_next` ids of rank r+1 and lends its first
`lent_to_previous` ids to rank r-1 (fewer than C each), and after the last block hands the hidden
rows of the borrowed tokens back, so every rank's logits and loss cover exactly its own slice.
A chunk is then whole on one rank: the state exchange and the ring only ever meet chunk boundaries.

The sliding-window attention of the first computed token needs the `window - 1` keys before it,
which live on the previous rank (the halo).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import LMConfig
from parallel.groups import ParallelDims


def _chunk_start_at_or_after(position: int, chunk_size: int) -> int:
    return -(-position // chunk_size) * chunk_size


@dataclass(frozen=True)
class SliceLayout:
    """The tokens of one sp rank, all counts per sequence (rows of [B, T/sp])."""

    slice_len: int  # T / sp
    start: int  # s_r: absolute position of the first computed token
    lent_to_previous: int  # ids at the start of this slice computed by rank r-1
    borrowed_from_next: int  # ids at the start of rank r+1's slice computed here
    halo_from_previous: int  # keys/values received from rank r-1 for the window attention
    halo_to_next: int  # keys/values sent to rank r+1

    @property
    def computed_len(self) -> int:
        return self.slice_len - self.lent_to_previous + self.borrowed_from_next

    @staticmethod
    def build(slice_len: int, cfg: LMConfig, dims: ParallelDims) -> "SliceLayout":
        """The layout of this rank; raises when the slices are too short for a chunk or a window."""
        sp, chunk = dims.sp, cfg.ttt.chunk_size
        total = slice_len * sp
        starts = [0] + [_chunk_start_at_or_after(r * slice_len, chunk) for r in range(1, sp)] + [total]
        lent = [starts[r] - r * slice_len for r in range(sp)] + [0]
        if any(lent) and slice_len < chunk:
            raise ValueError(
                f"model.ttt.chunk_size={chunk} is longer than a rank's slice (seq_len {total} / parallel.sp={sp} "
                f"= {slice_len}) and does not divide it, so a chunk would span three ranks; use a chunk size "
                f"that divides {slice_len} or is at most {slice_len}, or a smaller parallel.sp"
            )
        computed = [starts[r + 1] - starts[r] for r in range(sp)]
        reach = max(cfg.window_size - 1, 0)
        halo = [0] + [min(reach, starts[r]) for r in range(1, sp)] + [0]
        for r in range(1, sp):
            if halo[r] > computed[r - 1]:
                raise ValueError(
                    f"model.window_size={cfg.window_size} reaches {reach} tokens back, past the {computed[r - 1]} "
                    f"tokens rank {r - 1} computes (seq_len {total} / parallel.sp={sp}); use a window of at most "
                    f"{min(computed) + 1} or a smaller parallel.sp"
                )
        r = dims.sp_rank
        return SliceLayout(slice_len, starts[r], lent[r], lent[r + 1], halo[r], halo[r + 1])
