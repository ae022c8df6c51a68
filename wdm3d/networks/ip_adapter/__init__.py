"""IP-Adapter for 3D volumes: image-prompt conditioning of a trained, frozen U-Net by decoupled cross-attention
(Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models",
arXiv 2308.06721).

A reference volume goes through a frozen image encoder (the project's trained WF-VAE encoder) to features, a
trainable projection turns them into image tokens ``(B, N, token_dim)`` (global, spatial, or both), and the U-Net
attends to them:

- at every cross-attention site of the base (``Attention`` modules, e.g. those of a ``WDMUNet`` built with a
  ``context_dim``), a processor is installed that computes ``Z = Attn(Q, K, V) + lambda * Attn(Q, K', V')``
  (paper eq. 5) with the base's query, ``K' = to_k_ip(tokens)``, ``V' = to_v_ip(tokens)`` (new bias-free
  projections initialised from the base's ``to_k`` / ``to_v``), and the base's output projection;
- at chosen residual blocks where the base has no cross-attention (e.g. a base without context), a new
  cross-attention block over the image tokens is installed as the ``WDMUNet``'s anchor processor there; its output
  projection is zero-initialised (and bias-free), so installation leaves the base's output unchanged.

The tokens and lambda travel with each call, as diffusers passes ``encoder_hidden_states`` and its kwargs: the
adapter calls ``base(x, t, context=..., image_prompt=ImagePrompt(tokens, lambdas))``, the base passes the prompt
down to the processors, and nothing is kept between calls (one prompt and one lambda per sample; gradient
checkpointing recomputes with the prompt it was given; threads do not share anything).

Nothing of the base's code or weights is edited: processors are installed on its modules, the base is frozen, and
:meth:`IPAdapter.remove` restores it. The adapter's weights are stored apart from the base's as
``{"image_proj": ..., "ip_adapter": ...}`` keyed by module path in the base, with the fingerprints of the base and
encoder it was trained with, so they load onto any base of the same architecture.

All-zero image tokens make every image branch contribute exactly zero (bias-free ``to_k_ip`` / ``to_v_ip`` and
added output projections give ``V' = 0``). A dropped image prompt (:class:`ConditionDropout`, classifier-free
guidance) is the adapter's null prompt: a learned one (default; zero-initialised, so it starts as the base) or all-zero
tokens (exactly the base).

The package, one module per concept: :mod:`~.encoder` (the frozen image encoder), :mod:`~.tokens` (features -> image
tokens: linear projection, Perceiver resampler, both), :mod:`~.processors` (the attention processor and the added
block's anchor processor), :mod:`~.sites` (where blocks are added), :mod:`~.adapter` (:class:`IPAdapter`),
:mod:`~.files` (the adapter's weights file and its checks) and :mod:`~.dropout` (condition dropout for
classifier-free guidance).
"""

from ..positions import sincos_position_3d
from .adapter import IPAdapter
from .dropout import ConditionDropout, DroppedConditions
from .encoder import FrozenImageEncoder
from .files import weights_fingerprint
from .processors import AddedBlockProcessor, IPAttnProcessor
from .tokens import PROJECTIONS, GlobalGridProjection, GlobalSpatialProjection, ImageProjection, PerceiverResampler

__all__ = [
    "IPAdapter",
    "IPAttnProcessor",
    "AddedBlockProcessor",
    "ImageProjection",
    "PerceiverResampler",
    "GlobalSpatialProjection",
    "GlobalGridProjection",
    "FrozenImageEncoder",
    "ConditionDropout",
    "DroppedConditions",
    "PROJECTIONS",
    "sincos_position_3d",
    "weights_fingerprint",
]
