"""What the conditional wavelet-diffusion trainings need: paired samples, a context-conditioned U-Net, a prepare-batch
with condition dropout, an inferer that passes the conditions, and the adapter's training glue.

Three conditional models share these pieces (``bundles/ip_adapter_brats``):

- the *base*: a :class:`~wdm3d.networks.WDMUNet` with cross-attention to context tokens of the target's modality and
  dataset (:class:`ContextConditionedUNet`), trained on every modality of every case, so one model covers all targets;
- the *IP-Adapter* (:class:`~wdm3d.networks.IPAdapter`) on the frozen base: the reference volume (T1n of the same
  patient) is an image prompt, the target modality the base context;
- the *concat* baseline (cWDM, arXiv 2411.17203): the reference's wavelet coefficients concatenated to the noisy
  input of a base trained from scratch with twice the input channels.

MONAI's ``SupervisedTrainer`` calls ``prepare_batch`` -> ``inferer(inputs, network, *args, **kwargs)`` -> ``loss``.
:class:`ConditionalPrepareBatch` returns ``(x0, target, (), kwargs)`` with ``noise``, ``timesteps`` and the
conditions (``context`` indices with dropped rows set to the null index, ``image`` + ``drop_image`` for the adapter,
``concat`` coefficients for the baseline); :class:`ConditionalDiffusionInferer` noises ``x0`` and calls the network
with them. MONAI's ``DiffusionInferer`` passes only ``condition`` / ``mode`` and cannot carry an image prompt.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from torch import nn

from ..networks.attention import ContextEmbedding
from ..networks.ip_adapter import ConditionDropout, IPAdapter
from ..networks.unet import AttentionAnchor, WDMUNet
from .wavelet_diffusion import WaveletDiffusion

__all__ = [
    "MODALITIES",
    "CONDITIONING_MODES",
    "expand_paired_datalist",
    "ContextConditionedUNet",
    "ConditionalPrepareBatch",
    "ConditionalDiffusionInferer",
    "AdapterState",
    "AdapterSaver",
    "load_frozen_base",
    "build_image_encoder",
    "IMAGE_ENCODERS",
]

logger = logging.getLogger(__name__)

#: BraTS 2023 modality keys, the default modality vocabulary.
MODALITIES = ("t1n", "t1c", "t2w", "t2f")
#: What :class:`ConditionalPrepareBatch` prepares: context only (the base), context + image prompt (IP-Adapter),
#: context + concatenated reference coefficients (cWDM baseline).
CONDITIONING_MODES = ("context", "ip_adapter", "concat")
#: Image encoders :func:`build_image_encoder` knows.
IMAGE_ENCODERS = ("wfvae", "random")


def _unwrap(module: Any) -> Any:
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return getattr(module, "_orig_mod", module)


# -- data ------------------------------------------------------------------------------------------------------------


def expand_paired_datalist(
    datalist: str | os.PathLike,
    split: str = "training",
    targets: Sequence[str] = MODALITIES,
    reference: str | None = None,
    self_pairs: bool = True,
    dataset: str | None = "brats",
    check_files: bool = True,
) -> list[dict[str, Any]]:
    """Expand a paired datalist (one entry per case, one key per modality) into one sample per target modality.

    One model serves every target: each sample names its target modality (the base context). Without a
    ``reference``, every listed modality a case has becomes a sample (the base is trained on all modalities); with
    one, a case contributes only if it has the reference, and each sample also carries the reference volume.

    Example: ``{"case": "c0", "t1n": "c0/t1n.nii.gz", "t2w": "c0/t2w.nii.gz"}`` with ``reference="t1n"`` gives
    ``{"case": "c0", "target": ".../c0/t2w.nii.gz", "modality": "t2w", "reference": ".../c0/t1n.nii.gz",
    "reference_modality": "t1n", "dataset": "brats"}`` and (with ``self_pairs``) the same for ``t1n`` itself.

    Args:
        datalist: the datalist JSON (paths relative to its folder, as ``data_prep`` writes them).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        targets: the modalities to generate (entries lacking one are skipped for it).
        reference: the reference modality (e.g. ``"t1n"``), or None (no reference: base training).
        self_pairs: with a reference, also pair it with itself (reference -> same modality). The adapter then
            also learns to reproduce the appearance of its prompt (IP-Adapter's own training task), which
            reference-guided generation uses.
        dataset: the dataset condition written into every sample (None: leave it out, i.e. the null token).
        check_files: fail now, naming the file, if a listed volume does not exist.

    Returns:
        A list of sample dicts with absolute paths under ``target`` (and ``reference``).
    """
    from ..data import read_datalist

    path = Path(datalist)
    data = read_datalist(path)
    if isinstance(targets, str):
        targets = [targets]
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise ValueError("targets must name at least one modality.")
    if split not in data or not isinstance(data[split], list):
        lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        raise KeyError(f"Datalist {path} has no split {split!r}; it has {lists}.")
    base = path.parent

    def resolve(i: int, entry: Mapping, key: str) -> str:
        value = entry[key]
        if not isinstance(value, str):
            raise ValueError(f"Datalist {path}: entry {i} of {split!r} has {key}={value!r}; expected one file path.")
        p = value if os.path.isabs(value) else str(base / value)
        if check_files and not os.path.isfile(p):
            raise FileNotFoundError(f"Datalist {path}: entry {i} of {split!r} lists {key}={p}, which does not exist.")
        return p

    samples: list[dict[str, Any]] = []
    skipped = 0
    for i, entry in enumerate(data[split]):
        if not isinstance(entry, dict):
            raise ValueError(f"Datalist {path}: entry {i} of {split!r} must be an object, got {entry!r}.")
        case = str(entry.get("case", i))
        if reference is not None and reference not in entry:
            skipped += 1
            continue
        ref_path = resolve(i, entry, reference) if reference is not None else None
        for modality in targets:
            if modality not in entry or (modality == reference and not self_pairs):
                continue
            sample: dict[str, Any] = {"case": case, "target": resolve(i, entry, modality), "modality": modality}
            if dataset is not None:
                sample["dataset"] = dataset
            if ref_path is not None:
                sample.update(reference=ref_path, reference_modality=reference)
            samples.append(sample)
    if skipped:
        logger.warning("Datalist %s (%s): %d case(s) without the reference %r skipped.", path, split, skipped, reference)
    if not samples and reference is not None and not self_pairs and set(targets) == {reference}:
        raise ValueError(
            f"Datalist {path}: the only target modality is the reference {reference!r} and self_pairs is off, so "
            "there is no pair to train on. Add target modalities, or turn self_pairs on."
        )
    if not samples:
        found = sorted({k for e in data[split] if isinstance(e, dict) for k in e})
        need = f" with the reference {reference!r}" if reference is not None else ""
        raise ValueError(
            f"Datalist {path}: split {split!r} has no case{need} and a target modality in {targets}; its entries have "
            f"the keys {found}. Set targets / reference_modality to modalities the data has."
        )
    return samples


# -- the context-conditioned base ------------------------------------------------------------------------------------


class ContextConditionedUNet(nn.Module):
    """A cross-attention :class:`~wdm3d.networks.WDMUNet` with its context tokens: learned embeddings of named
    conditions (modality, dataset; :class:`~wdm3d.networks.ContextEmbedding`), trained together.

    ``(B, C, D, H, W), (B,) -> (B, C', D, H, W)``, called like the U-Net: ``model(x, timesteps, context=...)``, where
    ``context`` is

    - integer indices ``(B, num_fields)`` (or ``(num_fields,)``), one per field in the vocabularies' order, the null
      index ``len(vocabulary)`` for a dropped condition (what :class:`ConditionalPrepareBatch` produces);
    - float tokens ``(B or 1, N, context_dim)`` used as they are (e.g. from :meth:`tokens`, or the null tokens that
      :class:`~wdm3d.diffusion.ClassifierFreeGuidance` swaps in);
    - None: the null tokens (unconditional), so MONAI-style samplers that pass no context still work.

    EMA copies, checkpoints and the IP-Adapter see one module (``unet.*`` and ``embedding.*`` weights).

    Args:
        unet: the U-Net, built with a ``context_dim`` (its width is the embedding width).
        vocabularies: field -> value names, e.g. ``{"modality": ["t1n", "t1c", "t2w", "t2f"], "dataset": ["brats"]}``.

    Example:
        >>> unet = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16)
        >>> net = ContextConditionedUNet(unet, {"modality": ["t1n", "t2w"], "dataset": ["brats"]})
        >>> ctx = net.indices({"modality": ["t2w", "t1n"], "dataset": "brats"})
        >>> ctx
        tensor([[1, 0],
                [0, 0]])
        >>> net(torch.randn(2, 8, 8, 8, 8), torch.tensor([3, 700]), context=ctx).shape
        torch.Size([2, 8, 8, 8, 8])
    """

    # read from Python; a TorchScript export needs none of them
    __jit_unused_properties__ = (
        "context_dim", "in_channels", "out_channels", "channel_mult", "use_checkpoint", "fields",
    )

    def __init__(self, unet: nn.Module, vocabularies: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        context_dim = getattr(unet, "context_dim", None)
        if not isinstance(unet, nn.Module) or not isinstance(context_dim, int):
            raise ValueError(
                f"unet must be a WDMUNet built with a context_dim (cross-attention), got {type(unet).__name__} with "
                f"context_dim={context_dim!r}; set network_def#unet#context_dim."
            )
        self.unet = unet
        self.embedding = ContextEmbedding(vocabularies, context_dim)
        self.vocabularies = {k: list(v) for k, v in self.embedding.vocabularies.items()}

    # what the rest of wdm3d reads from a U-Net
    @property
    def context_dim(self) -> int:
        return self.unet.context_dim

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.out_channels

    @property
    def channel_mult(self) -> tuple[int, ...]:
        return self.unet.channel_mult

    @property
    def use_checkpoint(self) -> bool:
        return bool(getattr(self.unet, "use_checkpoint", False))

    @property
    def fields(self) -> tuple[str, ...]:
        return self.embedding.fields

    def attention_anchors(self, levels: Sequence[int] | None = None, middle: bool = True) -> list[AttentionAnchor]:
        """The U-Net's anchors (:meth:`WDMUNet.attention_anchors`) with paths in this module (``unet.`` prefix)."""
        return [
            a._replace(path=f"unet.{a.path}", attention=None if a.attention is None else f"unet.{a.attention}")
            for a in self.unet.attention_anchors(levels, middle)
        ]

    def indices(self, conditions: Mapping[str, Any] | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Condition labels -> indices ``(B, num_fields)`` (missing fields and None labels: the null index).

        Args:
            conditions: field -> a name, an index, None, or one per sample (see
                :meth:`ContextEmbedding.indices`).
            batch_size: broadcast single labels to this many samples.
        """
        conditions = dict(conditions or {})
        unknown = [f for f in conditions if f not in self.embedding.vocabularies]
        if unknown:
            raise ValueError(f"unknown condition field {unknown[0]!r}; this model has fields {list(self.fields)}.")
        if batch_size is None:
            sizes = {len(v) for v in conditions.values() if isinstance(v, (list, tuple))} | {
                v.numel() for v in conditions.values() if isinstance(v, torch.Tensor) and v.ndim == 1
            }
            sizes.discard(1)
            if len(sizes) > 1:
                raise ValueError(f"condition fields have different batch sizes {sorted(sizes)}.")
            batch_size = sizes.pop() if sizes else 1
        cols = [self.embedding.indices(f, conditions.get(f), batch_size) for f in self.fields]
        return torch.stack(cols, dim=1)

    def tokens(self, conditions: Mapping[str, Any] | torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Context tokens ``(B, num_fields, context_dim)`` from labels (a mapping) or indices ``(B, num_fields)``."""
        if conditions is None or isinstance(conditions, Mapping):
            idx = self.indices(conditions, batch_size)
        else:
            idx = conditions
        return self._embed(idx)

    def null_context(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional tokens ``(batch_size, num_fields, context_dim)``."""
        return self.embedding.null(batch_size)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.ndim == 1:
            idx = idx[None]
        if idx.ndim != 2 or idx.shape[1] != len(self.fields):
            raise ValueError(
                f"context indices must be (B, {len(self.fields)}) (one per field {list(self.fields)}), "
                f"got {tuple(idx.shape)}."
            )
        tables = self.embedding.embeddings
        idx = idx.to(next(iter(tables.values())).weight.device)
        for j, field in enumerate(self.fields):
            n = tables[field].num_embeddings  # the last row is the null embedding
            col = idx[:, j]
            if col.numel() and (col.min() < 0 or col.max() >= n):
                raise ValueError(f"{field} indices must be in [0, {n}) ({n - 1} = null), got {col.tolist()}.")
        return self.embedding.embed_indices(idx)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, D, H, W)``.
            timesteps: ``(B,)`` or a scalar.
            context: indices ``(B, num_fields)``, tokens ``(B or 1, N, context_dim)`` or None (null tokens).
        """
        # (TorchScript, e.g. MONAI's ckpt_export, compiles the scripting branches: see wdm3d.networks.scripting)
        if context is None:
            tokens = self.embedding.null_tokens(x.shape[0])
        elif not torch.jit.is_scripting() and not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a tensor of indices or tokens, or None; got {type(context).__name__}.")
        elif context.is_floating_point():
            tokens = context
        elif torch.jit.is_scripting():  # unchecked indices (_embed's checks format Python objects)
            tokens = self.embedding.embed_indices(context[None] if context.ndim == 1 else context)
        else:
            tokens = self._embed(context)
        return self.unet(x, timesteps, context=tokens.to(x.device))

    def config(self) -> dict[str, Any]:
        """The settings that rebuild this module: ``{"vocabularies": ..., "unet": <WDMUNet arguments>}``."""
        from ..artifacts import network_arguments

        return {"vocabularies": self.vocabularies, "unet": network_arguments(self.unet)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ContextConditionedUNet:
        """Rebuild from :meth:`config` (weights not loaded)."""
        unet_args = {k: v for k, v in dict(config["unet"]).items() if k != "class"}
        return cls(WDMUNet(**unet_args), config["vocabularies"])


# -- training --------------------------------------------------------------------------------------------------------


def _as_labels(value: Any, name: str) -> list:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"batch field {name!r} must be a list of labels (one per sample), got {type(value).__name__}.")


class ConditionalPrepareBatch(PrepareBatch):
    """Paired / conditional batch -> a wavelet diffusion training example, with condition dropout for CFG.

    Returns ``(x0, target, (), kwargs)``: ``x0`` the wavelet coefficients of the target volumes
    ``(B, 8C, D/2, H/2, W/2)``, ``target`` the diffusion target, and ``kwargs`` for
    :class:`ConditionalDiffusionInferer`:

    - ``noise``, ``timesteps``;
    - ``context``: condition indices ``(B, num_fields)`` in the vocabularies' field order; a sample whose context is
      dropped gets the null index in every field;
    - mode ``"ip_adapter"``: ``image``, the reference volumes ``(B, C, D, H, W)``, and ``drop_image`` ``(B,)`` bool
      (the inferer zeroes those samples' image tokens, which is exactly "no image prompt");
    - mode ``"concat"``: ``concat``, the reference's wavelet coefficients ``(B, 8C, D/2, H/2, W/2)``.

    Dropout (IP-Adapter: 5% image only, 5% context only, 5% both) draws per sample with
    :meth:`ConditionDropout.masks`; in mode ``"context"`` / ``"concat"`` only the context mask is used (the context
    is then dropped with probability ``context_rate + both_rate``). The masks of the last call are kept in
    ``last_drop_image`` / ``last_drop_context``.

    Args:
        diffusion: the :class:`WaveletDiffusion` (wavelet space, timesteps, target).
        vocabularies: field -> value names, the same as the network's (e.g. ``@vocabularies`` in a bundle).
        mode: one of :data:`CONDITIONING_MODES`.
        target_key: batch key of the volumes to generate.
        reference_key: batch key of the reference volumes (modes ``"ip_adapter"`` and ``"concat"``).
        condition_keys: field -> batch key of its labels (default: each field's own name, e.g. ``"modality"``);
            a field without a key gets the null index.
        dropout: a :class:`ConditionDropout`, or None (no dropout).
    """

    def __init__(
        self,
        diffusion: WaveletDiffusion,
        vocabularies: Mapping[str, Sequence[str]],
        mode: str = "context",
        target_key: str = "target",
        reference_key: str = "reference",
        condition_keys: Mapping[str, str] | None = None,
        dropout: ConditionDropout | None = None,
    ) -> None:
        if not isinstance(diffusion, WaveletDiffusion):
            raise TypeError(f"diffusion must be a WaveletDiffusion, got {type(diffusion).__name__}.")
        if mode not in CONDITIONING_MODES:
            raise ValueError(f"mode must be one of {CONDITIONING_MODES}, got {mode!r}.")
        if dropout is not None and not isinstance(dropout, ConditionDropout):
            raise TypeError(f"dropout must be a ConditionDropout or None, got {type(dropout).__name__}.")
        self._embedding = ContextEmbedding(vocabularies, 1)  # only for its label checks; no weights used
        self.vocabularies = self._embedding.vocabularies
        keys = dict(condition_keys) if condition_keys is not None else {f: f for f in self.vocabularies}
        unknown = [f for f in keys if f not in self.vocabularies]
        if unknown:
            raise ValueError(f"condition_keys names {unknown[0]!r}, not a field of {list(self.vocabularies)}.")
        self.diffusion, self.mode = diffusion, mode
        self.target_key, self.reference_key = target_key, reference_key
        self.condition_keys = keys
        self.dropout = dropout
        self.last_drop_image: torch.Tensor | None = None
        self.last_drop_context: torch.Tensor | None = None

    def _volumes(self, batch: Mapping, key: str, device, non_blocking: bool) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"batch has no key {key!r} (keys: {sorted(batch)}); check the datalist expansion / keys.")
        v = torch.as_tensor(batch[key]).to(device=device, non_blocking=non_blocking)
        if v.ndim != 5:
            raise ValueError(f"batch[{key!r}] must be volumes (B, C, D, H, W), got {tuple(v.shape)}.")
        return v if v.is_floating_point() else v.float()

    def context_indices(self, batch: Mapping, batch_size: int, device=None) -> torch.Tensor:
        """The batch's condition labels as indices ``(B, num_fields)``."""
        cols = []
        for field in self.vocabularies:
            key = self.condition_keys.get(field)
            labels = _as_labels(batch[key], key) if key is not None and key in batch else None
            if labels is not None and len(labels) != batch_size:
                raise ValueError(f"batch field {key!r} has {len(labels)} labels for {batch_size} volumes.")
            cols.append(self._embedding.indices(field, labels, batch_size).cpu())
        return torch.stack(cols, dim=1).to(device)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, Any]]:
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"ConditionalPrepareBatch needs dict batches, got {type(batchdata).__name__}.")
        images = self._volumes(batchdata, self.target_key, device, non_blocking)
        b = images.shape[0]
        x0 = self.diffusion.encode(images)
        noise = torch.randn_like(x0)
        timesteps = self.diffusion.sample_timesteps(b, device=x0.device)
        target = self.diffusion.target(x0, noise, timesteps)

        context = self.context_indices(batchdata, b, x0.device)
        drop_image = torch.zeros(b, dtype=torch.bool, device=x0.device)
        drop_context = torch.zeros(b, dtype=torch.bool, device=x0.device)
        if self.dropout is not None:
            drop_image, drop_context = self.dropout.masks(b, device=x0.device)
            if self.mode != "ip_adapter":  # no image prompt: only the context can be dropped
                drop_image = torch.zeros_like(drop_image)
        nulls = torch.tensor([len(v) for v in self.vocabularies.values()], device=x0.device)
        context = torch.where(drop_context[:, None], nulls.expand_as(context), context)
        self.last_drop_image, self.last_drop_context = drop_image, drop_context

        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps, "context": context}
        if self.mode == "ip_adapter":
            infer_kwargs.update(image=self._volumes(batchdata, self.reference_key, device, non_blocking),
                                drop_image=drop_image)
        elif self.mode == "concat":
            ref = self._volumes(batchdata, self.reference_key, device, non_blocking)
            if ref.shape[2:] != images.shape[2:]:
                raise ValueError(
                    f"reference {tuple(ref.shape)} and target {tuple(images.shape)} volumes must have the same size."
                )
            infer_kwargs["concat"] = self.diffusion.encode(ref)
        return x0, target, (), infer_kwargs


class ConditionalDiffusionInferer(Inferer):
    """Training forward for conditional wavelet diffusion: noise ``x0`` and call the network with its conditions.

    ``inferer(x0, network, noise=, timesteps=, context=None, image=None, drop_image=None, concat=None)``:
    ``x_t = diffusion.add_noise(x0, noise, timesteps)``; with ``concat`` the network input is
    ``cat(x_t, concat)`` on channels; with an ``image`` (IP-Adapter) the network's ``encode_image`` makes the image
    tokens, the rows in ``drop_image`` are zeroed (no image prompt), and the network is called as
    ``network(x, timesteps, context=context, image_tokens=tokens)``, else ``network(x, timesteps, context=context)``.

    Args:
        diffusion: the process (its ``add_noise`` is MONAI's scheduler's, in float64 coefficients).
    """

    def __init__(self, diffusion: WaveletDiffusion) -> None:
        super().__init__()
        if not isinstance(diffusion, WaveletDiffusion):
            raise TypeError(f"diffusion must be a WaveletDiffusion, got {type(diffusion).__name__}.")
        self.diffusion = diffusion

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.diffusion.add_noise(inputs, noise, timesteps).to(inputs.dtype)
        if concat is not None:
            if concat.shape[0] != x.shape[0] or concat.shape[2:] != x.shape[2:]:
                raise ValueError(f"concat {tuple(concat.shape)} must match the noisy input {tuple(x.shape)} "
                                 "in batch and spatial size.")
            x = torch.cat((x, concat.to(x.dtype)), dim=1)
        if image is None:
            return network(x, timesteps, context=context)
        model = _unwrap(network)
        encode = getattr(model, "encode_image", None)
        if encode is None:
            raise ValueError(f"an image prompt needs an IPAdapter network (with encode_image), got {type(model).__name__}.")
        tokens = encode(image)
        if drop_image is not None:
            if drop_image.shape != (tokens.shape[0],):
                raise ValueError(f"drop_image must be ({tokens.shape[0]},), got {tuple(drop_image.shape)}.")
            tokens = torch.where(drop_image.to(tokens.device)[:, None, None], torch.zeros_like(tokens), tokens)
        return network(x, timesteps, context=context, image_tokens=tokens)


# -- the adapter on a frozen base ------------------------------------------------------------------------------------


def _checkpoint_file(checkpoint: str | os.PathLike, what: str, hint: str) -> Path:
    from ..artifacts import latest_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"No {what} checkpoint (*.pt) in {path}; {hint}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"The {what} checkpoint {path} does not exist; {hint}")
    return path


def load_frozen_base(
    network: nn.Module, checkpoint: str | os.PathLike, use_ema: bool = True, device: str | torch.device | None = None,
    diffusion: Any = None,
) -> nn.Module:
    """Load a trained base into ``network`` (EMA weights first), freeze it (``requires_grad=False``), eval mode.

    Args:
        network: the base, built like it was trained (the bundle's ``network_def``).
        checkpoint: a checkpoint file, or a folder (its newest ``*.pt``), e.g. ``output/models/base``.
        use_ema: prefer the ``"ema"`` weights over ``"model"``.
        device: move it there.
        diffusion: the process that will sample or train on it; refused when the base was trained with another
            (:func:`~wdm3d.engine.checkpoint.check_diffusion_matches`).

    Raises:
        FileNotFoundError: no such checkpoint (the message says to train the base first).
        RuntimeError: the checkpoint does not fit ``network`` (names the first mismatching weight).
        ValueError: ``diffusion`` differs from the one the base was trained with.
    """
    from ..artifacts import check_diffusion_matches, load_checkpoint, load_network_weights

    path = _checkpoint_file(
        checkpoint, "base model",
        "train the context-conditioned base first (train_base.json writes output/models/base) or set base_checkpoint.",
    )
    keys = ("ema", "model", "network") if use_ema else ("model", "network", "ema")
    ckpt = load_checkpoint(path)
    if diffusion is not None:
        check_diffusion_matches(ckpt, diffusion, path)
    used = load_network_weights(network, path, keys, checkpoint=ckpt)
    if device is not None:
        network.to(device)
    network.eval().requires_grad_(False)
    network.base_checkpoint = {"path": str(path.resolve()), "weights": used}  # for logs and manifests
    logger.info("Base model loaded from %s (%s weights) and frozen.", path, used)
    return network


def build_image_encoder(
    kind: str = "wfvae",
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    in_channels: int = 1,
    use_ema: bool = True,
) -> nn.Module:
    """The frozen image encoder of the IP-Adapter.

    Args:
        kind: ``"wfvae"``: the project's trained WF-VAE (rebuilt from ``checkpoint`` with
            :func:`wdm3d.autoencoder.build_network`; the adapter reads its posterior mean, ``(B, Z, D/f, H/f, W/f)``);
            ``"random"``: a fixed, seeded random conv net (:class:`~wdm3d.networks.RandomConv3dFeatures`,
            ``(B, 480)`` global statistics) for tests and demos without a trained VAE.
        checkpoint: the WF-VAE checkpoint file or folder (e.g. ``bundles/wfvae/output/models``).
        seed: the random encoder's seed.
        in_channels: the reference volume's channels (random encoder).
        use_ema: prefer the VAE checkpoint's EMA weights.
    """
    if kind == "random":
        from ..networks.medicalnet import RandomConv3dFeatures

        return RandomConv3dFeatures(seed=seed, in_channels=in_channels)
    if kind != "wfvae":
        raise ValueError(f"image_encoder_type must be one of {IMAGE_ENCODERS}, got {kind!r}.")
    from ..autoencoder import build_network, load_autoencoder

    hint = ("train it with bundles/wfvae (train.json writes bundles/wfvae/output/models), set "
            "image_encoder_checkpoint, or use image_encoder_type 'random' (an untrained encoder, demos only).")
    if checkpoint is None:
        raise FileNotFoundError(f"The IP-Adapter's image encoder is the trained WF-VAE, but no checkpoint was given; {hint}")
    path = _checkpoint_file(checkpoint, "WF-VAE image encoder", hint)
    vae, info = load_autoencoder(build_network(path), path, use_ema)
    vae.encoder_info = info
    return vae


class AdapterState:
    """The adapter's trainable weights as a checkpointable object (``state_dict`` / ``load_state_dict``), so that
    resumable checkpoints hold ``{"image_proj", "ip_adapter"}`` rather than the frozen base and encoder again.

    Args:
        adapter: the :class:`~wdm3d.networks.IPAdapter` (or a DDP / compiled wrapper of it).
    """

    def __init__(self, adapter: nn.Module) -> None:
        if not isinstance(_unwrap(adapter), IPAdapter):
            raise TypeError(f"AdapterState needs an IPAdapter, got {type(_unwrap(adapter)).__name__}.")
        self.adapter = adapter

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return _unwrap(self.adapter).adapter_state_dict()

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        _unwrap(self.adapter).load_adapter_state_dict(state, source="the checkpoint's 'adapter'")


class AdapterSaver:
    """Write the adapter's weights on their own (``{"image_proj", "ip_adapter"}``, atomically) every
    ``save_interval`` epochs and when training completes (an ignite handler).

    Keep ``path`` outside the folder of the resumable checkpoints (their resume picks the newest ``*.pt`` there).

    Args:
        adapter: the :class:`~wdm3d.networks.IPAdapter` being trained.
        path: the file, e.g. ``output/adapter/ip_adapter.pt``.
        save_interval: epochs between saves (0: only at the end).
        enabled: False turns it off (ranks > 0).
    """

    def __init__(self, adapter: nn.Module, path: str | os.PathLike, save_interval: int = 1, enabled: bool = True) -> None:
        if not isinstance(_unwrap(adapter), IPAdapter):
            raise TypeError(f"AdapterSaver needs an IPAdapter, got {type(_unwrap(adapter)).__name__}.")
        if not isinstance(save_interval, int) or save_interval < 0:
            raise ValueError(f"save_interval must be an integer >= 0 (epochs), got {save_interval!r}.")
        self.adapter, self.path = adapter, Path(path)
        self.save_interval, self.enabled = save_interval, enabled

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if not self.enabled:
            return
        if self.save_interval:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> Path:
        path = _unwrap(self.adapter).save_adapter(self.path)
        if engine is not None:
            engine.logger.info("IP-Adapter weights (image_proj, ip_adapter) written to %s", path)
        return path
