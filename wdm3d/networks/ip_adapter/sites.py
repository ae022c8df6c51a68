"""Where the IP-Adapter attaches to its base: the residual blocks that get an added image cross-attention block,
and the ``ModuleDict`` keys that name a module path of the base."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..unet import default_attention_levels

__all__ = ["resolve_added_sites"]


def _key(path: str) -> str:  # ModuleDict keys cannot hold "."
    return path.replace(".", ":")


def _path(key: str) -> str:
    return key.replace(":", ".")


def resolve_added_sites(
    base: nn.Module,
    has_sites: bool,
    levels: Sequence[int] | None,
    middle: bool | None,
    sites: Sequence[str] | Mapping[str, int] | None,
) -> dict[str, int]:
    """Where an :class:`~wdm3d.networks.IPAdapter` adds image cross-attention blocks: module path -> channels.

    Resolved before anything is installed, so that an error leaves the base untouched.

    Args:
        base: the base network.
        has_sites: whether the base has cross-attention (``Attention`` modules) of its own.
        levels, middle: ``added_levels`` / ``added_middle`` of the adapter (a base with ``attention_anchors()``).
        sites: ``added_sites`` of the adapter: module paths, or a mapping path -> output channels.
    """
    if sites is not None:
        if levels is not None or middle:
            raise ValueError("give either added_sites or added_levels / added_middle, not both.")
        out: dict[str, int] = {}
        items = sites.items() if isinstance(sites, Mapping) else ((s, None) for s in sites)
        for path, channels in items:
            try:
                module = base.get_submodule(path)
            except AttributeError:
                raise ValueError(f"added_sites: the base has no module {path!r}.") from None
            channels = channels if channels is not None else getattr(module, "out_channels", None)
            if not isinstance(channels, int):
                raise ValueError(
                    f"added_sites: cannot tell the output channels of {path!r}; pass added_sites as a mapping "
                    "{path: channels}."
                )
            out[path] = channels
        return out
    anchors_of = getattr(base, "attention_anchors", None)
    if levels is None and middle is None:
        if has_sites:
            return {}
        if anchors_of is None:
            raise ValueError(
                "the base has no cross-attention (no Attention modules) and no attention_anchors(); "
                "pass added_sites (module paths after which image cross-attention blocks are added)."
            )
        n = len(base.channel_mult)
        levels = [lv for lv, on in enumerate(default_attention_levels(n)) if on]
        middle = True
    if anchors_of is None:
        raise ValueError(
            f"added_levels needs a base with attention_anchors() (a WDMUNet), got {type(base).__name__}; "
            "use added_sites."
        )
    anchors = anchors_of(levels=list(levels or []), middle=bool(middle))
    taken = [a for a in anchors if a.attention is not None]
    if taken:
        where = "the middle" if taken[0].level is None else f"level {taken[0].level}"
        raise ValueError(
            f"{where} already has cross-attention in the base ({taken[0].attention!r}); image attention reaches it "
            "through to_k_ip / to_v_ip. Leave it out of added_levels / added_middle."
        )
    if not anchors:
        raise ValueError("added_levels / added_middle select no residual blocks.")
    return {a.path: a.channels for a in anchors}
