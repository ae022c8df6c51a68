"""What the IP-Adapter installs on its base: the decoupled cross-attention processor for the base's attention modules
and the processor that adds an image cross-attention block after a residual block (an anchor of a ``WDMUNet``).

Both read the image prompt from the call that reaches them (:class:`~wdm3d.networks.attention.ImagePrompt`, passed
down by the network's ``forward``) and keep nothing of it: no state is shared between calls, threads or samples.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import Attention, CrossAttentionBlock, ImagePrompt

__all__ = ["AddedBlockProcessor", "IPAttnProcessor"]


def _per_sample(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` lambdas shaped to multiply ``like`` ``(B, ...)`` sample by sample."""
    return scale.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class IPAttnProcessor(nn.Module):
    """Decoupled cross-attention processor (IP-Adapter eq. 5): ``to_out(Attn(Q, K, V) + lambda * Attn(Q, K', V'))``.

    ``Q = to_q(x)``, ``K = to_k(c)``, ``V = to_v(c)`` are the base attention's; ``K' = to_k_ip(t)``,
    ``V' = to_v_ip(t)`` are new bias-free projections of the image tokens ``t``, initialised as copies of the base's
    ``to_k`` / ``to_v``. ``t`` and lambda come with the call (one set and one lambda per sample); without an image
    prompt it computes exactly what the default processor does.

    Args:
        attn: the base attention module it is made for.
        token_dim: width of the image tokens (must equal the base's context width, as K' / V' start as K / V).
    """

    def __init__(self, attn: Attention, token_dim: int) -> None:
        super().__init__()
        if attn.to_k.in_features != token_dim:
            raise ValueError(
                f"image tokens of width {token_dim} cannot start from the base's to_k "
                f"({attn.to_k.in_features} inputs); use token_dim={attn.to_k.in_features}."
            )
        self.to_k_ip = nn.Linear(token_dim, attn.to_k.out_features, bias=False)
        self.to_v_ip = nn.Linear(token_dim, attn.to_v.out_features, bias=False)
        with torch.no_grad():
            self.to_k_ip.weight.copy_(attn.to_k.weight)
            self.to_v_ip.weight.copy_(attn.to_v.weight)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        image_prompt: ImagePrompt | None = None,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states)
        out = attn.attend(query, attn.to_k(context), attn.to_v(context))
        if image_prompt is not None:
            tokens = image_prompt.tokens.to(query.dtype)
            image = attn.attend(query, self.to_k_ip(tokens), self.to_v_ip(tokens))
            out = out + _per_sample(image_prompt.scale, image) * image
        return attn.to_out(out)


class AddedBlockProcessor:
    """Anchor processor: ``h + lambda * block.branch(h, image tokens)`` (a zero-initialised, bias-free image
    cross-attention block after a residual block of a base without cross-attention there).

    Installed with :meth:`WDMUNet.set_anchor_processor`; the block belongs to the adapter that installed it.

    Args:
        block: the added :class:`~wdm3d.networks.attention.CrossAttentionBlock`.
    """

    def __init__(self, block: CrossAttentionBlock) -> None:
        self.block = block

    def __call__(self, h: torch.Tensor, image_prompt: ImagePrompt) -> torch.Tensor:
        branch = self.block.branch(h, image_prompt.tokens, places=image_prompt.places)
        return h + _per_sample(image_prompt.scale, branch) * branch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.block.channels} channels)"
