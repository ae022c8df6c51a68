"""Per-sample condition dropout for classifier-free guidance of an image-prompted (and context-conditioned) model."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ConditionDropout", "DroppedConditions"]


class DroppedConditions(NamedTuple):
    """Conditions after :class:`ConditionDropout`: tokens / context with dropped rows replaced, and the masks."""

    image_tokens: torch.Tensor | None
    context: torch.Tensor | None
    drop_image: torch.Tensor
    drop_context: torch.Tensor


class ConditionDropout:
    """Per-sample condition dropout for classifier-free guidance (IP-Adapter: 5% image, 5% context, 5% both).

    Each sample independently: with probability ``image_rate`` only its image prompt is dropped, with
    ``context_rate`` only its context, with ``both_rate`` both, else neither (so the image is dropped with
    probability ``image_rate + both_rate``). A dropped image prompt becomes the null image tokens (the adapter's
    :meth:`~wdm3d.networks.IPAdapter.null_image_tokens`; all-zero tokens, exactly the base, when none are given), a
    dropped context the null tokens (e.g. :meth:`ContextEmbedding.null`).

    Args:
        image_rate: probability of dropping only the image.
        context_rate: probability of dropping only the context.
        both_rate: probability of dropping both.

    Example:
        >>> dropout = ConditionDropout()
        >>> drop_image, drop_context = dropout.masks(4, generator=torch.Generator().manual_seed(0))
        >>> drop_image.dtype, drop_image.shape
        (torch.bool, torch.Size([4]))
    """

    def __init__(self, image_rate: float = 0.05, context_rate: float = 0.05, both_rate: float = 0.05) -> None:
        rates = {"image_rate": image_rate, "context_rate": context_rate, "both_rate": both_rate}
        for name, rate in rates.items():
            if not 0.0 <= float(rate) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}.")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"image_rate + context_rate + both_rate must be <= 1, got {sum(rates.values())}.")
        self.image_rate, self.context_rate, self.both_rate = float(image_rate), float(context_rate), float(both_rate)

    def masks(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(drop_image, drop_context)``, two ``(batch_size,)`` bool masks."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        u = torch.rand(batch_size, generator=generator, device=generator.device if generator is not None else device)
        a, b, c = self.image_rate, self.context_rate, self.both_rate
        both = (u >= a + b) & (u < a + b + c)
        drop_image = (u < a) | both
        drop_context = ((u >= a) & (u < a + b)) | both
        if device is not None:
            drop_image, drop_context = drop_image.to(device), drop_context.to(device)
        return drop_image, drop_context

    def __call__(
        self,
        image_tokens: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        null_context: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        null_image_tokens: torch.Tensor | None = None,
    ) -> DroppedConditions:
        """Apply dropout to a batch.

        Args:
            image_tokens: ``(B, N, token_dim)`` (from :meth:`IPAdapter.encode_image`), or None.
            context: ``(B, M, context_dim)`` base context tokens, or None.
            null_context: ``(1 or B, M, context_dim)`` tokens that replace a dropped context (required with one).
            generator: for reproducible masks.
            null_image_tokens: ``(1 or B, N, token_dim)`` tokens that replace a dropped image prompt (default:
                zeros).
        """
        present = [t for t in (image_tokens, context) if t is not None]
        if not present:
            raise ValueError("ConditionDropout needs image_tokens and/or context.")
        batch = present[0].shape[0]
        if any(t.ndim != 3 or t.shape[0] != batch for t in present):
            raise ValueError(
                f"image_tokens and context must be (B, N, dim) with the same B, got "
                f"{[tuple(t.shape) for t in present]}."
            )
        drop_image, drop_context = self.masks(batch, generator, present[0].device)
        if image_tokens is not None:
            if null_image_tokens is None:
                null_image = torch.zeros_like(image_tokens)
            elif null_image_tokens.ndim != 3 or null_image_tokens.shape[1:] != image_tokens.shape[1:]:
                raise ValueError(
                    f"null_image_tokens must have shape (1 or {batch}, {image_tokens.shape[1]}, "
                    f"{image_tokens.shape[2]}), got {tuple(null_image_tokens.shape)}."
                )
            else:
                null_image = null_image_tokens.to(image_tokens.dtype).expand_as(image_tokens)
            image_tokens = torch.where(drop_image[:, None, None], null_image, image_tokens)
        if context is not None:
            if null_context is None:
                if self.context_rate + self.both_rate > 0:
                    raise ValueError("dropping the context needs null_context (e.g. ContextEmbedding.null(1)).")
            else:
                fits = null_context.ndim == 3 and null_context.shape[1:] == context.shape[1:]
                if not fits or null_context.shape[0] not in (1, batch):
                    raise ValueError(
                        f"null_context must have shape (1 or {batch}, {context.shape[1]}, {context.shape[2]}), "
                        f"got {tuple(null_context.shape)}."
                    )
                null = null_context.to(context.dtype).expand_as(context)
                context = torch.where(drop_context[:, None, None], null, context)
        return DroppedConditions(image_tokens, context, drop_image, drop_context)
