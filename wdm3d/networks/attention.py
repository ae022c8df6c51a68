"""Cross-attention for the WDM U-Net: an attention module whose computation is a swappable processor, the 3D
cross-attention block built on it, and learned embeddings of categorical conditions (the context tokens).

The processor pattern follows diffusers' ``Attention`` / ``AttnProcessor``: the module owns ``to_q``, ``to_k``,
``to_v`` and ``to_out``; *how* they are combined is delegated to ``attention.processor``, so that an add-on
(:class:`wdm3d.networks.ip_adapter.IPAdapter`) changes the computation by installing a processor instead of editing
or forking the network. Unlike diffusers, an installed processor is not registered as a submodule: its parameters
belong to whatever installed it, and the network's ``state_dict()`` / ``parameters()`` stay those of the network.

MONAI's ``SpatialTransformer`` (in ``diffusion_model_unet``) is a full transformer (self-attention, cross-attention,
feed-forward, conv projections) with no processor hook; here a single cross-attention with a swappable processor
is what is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "AttnProcessor",
    "CrossAttentionBlock",
    "ContextEmbedding",
    "attention_heads",
    "split_heads",
    "merge_heads",
]


def attention_heads(channels: int, num_heads: int | None = None, head_dim: int | None = 32) -> tuple[int, int]:
    """``(num_heads, head_dim)`` for an attention over ``channels`` features.

    Args:
        channels: feature width the heads split.
        num_heads: number of heads (must divide ``channels``); takes precedence over ``head_dim``.
        head_dim: width per head when ``num_heads`` is None; capped at ``channels`` and must divide it.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}.")
    if num_heads is not None:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the attention width {channels}.")
        return num_heads, channels // num_heads
    if head_dim is None or head_dim < 1:
        raise ValueError(f"give num_heads or a positive head_dim, got head_dim={head_dim}.")
    head_dim = min(head_dim, channels)
    if channels % head_dim:
        raise ValueError(
            f"head_dim={head_dim} must divide the attention width {channels}; choose another head_dim or num_heads."
        )
    return channels // head_dim, head_dim


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, L, heads * d) -> (B, heads, L, d)``."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(B, heads, L, d) -> (B, L, heads * d)``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class AttnProcessor:
    """The default processor: ``to_out(softmax(Q K^T / sqrt(d)) V)`` with ``Q = to_q(x)``, ``K = to_k(c)``,
    ``V = to_v(c)`` (Vaswani et al. 2017, eq. 1), computed by ``F.scaled_dot_product_attention``.

    Called as ``processor(attn, hidden_states, context)``:
    ``(B, L, query_dim), (B, N, context_dim) -> (B, L, query_dim)``.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return attn.default_attention(hidden_states, context)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers-style projections and a swappable processor.

    ``(B, L, query_dim), (B, N, context_dim) -> (B, L, query_dim)``; without a context it attends to itself.

    Args:
        query_dim: width of the queries' source (and of the output).
        context_dim: width of the context tokens (defaults to ``query_dim``).
        num_heads: attention heads.
        head_dim: width per head (defaults to ``query_dim // num_heads``).
        out_bias: give ``to_out`` a bias.
        zero_out: zero-initialise ``to_out`` (weight and bias), so that the module outputs zeros when fresh.

    ``to_q``, ``to_k``, ``to_v`` are bias-free ``nn.Linear`` layers, ``to_out`` an ``nn.Linear``. The computation is
    ``self.processor(self, hidden_states, context)``; replace it with :meth:`set_processor` (or by assigning
    ``attention.processor``). The processor is not a registered submodule (see the module docstring).

    ``torch.jit.script`` compiles the default computation (:meth:`default_attention`); scripting a module with
    another processor installed raises instead of silently dropping it (see :meth:`__prepare_scriptable__`).

    Example:
        >>> attn = Attention(32, context_dim=16, num_heads=4)
        >>> attn(torch.randn(2, 100, 32), torch.randn(2, 3, 16)).shape
        torch.Size([2, 100, 32])
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        num_heads: int = 1,
        head_dim: int | None = None,
        out_bias: bool = True,
        zero_out: bool = False,
    ) -> None:
        super().__init__()
        context_dim = query_dim if context_dim is None else context_dim
        if query_dim < 1 or context_dim < 1 or num_heads < 1:
            raise ValueError(
                f"query_dim, context_dim and num_heads must be >= 1, got {query_dim}, {context_dim}, {num_heads}."
            )
        if head_dim is None:
            if query_dim % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide query_dim={query_dim} (or give head_dim).")
            head_dim = query_dim // num_heads
        self.query_dim, self.context_dim = query_dim, context_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)
        if zero_out:
            for p in self.to_out.parameters():
                nn.init.zeros_(p)
        self.set_processor(AttnProcessor())

    __jit_unused_properties__ = ("processor",)  # a Python callable, not part of a scripted module

    @property
    def processor(self) -> Callable[..., torch.Tensor]:
        return self.__dict__["_processor"]

    def set_processor(self, processor: Callable[..., torch.Tensor]) -> None:
        """Use ``processor(attn, hidden_states, context) -> output`` for the computation (not registered as a
        submodule: whoever installs a processor with parameters owns, saves and moves them)."""
        if not callable(processor):
            raise TypeError(f"an attention processor must be callable, got {type(processor).__name__}.")
        self.__dict__["_processor"] = processor

    def __setattr__(self, name: str, value) -> None:
        if name == "processor":  # keep processors out of the module tree even when they are nn.Modules
            self.set_processor(value)
        else:
            super().__setattr__(name, value)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention over heads: ``(B, L, h*d), (B, N, h*d), (B, N, h*d) -> (B, L, h*d)``."""
        q, k, v = (split_heads(t, self.num_heads) for t in (query, key, value))
        return merge_heads(F.scaled_dot_product_attention(q, k, v))

    def default_attention(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """What :class:`AttnProcessor` computes: ``to_out(attend(to_q(x), to_k(c), to_v(c)))``,
        ``(B, L, query_dim), (B, N, context_dim) -> (B, L, query_dim)``."""
        query = self.to_q(hidden_states)
        out = self.attend(query, self.to_k(context), self.to_v(context))
        return self.to_out(out)

    def __prepare_scriptable__(self) -> Attention:
        # torch.jit.script calls this before compiling; the scripted forward is default_attention
        if type(self.processor) is not AttnProcessor:
            raise RuntimeError(
                f"cannot script an Attention with the processor {self.processor!r}: TorchScript compiles the default "
                "computation only and would drop it. Uninstall it first (e.g. IPAdapter.remove())."
            )
        return self

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            hidden_states: ``(B, L, query_dim)`` queries' source.
            context: ``(B, N, context_dim)`` keys' and values' source; None: ``hidden_states`` (self-attention).
        """
        if context is None:
            context = hidden_states
        if torch.jit.is_scripting():  # the installed processor is a Python callable: scripted, the default one
            return self.default_attention(hidden_states, context)
        self._check_inputs(hidden_states, context)
        return self.processor(self, hidden_states, context)

    def _check_inputs(self, hidden_states: torch.Tensor, context: torch.Tensor) -> None:
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.query_dim:
            raise ValueError(
                f"hidden_states must have shape (B, L, {self.query_dim}), got {tuple(hidden_states.shape)}."
            )
        if context.ndim != 3 or context.shape[-1] != self.context_dim or context.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"context must have shape ({hidden_states.shape[0]}, N, {self.context_dim}), "
                f"got {tuple(context.shape)}."
            )

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, processor={self.processor!r}"


class CrossAttentionBlock(nn.Module):
    """3D cross-attention block: ``x + to_out(Attn(GroupNorm(x) as tokens, context))``.

    ``(B, C, D, H, W), (B, N, context_dim) -> (B, C, D, H, W)``: the volume is normalised, flattened to ``D*H*W``
    tokens of width C that attend to the context tokens, and the result is added back. The output projection is
    zero-initialised, so a fresh block is the identity (exactly).

    Args:
        channels: C.
        context_dim: width of the context tokens.
        num_heads: attention heads (takes precedence over ``head_dim``).
        head_dim: width per head when ``num_heads`` is None (capped at ``channels``).
        norm_num_groups: GroupNorm groups (must divide ``channels``).
        out_bias: give the output projection a bias. Without it, all-zero context tokens give exactly zero
            attention output (``V = 0``), i.e. the block is the identity for them.

    Example:
        >>> block = CrossAttentionBlock(16, context_dim=8, norm_num_groups=4)
        >>> x = torch.randn(1, 16, 4, 4, 4)
        >>> torch.equal(block(x, torch.randn(1, 2, 8)), x)  # zero-initialised output projection
        True
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        num_heads: int | None = None,
        head_dim: int | None = 32,
        norm_num_groups: int = 32,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        if channels % norm_num_groups:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide the channel count {channels}.")
        heads, dim = attention_heads(channels, num_heads, head_dim)
        self.channels, self.context_dim = channels, context_dim
        self.norm = nn.GroupNorm(norm_num_groups, channels)
        self.attn = Attention(channels, context_dim, heads, dim, out_bias=out_bias, zero_out=True)

    def branch(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The residual branch alone: ``(B, C, D, H, W), (B, N, context_dim) -> (B, C, D, H, W)``."""
        if not torch.jit.is_scripting():  # noqa: SIM102 - TorchScript drops this branch only when it tests this alone
            if x.ndim != 5 or x.shape[1] != self.channels:
                raise ValueError(f"x must have shape (B, {self.channels}, D, H, W), got {tuple(x.shape)}.")
        # (B, D*H*W, C), contiguous: for a transposed input torch.matmul folds the batch into one mm only when
        # the weight needs no gradient, so the last bits of the result would depend on whether the network is
        # frozen (an installed IP-Adapter at scale 0 would then not be exactly its base)
        tokens = self.norm(x).flatten(2).transpose(1, 2).contiguous()
        out = self.attn(tokens, context.to(tokens.dtype))
        return out.transpose(1, 2).reshape(x.shape)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x, context)


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
