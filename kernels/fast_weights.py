"""The fast-weight state a sequence carries from chunk to chunk, the gradient a chunk steps it by,
and the operations on them.

The recurrent form updates W0, W2 [B, H, dh, d] and W1 [B, H, d, dh] (the parallel form only W1),
and with momentum their momenta m0, m2 [B, H, dh, d], m1 [B, H, d, dh]. A chunk's step is made
from its gradients G0, G2 [B, H, dh, d] and G1 [B, H, d, dh] (`ChunkGradients`). Every field is per
sequence (the batch dimension first), so a batch of states is stacked, split and indexed along it.
The layer over packed documents, decoding and the sequence-parallel ring all handle states through
the methods here; none of them lists the fields itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch

Index = Union[int, slice, torch.Tensor]
Record = TypeVar("Record", bound="PerSequenceTensors")

# Which of the state's weights a `model.ttt.fast_weights` setting updates (the others stay frozen).
FAST_WEIGHT_NAMES: dict[str, tuple[str, ...]] = {"all": ("w0", "w1", "w2"), "w1": ("w1",)}


class PerSequenceTensors:
    """What a dataclass of optional per-sequence tensors (the batch dimension first) can do without
    knowing its fields. A subclass gives every field that may be absent the default None."""

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(field name, tensor) of every field that is present, in declaration order."""
        return [(f.name, t) for f in fields(self) if (t := getattr(self, f.name)) is not None]

    def tensors(self) -> list[torch.Tensor]:
        """The present tensors, in `named_tensors` order."""
        return [t for _, t in self.named_tensors()]

    def map(self: Record, fn: Callable[[torch.Tensor], torch.Tensor]) -> Record:
        """A record of `fn` applied to every present tensor (in `named_tensors` order); absent fields stay absent."""
        return type(self)(**{name: fn(t) for name, t in self.named_tensors()})

    def select(self: Record, index: Index) -> Record:
        """The records of the sequences at `index` along the batch dimension (an int keeps it as size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda t: t[index])

    @classmethod
    def concat(cls: type[Record], records: Sequence[Record]) -> Record:
        """Records stacked along the batch dimension; the fields present in the first one are kept."""
        names = [name for name, _ in records[0].named_tensors()]
        return cls(**{name: torch.cat([getattr(r, name) for r in records]) for name in names})

    def flatten(self) -> torch.Tensor:
        """The present tensors as one flat buffer, in `named_tensors` order: one message moves a record."""
        return torch.cat([t.reshape(-1) for t in self.tensors()])

    def unflatten(self: Record, flat: torch.Tensor) -> Record:
        """A record with this one's fields and shapes, read from a buffer in `flatten`'s layout."""
        named = self.named_tensors()
        parts = flat.split([t.numel() for _, t in named])
        return type(self)(**{name: part.reshape(t.shape) for (name, t), part in zip(named, parts)})


@dataclass
class FastWeights(PerSequenceTensors):
    """The state of the recurrent form for one batch of sequences; `m*` are momenta (None when off,
    or before a momentum update has run)."""

    w0: torch.Tensor  # [B, H, dh, d]
    w1: torch.Tensor  # [B, H, d, dh]
    w2: torch.Tensor  # [B, H, dh, d]
    m0: Optional[torch.Tensor] = None
    m1: Optional[torch.Tensor] = None
    m2: Optional[torch.Tensor] = None

    def weights(self) -> "FastWeights":
        """The weights alone, momenta dropped."""
        return FastWeights(self.w0, self.w1, self.w2)

    def with_momenta(self, of: Sequence[str] = ("w0", "w1", "w2")) -> "FastWeights":
        """The weights with the momenta of the weights named in `of` ("w0", "w1", "w2"), the others
        dropped: an absent one is zero, which is how a momentum update starts it."""
        momenta = {}
        for name in of:
            momentum = getattr(self, "m" + name[1:])
            momenta["m" + name[1:]] = momentum if momentum is not None else torch.zeros_like(getattr(self, name))
        return FastWeights(self.w0, self.w1, self.w2, **momenta)


@dataclass
class ChunkGradients(PerSequenceTensors):
    """G_i = sum over a chunk's tokens t of eta_i,t * grad_{W_i} l_t, at the weights entering the chunk:
    what the chunk's step is made from. g0, g1, g2 belong to w0, w1, w2 (and momenta m0, m1, m2); a
    frozen weight has none (None)."""

    g0: Optional[torch.Tensor] = None  # [B, H, dh, d]
    g1: Optional[torch.Tensor] = None  # [B, H, d, dh]
    g2: Optional[torch.Tensor] = None  # [B, H, dh, d]

    @staticmethod
    def zeros(weights: FastWeights, names: Sequence[str]) -> "ChunkGradients":
        """Zero gradients of the weights named in `names` ("w0", "w1", "w2"), each a fresh contiguous
        tensor of its weight's shape, dtype and device (also where the weight is an expanded view):
        where a running sum starts."""
        return ChunkGradients(**{"g" + name[1:]: torch.zeros(getattr(weights, name).shape, dtype=weights.w1.dtype,
                                                            device=weights.w1.device) for name in names})  # fmt: skip

    def add_(self, other: "ChunkGradients") -> None:
        """Add `other`'s gradients (the same fields) into these, in place: a running sum over tokens."""
        for total, part in zip(self.tensors(), other.tensors(), strict=True):
            total += part
