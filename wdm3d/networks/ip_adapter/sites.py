"""Where the IP-Adapter attaches to its base: the anchors (residual blocks of a ``WDMUNet``) that get an added image
cross-attention block, the network that owns each anchor, and the ``ModuleDict`` keys that name a module path of the
base."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..unet import WDMUNet, default_attention_levels

__all__ = ["anchor_owner", "resolve_added_sites"]


def _key(path: str) -> str:  # ModuleDict keys cannot hold "."
    return path.replace(".", ":")


def _path(key: str) -> str:
    return key.replace(":", ".")


def anchor_owner(base: nn.Module, path: str) -> tuple[WDMUNet, str]:
    """The :class:`~wdm3d.networks.WDMUNet` inside ``base`` that owns the anchor at ``path`` (a path in ``base``),
    and the anchor's path in that network: ``("unet.down.3")`` of a context-conditioned base -> ``(base.unet,
    "down.3")``.

    Args:
        base: the adapter's base network.
        path: an anchor path as ``base.attention_anchors()`` lists it.
    """
    for prefix, module in base.named_modules():
        if not isinstance(module, WDMUNet):
            continue
        rel = path if not prefix else (path[len(prefix) + 1 :] if path.startswith(prefix + ".") else None)
        if rel is not None and any(a.path == rel for a in module.attention_anchors()):
            return module, rel
    raise ValueError(f"{path!r} is not an anchor of a WDMUNet in the base ({type(base).__name__}).")


def resolve_added_sites(
    base: nn.Module,
    has_sites: bool,
    levels: Sequence[int] | None,
    middle: bool | None,
    sites: Sequence[str] | None,
) -> dict[str, int]:
    """Where an :class:`~wdm3d.networks.IPAdapter` adds image cross-attention blocks: anchor path -> channels.

    Added blocks sit at anchors (:meth:`WDMUNet.attention_anchors`), where the network runs an installed anchor
    processor; resolved before anything is installed, so that an error leaves the base untouched.

    Args:
        base: the base network (a ``WDMUNet``, or a module holding one and listing its ``attention_anchors()``).
        has_sites: whether the base has cross-attention (``Attention`` modules) of its own.
        levels, middle: ``added_levels`` / ``added_middle`` of the adapter.
        sites: ``added_sites`` of the adapter: anchor paths in the base.
    """
    anchors_of = getattr(base, "attention_anchors", None)
    if anchors_of is None:
        if sites is not None or levels is not None or middle or not has_sites:
            raise ValueError(
                f"image cross-attention blocks are added at the anchors of a WDMUNet (attention_anchors()), and "
                f"{type(base).__name__} has none; use a WDMUNet base (or one with cross-attention of its own)."
            )
        return {}
    every = {a.path: a for a in anchors_of()}
    if sites is not None:
        if levels is not None or middle:
            raise ValueError("give either added_sites or added_levels / added_middle, not both.")
        if isinstance(sites, str) or not isinstance(sites, Sequence):
            raise ValueError(f"added_sites must be a list of anchor paths, got {sites!r}.")
        bad = [p for p in sites if p not in every]
        if bad:
            raise ValueError(f"added_sites: {bad[0]!r} is not an anchor of the base; anchors: {sorted(every)}.")
        anchors = [every[p] for p in sites]
    else:
        if levels is None and middle is None:
            if has_sites:
                return {}
            n = len(base.channel_mult)
            levels = [lv for lv, on in enumerate(default_attention_levels(n)) if on]
            middle = True
        anchors = anchors_of(levels=list(levels or []), middle=bool(middle))
        if not anchors:
            raise ValueError("added_levels / added_middle select no residual blocks.")
    taken = [a for a in anchors if a.attention is not None]
    if taken:
        where = "the middle" if taken[0].level is None else f"level {taken[0].level}"
        raise ValueError(
            f"{where} already has cross-attention in the base ({taken[0].attention!r}); image attention reaches it "
            "through to_k_ip / to_v_ip. Leave it out of added_levels / added_middle / added_sites."
        )
    return {a.path: a.channels for a in anchors}
