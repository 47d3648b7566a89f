"""The fast-weight state a sequence carries from chunk to chunk, and the operations on it.

The recurrent form updates W0, W2 [B, H, dh, d] and W1 [B, H, d, dh] (the parallel form only W1),
and with momentum their momenta m0, m2 [B, H, dh, d], m1 [B, H, d, dh]. Every field is per sequence
(the batch dimension first), so a batch of states is stacked, split and indexed along it. The layer
over packed documents, decoding and the sequence-parallel ring all handle states through the
methods here; none of them lists the fields itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence, Union

import torch

Index = Union[int, slice, torch.Tensor]


@dataclass
class FastWeights:
    """The state of the recurrent form for one batch of sequences; `m*` are momenta (None when off,
    or before a momentum update has run)."""

    w0: torch.Tensor  # [B, H, dh, d]
    w1: torch.Tensor  # [B, H, d, dh]
    w2: torch.Tensor  # [B, H, dh, d]
    m0: Optional[torch.Tensor] = None
    m1: Optional[torch.Tensor] = None
    m2: Optional[torch.Tensor] = None

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(field name, tensor) of every field that is present, weights before momenta."""
        return [(f.name, t) for f in fields(self) if (t := getattr(self, f.name)) is not None]

    def tensors(self) -> list[torch.Tensor]:
        """The present tensors, in `named_tensors` order."""
        return [t for _, t in self.named_tensors()]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FastWeights":
        """A state of `fn` applied to every present tensor (in `named_tensors` order); absent momenta stay absent."""
        return FastWeights(**{name: fn(t) for name, t in self.named_tensors()})

    def select(self, index: Index) -> "FastWeights":
        """The states of the sequences at `index` along the batch dimension (an int keeps it as size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda t: t[index])

    @staticmethod
    def concat(states: Sequence["FastWeights"]) -> "FastWeights":
        """States stacked along the batch dimension; the fields present in the first state are kept."""
        names = [name for name, _ in states[0].named_tensors()]
        return FastWeights(**{name: torch.cat([getattr(s, name) for s in states]) for name in names})

    def flatten(self) -> torch.Tensor:
        """The present tensors as one flat buffer, in `named_tensors` order: one message moves a state."""
        return torch.cat([t.reshape(-1) for t in self.tensors()])

    def unflatten(self, flat: torch.Tensor) -> "FastWeights":
        """A state with this one's fields and shapes, read from a buffer in `flatten`'s layout."""
        named = self.named_tensors()
        parts = flat.split([t.numel() for _, t in named])
        return FastWeights(**{name: part.reshape(t.shape) for (name, t), part in zip(named, parts)})

    def weights(self) -> "FastWeights":
        """The weights alone, momenta dropped."""
        return FastWeights(self.w0, self.w1, self.w2)

    def with_momenta(self) -> "FastWeights":
        """Every momentum present: an absent one is zero, which is how a momentum update starts it."""
        fill = lambda m, w: m if m is not None else torch.zeros_like(w)  # noqa: E731
        return FastWeights(self.w0, self.w1, self.w2, fill(self.m0, self.w0), fill(self.m1, self.w1),
                           fill(self.m2, self.w2))  # fmt: skip

    def aligned_to(self, template: "FastWeights") -> "FastWeights":
        """This state with exactly the fields `template` has: a missing momentum is zero, a field the
        template lacks is dropped (so that states from different points of a sequence stack)."""
        full = self.with_momenta()
        return FastWeights(**{name: getattr(full, name) for name, _ in template.named_tensors()})
