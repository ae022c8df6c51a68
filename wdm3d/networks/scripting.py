"""What the networks need to compile with ``torch.jit.script`` (MONAI's ``ckpt_export`` scripts a bundle's network).

The networks keep one forward for eager use and for TorchScript. Where eager code uses what TorchScript cannot
compile (gradient checkpointing, autocast switches, the fused Triton Haar kernel, error messages that format shapes
with ``tuple``), the forward branches on ``torch.jit.is_scripting()``; TorchScript drops the eager branch at compile
time, so the eager path is unchanged. The scripted network therefore has no gradient checkpointing (it is an
inference export), runs the Haar transform by its torch path (out of place, so still differentiable) and
skips the eager-only input checks.

Helpers:

- :class:`TensorModule` / :class:`TensorBlock`: TorchScript module interfaces, so that a ``ModuleList`` can be indexed
  with a loop variable (TorchScript otherwise only iterates a ``ModuleList`` front to back, and the decoders run their
  levels coarse to fine over lists stored finest first).
- :func:`~wdm3d.wavelets.haar_dwt3d` / :func:`~wdm3d.wavelets.haar_idwt3d` (re-exported here): the Haar transform of
  :mod:`wdm3d.wavelets`, whose arithmetic (:mod:`wdm3d.wavelets.haar`) is written in a form TorchScript compiles, so
  eager and scripted networks run the same code and give the same bits.
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
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..wavelets import haar_dwt3d, haar_idwt3d

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
