"""What the networks need to compile with ``torch.jit.script`` (MONAI's ``ckpt_export`` scripts a bundle's network).

The networks keep one forward for eager use and for TorchScript. Where eager code uses what TorchScript cannot
compile (gradient checkpointing, autocast switches, the fused Triton Haar kernel, error messages that format shapes
with ``tuple``), the forward branches on ``torch.jit.is_scripting()``; TorchScript drops the eager branch at compile
time, so the eager path is unchanged. The scripted network therefore has no gradient checkpointing (it is an
inference export), runs the Haar transform by its torch path and skips the eager-only input checks.

Helpers:

- :class:`TensorModule` / :class:`TensorBlock`: TorchScript module interfaces, so that a ``ModuleList`` can be indexed
  with a loop variable (TorchScript otherwise only iterates a ``ModuleList`` front to back, and the decoders run their
  levels coarse to fine over lists stored finest first).
- :func:`haar_dwt3d` / :func:`haar_idwt3d`: :func:`wdm3d.wavelets.dwt3d` / :func:`~wdm3d.wavelets.idwt3d` (Haar) in
  eager mode, the same gather-and-butterfly arithmetic as the wavelets module's torch path when scripted.
- :func:`shape_repr`: ``repr(tuple(shape))`` in TorchScript too, for error messages both paths share.

What else the networks do for TorchScript (torch 2.x), so that the next change keeps them scriptable:

- no ``isinstance`` on submodules in a forward: TorchScript compiles modules of one class with different submodules
  as distinct types, for which its ``isinstance`` is False; ``hasattr(module, "name")`` is resolved at compile time;
- no string annotations (``from __future__ import annotations``) where TorchScript reads an annotation as an object:
  NamedTuple fields (:mod:`wdm3d.networks.vae_base`) and module attributes (``CausalConv3d._cache``);
- ``int ** int`` is a float in TorchScript (``k * k * k``, ``1 << n``); no ``super()``, no generator expressions over
  modules, no ``tuple(list)``;
- what a forward returns is tensors, lists, dicts or NamedTuples of them (``VAEOutput``, ``LatentDistribution``), so a
  scripted network's output loads in any process; TorchScript code cannot call a NamedTuple's methods
  (:func:`~wdm3d.networks.vae_base.latent_sample` is ``posterior.sample()`` for it);
- properties that read Python objects are listed in ``__jit_unused_properties__``; ``__prepare_scriptable__`` refuses
  what TorchScript would silently drop (an attention processor or forward hook installed by an
  :class:`~wdm3d.networks.IPAdapter`, which itself cannot be scripted).

The scripted Haar transform repeats the arithmetic of :mod:`wdm3d.wavelets`' torch path because that one is not
scriptable (it reads a module-level float and works in place inside an ``autograd.Function``); both give the same
bits (``tests/test_torchscript_export.py``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..wavelets import dwt3d, idwt3d

__all__ = ["TensorBlock", "TensorModule", "haar_dwt3d", "haar_idwt3d", "shape_repr"]


with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, and says so on every import of this module
    warnings.simplefilter("ignore", DeprecationWarning)

    @torch.jit.interface
    class TensorModule(nn.Module):
        """A module called as ``module(input) -> Tensor`` (torch's layers and containers name the argument
        ``input``).

        In TorchScript, ``m: TensorModule = self.layers[i]`` followed by ``m.forward(x)`` indexes a ``ModuleList``
        with a variable ``i``; every module in that list must have a ``forward(self, input: Tensor) -> Tensor``.
        """

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # (the argument name torch's modules use)
            pass  # an interface declares the signature only; TorchScript never runs this body

    @torch.jit.interface
    class TensorBlock(nn.Module):
        """As :class:`TensorModule` for wdm3d's blocks, which name the argument ``x``
        (:class:`~wdm3d.networks.causal.CausalConv3d`, :class:`~wdm3d.networks.causal.CausalDownsample3d`, ...)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pass  # an interface declares the signature only


def shape_repr(shape: list[int]) -> str:
    """``repr(tuple(shape))`` (``"(2, 8, 4)"``, ``"(3,)"``), also inside TorchScript, which has no ``tuple(list)``."""
    items = [str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _butterfly(t: torch.Tensor, dim: int) -> torch.Tensor:
    # along a size-2 dim: (a, b) -> (a + b, a - b), with wdm3d.wavelets' arithmetic (a - b = (a + b) - 2b, 2b exact);
    # out of place, so that autograd differentiates it (wdm3d.wavelets works in place inside an autograd.Function)
    a, b = t.select(dim, 0), t.select(dim, 1)
    total = a + b
    return torch.stack((total, torch.sub(total, b, alpha=2)), dim)


def _haar_forward(x: torch.Tensor) -> torch.Tensor:
    # (B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2): wdm3d.wavelets' torch path (a scaled gather into (B, 2, 2, 2, C, d,
    # h, w), then butterflies over the three size-2 axes) in a form TorchScript compiles; half types in float32
    t = x.float() if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x
    scale = 1.0 / (2.0 * math.sqrt(2.0))
    b, c, d2, h2, w2 = t.shape
    d, h, w = d2 // 2, h2 // 2, w2 // 2
    out = (t.reshape(b, c, d, 2, h, 2, w, 2).permute(0, 3, 5, 7, 1, 2, 4, 6) * scale).contiguous()
    out = _butterfly(_butterfly(_butterfly(out, 1), 2), 3)
    return out.reshape(b, 8 * c, d, h, w).to(x.dtype)


def _haar_inverse(y: torch.Tensor) -> torch.Tensor:
    # (B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w), as _haar_forward into the interleaved layout (B, C, d, 2, h, 2, w, 2)
    # (the Haar matrix is its own inverse)
    t = y.float() if y.dtype == torch.float16 or y.dtype == torch.bfloat16 else y
    scale = 1.0 / (2.0 * math.sqrt(2.0))
    b, c8, d, h, w = t.shape
    c = c8 // 8
    out = (t.reshape(b, 2, 2, 2, c, d, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3) * scale).contiguous()
    out = _butterfly(_butterfly(_butterfly(out, 3), 5), 7)
    return out.reshape(b, c, 2 * d, 2 * h, 2 * w).to(y.dtype)


def haar_dwt3d(x: torch.Tensor) -> torch.Tensor:
    """One level of the 3D Haar DWT, ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``: :func:`wdm3d.wavelets.dwt3d`
    (with its checks, autograd rule and fused GPU kernel) in eager mode, its torch path when scripted."""
    if not torch.jit.is_scripting():
        return dwt3d(x)
    return _haar_forward(x)


def haar_idwt3d(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_dwt3d`, ``(B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w)``: :func:`wdm3d.wavelets.idwt3d` in
    eager mode, its torch path when scripted."""
    if not torch.jit.is_scripting():
        return idwt3d(y)
    return _haar_inverse(y)
