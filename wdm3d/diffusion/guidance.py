"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6) as a model wrapper.

``output = uncond + g * (cond - uncond)``, where ``cond`` is the network's output with the conditions and
``uncond`` with the dropped ones (null context tokens, all-zero image tokens: what :class:`ConditionDropout`
trained the network to read as "no condition"). The wrapper is called like the network,
``guided(x, timesteps, context=context)``, so it is the ``model`` of :meth:`WaveletDiffusion.sample`. The guidance
acts on whatever the network predicts (x0 in WDM, epsilon or v): the combination is linear in all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ClassifierFreeGuidance", "GUIDED_CONDITIONS"]

#: Conditions the unconditional branch can drop.
GUIDED_CONDITIONS = ("context", "image")


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance around a conditioned network (a ``WDMUNet`` with context, or an ``IPAdapter``).

    ``(B, C, D, H, W), (B,) -> (B, C', D, H, W)``: ``uncond + g * (cond - uncond)``. With ``g = 1`` only the
    conditional forward runs (exactly the network's conditional output), with ``g = 0`` only the unconditional one.

    Args:
        model: called as ``model(x, timesteps, context=...)``, plus ``image_tokens=..., scale=...`` when a call
            carries an image prompt (an :class:`~wdm3d.networks.ip_adapter.IPAdapter`).
        guidance_scale: g (1: no guidance).
        null_context: ``(1 or B, N, context_dim)`` tokens for the unconditional branch, e.g.
            ``ContextEmbedding.null(1)``; required when the context is guided and a context is passed.
        drop: conditions the unconditional branch drops: ``("context", "image")`` (default, IP-Adapter's
            unconditional) or one of them, e.g. ``("image",)`` to guide on the image prompt while keeping the target
            modality given as context.
        batched: run both branches as one batch of 2B (default); False: two forwards (half the peak memory).

    Example:
        >>> guided = ClassifierFreeGuidance(adapter, 3.0, null_context=embedding.null(1))  # doctest: +SKIP
        >>> tokens = adapter.encode_image(reference)  # doctest: +SKIP
        >>> diffusion.sample(  # doctest: +SKIP
        ...     guided, (1, 64, 64, 64), context=embedding({"modality": "t2w"}),
        ...     model_kwargs={"image_tokens": tokens, "image_scale": 0.5},
        ... )
    """

    def __init__(
        self,
        model: nn.Module,
        guidance_scale: float = 1.0,
        null_context: torch.Tensor | None = None,
        drop: Sequence[str] = GUIDED_CONDITIONS,
        batched: bool = True,
    ) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, timesteps, context=...), got {type(model).__name__}.")
        drop = (drop,) if isinstance(drop, str) else tuple(drop)
        bad = [d for d in drop if d not in GUIDED_CONDITIONS]
        if bad or not drop:
            raise ValueError(f"drop must name one or more of {GUIDED_CONDITIONS}, got {list(drop)}.")
        if null_context is not None and (not isinstance(null_context, torch.Tensor) or null_context.ndim != 3):
            got = getattr(null_context, "shape", null_context)
            raise ValueError(f"null_context must be a (1 or B, N, context_dim) tensor, got {got}.")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.drop = drop
        self.batched = bool(batched)
        self.register_buffer("null_context", null_context, persistent=False)

    def _call(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None,
        tokens: torch.Tensor | None,
        scale: float | torch.Tensor | None,
    ) -> torch.Tensor:
        if tokens is None:
            return self.model(x, t, context=context)
        return self.model(x, t, context=context, image_tokens=tokens, scale=scale)

    def _null_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        null_of = getattr(self.model, "null_image_tokens", None)
        if null_of is None:  # a model without its own null prompt: all-zero tokens (an adapter's exact base)
            return torch.zeros_like(tokens)
        null = null_of(tokens.shape[0]).to(device=tokens.device, dtype=tokens.dtype)
        if null.shape != tokens.shape:
            raise ValueError(
                f"the model's null image tokens {tuple(null.shape)} do not match the prompt's {tuple(tokens.shape)}."
            )
        return null

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        image_scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``(B, C, D, H, W)`` network input.
            timesteps: ``(B,)`` or scalar timesteps.
            context: ``(1 or B, N, context_dim)`` conditional context tokens, or None.
            image_tokens: ``(1 or B, N, token_dim)`` image-prompt tokens of an IP-Adapter model (its
                ``encode_image``), or None; the unconditional branch uses the model's ``null_image_tokens``.
            image_scale: the adapter's lambda for this call, a number or one per sample (None: its default).
        """
        b = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        tokens = image_tokens
        if tokens is not None:
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[0] not in (1, b):
                got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
                raise ValueError(f"image_tokens must be (1 or {b}, N, token_dim), got {got}.")
            tokens = tokens.to(x.device).expand(b, -1, -1)
        if context is not None:
            if context.ndim != 3 or context.shape[0] not in (1, b):
                raise ValueError(f"context must be (1 or {b}, N, context_dim), got {tuple(context.shape)}.")
            context = context.expand(b, -1, -1)
        scale = image_scale
        if isinstance(scale, torch.Tensor) and scale.ndim == 1 and scale.shape[0] == b:
            scale2 = torch.cat((scale, scale))  # one lambda per sample: the same for both branches
        else:
            scale2 = scale

        g = self.guidance_scale
        if g == 1.0:
            return self._call(x, timesteps, context, tokens, scale)

        # the unconditional branch
        context_u, tokens_u = context, tokens
        if "context" in self.drop and context is not None:
            if self.null_context is None:
                raise ValueError("guiding on the context needs null_context (e.g. ContextEmbedding.null(1)).")
            null = self.null_context
            if null.shape[0] not in (1, b) or null.shape[1:] != context.shape[1:]:
                raise ValueError(
                    f"null_context has shape {tuple(null.shape)}; expected "
                    f"(1 or {b}, {context.shape[1]}, {context.shape[2]})."
                )
            context_u = null.to(device=context.device, dtype=context.dtype).expand_as(context)
        if "image" in self.drop and tokens is not None:
            tokens_u = self._null_image_tokens(tokens)
        if context_u is context and tokens_u is tokens:  # nothing to drop: guidance is the identity
            return self._call(x, timesteps, context, tokens, scale)
        if g == 0.0:
            return self._call(x, timesteps, context_u, tokens_u, scale)

        if self.batched:

            def cat(a: torch.Tensor | None, b_: torch.Tensor | None) -> torch.Tensor | None:
                return None if a is None else torch.cat((a, b_))

            out = self._call(
                torch.cat((x, x)),
                torch.cat((timesteps, timesteps)),
                cat(context, context_u),
                cat(tokens, tokens_u),
                scale2,
            )
            cond, uncond = out.chunk(2)
        else:
            cond = self._call(x, timesteps, context, tokens, scale)
            uncond = self._call(x, timesteps, context_u, tokens_u, scale)
        return uncond + g * (cond - uncond)

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale}, drop={self.drop}, batched={self.batched}"
