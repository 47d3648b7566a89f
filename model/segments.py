"""Documents packed into training rows: where the fast-weight state and the attention window reset.

Packing documents end to end into fixed-length rows wastes nothing, but without resets the TTT
state and the sliding window carry one document's context into the next. `DocumentSegments`
describes the packing once per batch; the mixer then runs every document from the learned initial
fast weights (chunks restart at each document start, as a fresh sequence would) and masks
attention between documents. The rows are laid end to end as one packed row, the layout the
chunk kernels take (`cu_seqlens`, as in fla).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DocumentSegments:
    doc_ids: torch.Tensor  # [B, T] document index of every token within its row
    cu_seqlens: torch.Tensor  # [D + 1] document offsets on the rows laid end to end (B * T tokens)
    last_document: torch.Tensor  # [B] index (into the D documents) of each row's last document
    positions: torch.Tensor  # [B, T] position of every token within its document (RoPE restarts too)

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> "DocumentSegments":
        """A document starts at every row start and wherever the id changes within a row."""
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [B, T], got shape {tuple(doc_ids.shape)}")
        batch, seq_len = doc_ids.shape
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        offsets = starts.flatten().nonzero().flatten()
        end = torch.tensor([batch * seq_len], dtype=offsets.dtype, device=offsets.device)
        index = torch.arange(seq_len, device=doc_ids.device).expand(batch, -1)
        document_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
        return cls(doc_ids, torch.cat([offsets, end]), starts.sum(dim=1).cumsum(dim=0) - 1, index - document_start)

    @property
    def num_documents(self) -> int:
        return self.cu_seqlens.numel() - 1

    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of every document on the packed row."""
        offsets = self.cu_seqlens.tolist()
        return list(zip(offsets[:-1], offsets[1:]))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [1, B * T, ...]: the rows end to end."""
        return x.reshape(1, -1, *x.shape[2:])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, B * T, ...] -> [B, T, ...]."""
        return x.reshape(*self.doc_ids.shape, *x.shape[2:])
