"""How the image prompt reaches a base network whose code stays as it is: the prompt state shared for the duration
of one adapter forward, the decoupled cross-attention processor installed on the base's attention modules, and the
forward hook that adds an image cross-attention block after a residual block."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from ..attention import Attention, CrossAttentionBlock

__all__ = ["IPAttnProcessor"]


class _ImagePrompt:
    """What the installed processors and hooks read during a forward of the base (set by ``IPAdapter.forward``).

    ``generation`` counts the adapter's forwards, so that a backward can tell whether the prompt it recomputes
    checkpointed blocks with is still its own; ``lock`` is held during a forward (one adapter, one forward at a
    time: the state is shared by every thread, as it must be, since autograd may recompute on another thread).
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.scale: float = 0.0
        self.generation = 0
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle of an adapter: a fresh, empty prompt
        return {"tokens": None, "scale": 0.0, "generation": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.tokens is not None and self.scale != 0.0

    def clear(self) -> None:
        self.tokens, self.scale = None, 0.0


class IPAttnProcessor(nn.Module):
    """Decoupled cross-attention processor (IP-Adapter eq. 5): ``to_out(Attn(Q, K, V) + lambda * Attn(Q, K', V'))``.

    ``Q = to_q(x)``, ``K = to_k(c)``, ``V = to_v(c)`` are the base attention's; ``K' = to_k_ip(t)``,
    ``V' = to_v_ip(t)`` are new bias-free projections of the image tokens ``t``, initialised as copies of the base's
    ``to_k`` / ``to_v``. Without an active image prompt (no tokens, or lambda = 0) it computes exactly what the
    default processor does.

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
        self.__dict__["prompt"] = _ImagePrompt()  # replaced by the installing adapter's shared prompt

    def forward(self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        query = attn.to_q(hidden_states)
        out = attn.attend(query, attn.to_k(context), attn.to_v(context))
        prompt = self.__dict__["prompt"]
        if prompt.active:
            tokens = prompt.tokens.to(query.dtype)
            out = out + prompt.scale * attn.attend(query, self.to_k_ip(tokens), self.to_v_ip(tokens))
        return attn.to_out(out)


class _AddedBlockHook:
    """Forward hook: ``output + lambda * block.branch(output, image tokens)`` while an image prompt is active."""

    def __init__(self, block: CrossAttentionBlock, prompt: _ImagePrompt) -> None:
        self.block, self.prompt = block, prompt

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.prompt.active:
            return None  # unchanged
        return output + self.prompt.scale * self.block.branch(output, self.prompt.tokens)


def _prompt_consumed(prompt: _ImagePrompt, generation: int, grad: torch.Tensor) -> None:
    """Hook on the image tokens of a forward through a checkpointing base: runs when their gradient is complete,
    i.e. after every recomputed block used them. Checks that the recomputation saw this forward's prompt, then
    clears it (the base alone is the base again)."""
    if prompt.generation != generation or prompt.tokens is None:
        why = "another adapter forward ran" if prompt.generation != generation else "this backward already ran once"
        raise RuntimeError(
            f"IP-Adapter with a gradient-checkpointing base: {why} between this forward and its backward, so the "
            "recomputed blocks did not see this forward's image prompt and the gradients are wrong. Run backward "
            "once after each adapter forward (or turn checkpointing off)."
        )
    prompt.clear()
