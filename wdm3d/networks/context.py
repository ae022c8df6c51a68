"""Learned embeddings of named categorical conditions (modality, dataset): the context tokens that the U-Net's
cross-attention reads, the analogue of a text prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["ContextEmbedding"]


_Labels = str | int | None | Sequence[str | int | None] | torch.Tensor


def _num_labels(labels: _Labels) -> int:
    if isinstance(labels, torch.Tensor):
        return labels.numel()
    return len(labels) if isinstance(labels, Sequence) and not isinstance(labels, str) else 1


class ContextEmbedding(nn.Module):
    """Learned embeddings of named categorical conditions: one context token per field.

    ``{"modality": ["t2w", "t1n"], "dataset": "brats"} -> (B, num_fields, context_dim)``, fields in the order of
    ``vocabularies``. Each field also has a learned "null" embedding, used where a condition is dropped (training
    for classifier-free guidance), missing, or None; :meth:`null` gives the all-null (unconditional) tokens.

    Args:
        vocabularies: field name -> its values' names, e.g.
            ``{"modality": ["t1n", "t2w", "t2f", "t1c"], "dataset": ["brats", "lidc"]}``.
        context_dim: token width (the U-Net's ``context_dim``).

    Example:
        >>> emb = ContextEmbedding({"modality": ["t1n", "t2w", "t2f", "t1c"], "dataset": ["brats", "lidc"]}, 16)
        >>> emb({"modality": ["t2w", "t2f"], "dataset": "brats"}).shape
        torch.Size([2, 2, 16])
        >>> emb({"modality": [1, 2]}).shape  # integer indices work too; a missing field gets its null token
        torch.Size([2, 2, 16])
    """

    def __init__(self, vocabularies: Mapping[str, Sequence[str]], context_dim: int) -> None:
        super().__init__()
        if not isinstance(vocabularies, Mapping) or not vocabularies:
            raise ValueError("vocabularies must be a non-empty mapping of field name -> list of value names.")
        if context_dim < 1:
            raise ValueError(f"context_dim must be >= 1, got {context_dim}.")
        vocabs: dict[str, tuple[str, ...]] = {}
        for field, names in vocabularies.items():
            if not isinstance(field, str) or not field or "." in field:
                raise ValueError(f"field names must be non-empty strings without '.', got {field!r}.")
            if isinstance(names, str) or not isinstance(names, Sequence) or not names:
                raise ValueError(f"the vocabulary of {field!r} must be a non-empty list of names, got {names!r}.")
            names = tuple(names)
            if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
                raise ValueError(f"the vocabulary of {field!r} must hold distinct strings, got {list(names)}.")
            vocabs[field] = names
        self.vocabularies = vocabs
        self.context_dim = context_dim
        # row len(vocabulary) of each table is the field's null embedding
        self.embeddings = nn.ModuleDict({f: nn.Embedding(len(v) + 1, context_dim) for f, v in vocabs.items()})

    __jit_unused_properties__ = ("fields", "num_tokens")  # (read from Python; TorchScript needs neither)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.vocabularies)

    @property
    def num_tokens(self) -> int:
        return len(self.vocabularies)

    def indices(self, field: str, labels: _Labels, batch_size: int | None = None) -> torch.Tensor:
        """Labels of one field as indices ``(B,)``; the null index (``len(vocabulary)``) for None.

        Args:
            field: a field name.
            labels: a name, an index, None, or a sequence / 1D integer tensor of them (one per sample).
            batch_size: broadcast a single label to this many samples.
        """
        if field not in self.vocabularies:
            raise ValueError(f"unknown condition field {field!r}; this embedding has fields {list(self.fields)}.")
        vocab = self.vocabularies[field]
        device = self.embeddings[field].weight.device

        def one(label) -> int:
            if label is None:
                return len(vocab)
            if isinstance(label, str):
                if label not in vocab:
                    raise ValueError(f"unknown {field} {label!r}; known: {list(vocab)} (names are case-sensitive).")
                return vocab.index(label)
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError(f"{field} labels must be names, integer indices or None, got {type(label).__name__}.")
            if not 0 <= label < len(vocab):
                raise ValueError(f"{field} index {label} is out of range [0, {len(vocab)}) for {list(vocab)}.")
            return label

        if isinstance(labels, torch.Tensor):
            if labels.ndim > 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(
                    f"{field} label tensors must be 0D/1D integer tensors, got {labels.dtype} {tuple(labels.shape)}."
                )
            idx = labels.reshape(-1).to(device=device, dtype=torch.long)
            if idx.numel() and (idx.min() < 0 or idx.max() >= len(vocab)):
                raise ValueError(f"{field} indices must be in [0, {len(vocab)}) for {list(vocab)}, got {idx.tolist()}.")
        elif isinstance(labels, (str, int)) or labels is None:
            idx = torch.tensor([one(labels)], device=device)
        elif isinstance(labels, Sequence):
            idx = torch.tensor([one(v) for v in labels], dtype=torch.long, device=device)
        else:
            raise TypeError(
                f"{field} labels must be a name, an index, None or a sequence of them, got {type(labels).__name__}."
            )
        if batch_size is not None and idx.numel() != batch_size:
            if idx.numel() != 1:
                raise ValueError(f"{field} has {idx.numel()} labels for a batch of {batch_size}.")
            idx = idx.expand(batch_size)
        return idx

    @torch.jit.unused  # labels are Python objects: TorchScript code calls null_tokens / embed_indices instead
    def forward(
        self,
        conditions: Mapping[str, _Labels] | None = None,
        batch_size: int | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Context tokens ``(B, num_fields, context_dim)``.

        Args:
            conditions: field -> labels (see :meth:`indices`); missing fields get their null token.
            batch_size: B; inferred from the longest label list if None (single labels broadcast).
            drop: optional ``(B,)`` bool mask: those samples get the null token in every field (condition dropout).
        """
        conditions = dict(conditions or {})
        unknown = [f for f in conditions if f not in self.vocabularies]
        if unknown:
            raise ValueError(f"unknown condition field {unknown[0]!r}; this embedding has fields {list(self.fields)}.")
        if batch_size is None:
            sizes = {_num_labels(v) for v in conditions.values()}
            sizes.discard(1)
            if len(sizes) > 1:
                raise ValueError(f"condition fields have different batch sizes {sorted(sizes)}.")
            batch_size = sizes.pop() if sizes else (int(drop.shape[0]) if drop is not None else 1)
        if drop is not None and (drop.ndim != 1 or drop.shape[0] != batch_size):
            raise ValueError(f"drop must be a ({batch_size},) bool mask, got shape {tuple(drop.shape)}.")
        tokens = []
        for field, table in self.embeddings.items():
            idx = self.indices(field, conditions.get(field), batch_size)
            if drop is not None:
                idx = torch.where(drop.to(idx.device, torch.bool), torch.full_like(idx, table.num_embeddings - 1), idx)
            tokens.append(table(idx))
        return torch.stack(tokens, dim=1)

    def null(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional tokens (every field's null embedding): ``(batch_size, num_fields, context_dim)``."""
        return self.forward({}, batch_size=batch_size)

    @torch.jit.export
    def null_tokens(self, batch_size: int) -> torch.Tensor:
        """:meth:`null` in TorchScript too (the same rows): ``(batch_size, num_fields, context_dim)``."""
        tokens: list[torch.Tensor] = []
        for table in self.embeddings.values():
            idx = torch.full([batch_size], table.num_embeddings - 1, dtype=torch.long, device=table.weight.device)
            tokens.append(table(idx))
        return torch.stack(tokens, dim=1)

    @torch.jit.export
    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Index columns to tokens, in TorchScript too: ``(B, num_fields) -> (B, num_fields, context_dim)``.

        Column ``j`` holds the indices of the ``j``-th field (vocabularies' order), ``len(vocabulary)`` for its null
        token. Unchecked (an index out of range fails inside ``nn.Embedding``): :meth:`forward` and
        :meth:`indices` build checked indices from labels.
        """
        tokens: list[torch.Tensor] = []
        for j, table in enumerate(self.embeddings.values()):
            tokens.append(table(indices[:, j]))
        return torch.stack(tokens, dim=1)

    def extra_repr(self) -> str:
        return f"context_dim={self.context_dim}, vocabularies={self.vocabularies}"
