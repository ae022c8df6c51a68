"""Input checks, bad-sample skipping and a resumable sampler for training data.

MONAI's ``LoadImaged`` reads whatever it is given: a 2D slice, a 4D multi-channel file, NaN voxels or data in the
wrong units all train silently into a broken model. :class:`CheckVolumed` stops each of these with an error that
names the file. :class:`SkipBadSamples` turns such an error during training into a skipped, logged sample (up to
a limit) instead of a crashed run. :class:`ResumableSampler` makes the data order a function of ``(seed, epoch)``
and can skip the samples an interrupted epoch already consumed (torch's ``DistributedSampler`` has the first but
not the second).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["BadSample", "BadInputError", "CheckVolumed", "GuardedTransform", "ResumableSampler", "SkipBadSamples"]

logger = logging.getLogger(__name__)


class BadInputError(ValueError):
    """An input volume that cannot be trained on; the message names the key and the file."""


def _first_bad_input(err: BaseException) -> BaseException:
    # the first BadInputError in an exception chain (MONAI wraps transform errors), else the innermost error
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, BadInputError):
            return cause
        if cause.__cause__ is None:
            return cause
        cause = cause.__cause__
    return err


def _source(data: Mapping, key: Hashable) -> str:
    # the file(s) a loaded MetaTensor came from, for error messages
    value = data.get(key)
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping) and meta.get("wdm3d_sources"):
        return str(meta["wdm3d_sources"])
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return str(value)


class CheckVolumed:
    """Check loaded volumes ``(C, D, H, W)``: dimensionality, channel count, finite values, intensity range.

    Raises ``ValueError`` naming the key and the file. Values outside ``intensity_range`` by up to
    ``range_tolerance`` times its width are accepted (the next transform clips them); values further out mean the
    data were not prepared for this range (e.g. CT in HU with a [0, 1] range) and are an error.

    Args:
        keys: datalist keys to check.
        num_channels: expected channels per key (a key listing several files stacks them as channels);
            None skips the check.
        intensity_range: ``[low, high]`` the prepared data span; None skips the range check.
        range_tolerance: how far outside the range (as a fraction of its width) still counts as in range.

    Example:
        >>> CheckVolumed("t1n", num_channels=1, intensity_range=(0, 1))({"t1n": torch.zeros(1, 8, 8, 8)})["t1n"].shape
        torch.Size([1, 8, 8, 8])
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        num_channels: int | None = 1,
        intensity_range: Sequence[float] | None = None,
        range_tolerance: float = 0.5,
    ) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        if num_channels is not None and int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1 or None, got {num_channels!r}.")
        if range_tolerance < 0:
            raise ValueError(f"range_tolerance must be >= 0, got {range_tolerance!r}.")
        self.num_channels = None if num_channels is None else int(num_channels)
        self.intensity_range = None if intensity_range is None else [float(v) for v in intensity_range]
        self.range_tolerance = float(range_tolerance)

    def __call__(self, data: Mapping) -> Mapping:
        for key in self.keys:
            vol = data[key]
            src = _source(data, key)
            if vol.ndim != 4:
                raise BadInputError(
                    f"{key}: {src} has {vol.ndim - 1} spatial dimension(s) (shape {tuple(vol.shape[1:])}); "
                    "wdm3d needs 3D volumes (D, H, W) with one file per modality."
                )
            if self.num_channels is not None and vol.shape[0] != self.num_channels:
                raise BadInputError(
                    f"{key}: {src} has {vol.shape[0]} channel(s) (modalities), expected num_channels="
                    f"{self.num_channels}. A 4D file holds several modalities: split it, or set num_channels."
                )
            if vol.numel() == 0:
                raise BadInputError(
                    f"{key}: {src} is empty (shape {tuple(vol.shape[1:])}); re-run data_prep or fix the file."
                )
            finite = torch.isfinite(vol)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise BadInputError(f"{key}: {src} has {bad} NaN/Inf voxel(s); re-run data_prep or fix the file.")
            if self.intensity_range is not None:
                lo, hi = self.intensity_range
                slack = self.range_tolerance * (hi - lo)
                vmin, vmax = float(vol.min()), float(vol.max())
                if vmin < lo - slack or vmax > hi + slack:
                    raise BadInputError(
                        f"{key}: {src} spans [{vmin:g}, {vmax:g}], far outside intensity_range [{lo:g}, {hi:g}] "
                        f"(more than {self.range_tolerance:g} x its width): the data are not prepared for this range. "
                        "Fix intensity_range (the datalist's or the config's) or re-run data_prep."
                    )
        return data


class BadSample:
    """What :class:`GuardedTransform` returns for an item that failed to load: the item and the error message."""

    def __init__(self, item: Any, error: str) -> None:
        self.item, self.error = item, error

    def __repr__(self) -> str:
        return f"BadSample({self.error})"


class GuardedTransform:
    """Run ``transform``; return a :class:`BadSample` instead of raising (for :class:`SkipBadSamples`).

    A plain callable (not a MONAI ``Randomizable``), so a ``CacheDataset`` caches the marker and the error is
    raised once per item, not once per epoch.
    """

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, data: Any) -> Any:
        try:
            return self.transform(data)
        except Exception as err:  # any load/check failure: the dataset wrapper decides what to do
            cause = _first_bad_input(err)  # MONAI wraps transform errors; ours (or the innermost) says what was wrong
            return BadSample(data, f"{type(cause).__name__}: {cause}")


class SkipBadSamples(Dataset):
    """Skip items that fail to load (and log them), up to ``max_bad_samples``; then stop with an error.

    A bad item (an exception, or a :class:`BadSample` from :class:`GuardedTransform`) is replaced by the next good
    item of the dataset. An item is counted once however often it comes round. The count is shared by the process
    and its DataLoader workers (a flag per item in shared memory), so :attr:`num_bad` read in the main process
    and the ``max_bad_samples`` limit cover what every worker found. ``bad_samples`` maps each bad index this
    process (or worker) met to its error; the workers log theirs.

    Args:
        dataset: the dataset to wrap (e.g. a ``CacheDataset`` whose transform is a :class:`GuardedTransform`).
        max_bad_samples: how many distinct bad items are tolerated; one more raises ``RuntimeError``.
            0 makes every bad item an error.
    """

    def __init__(self, dataset: Dataset, max_bad_samples: int = 10) -> None:
        if not isinstance(max_bad_samples, int) or max_bad_samples < 0:
            raise ValueError(f"max_bad_samples must be an integer >= 0, got {max_bad_samples!r}.")
        if len(dataset) == 0:
            raise ValueError("The training dataset is empty: check the datalist's 'training' split.")
        self.dataset, self.max_bad_samples = dataset, max_bad_samples
        self.bad_samples: dict[int, str] = {}
        # one flag per item, in shared memory: DataLoader workers (fork or spawn) set the same flags
        self._bad_flags = torch.zeros(len(dataset), dtype=torch.uint8).share_memory_()

    @property
    def num_bad(self) -> int:
        """Distinct bad items found so far, by this process and its DataLoader workers together."""
        return int(self._bad_flags.sum())

    def __len__(self) -> int:
        return len(self.dataset)

    def _get(self, index: int) -> tuple[Any, str | None]:
        try:
            item = self.dataset[index]
        except Exception as err:
            return None, f"{type(err).__name__}: {err}"
        if isinstance(item, BadSample):
            return None, item.error
        return item, None

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        for step in range(n):
            i = (int(index) + step) % n
            item, error = self._get(i)
            if error is None:
                return item
            if i not in self.bad_samples:
                self.bad_samples[i] = error
                self._bad_flags[i] = 1
                logger.warning(
                    "Skipping bad training sample %d (%d bad so far, limit %d): %s",
                    i,
                    self.num_bad,
                    self.max_bad_samples,
                    error,
                )
            if self.num_bad > self.max_bad_samples:
                raise RuntimeError(
                    f"{self.num_bad} bad training samples, more than max_bad_samples={self.max_bad_samples}; "
                    f"the last: sample {i}: {error}"
                )
        raise RuntimeError(f"Every one of the {n} training samples failed to load; the last: {error}")


class ResumableSampler(DistributedSampler):
    """A sampler whose order depends only on ``(seed, epoch)`` and that can resume in the middle of an epoch.

    torch's ``DistributedSampler`` (its permutation is seeded with ``seed + epoch``; MONAI's trainers call
    ``set_epoch`` at every epoch start), usable without a process group (one replica), plus :meth:`skip_next`:
    the next pass drops the first ``n`` indices of this rank, i.e. the batches an interrupted epoch already used.

    Args:
        dataset: the dataset to sample.
        shuffle: shuffle (per epoch) or keep the dataset order.
        seed: the shuffle seed; must be the same on every rank.
        num_replicas, rank: the process group's world size and rank (default: from ``torch.distributed`` if it is
            initialised, else 1 and 0).
        drop_last: drop the tail that does not divide evenly over the ranks (False: pad with repeats).
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if dist else 1
        if rank is None:
            rank = torch.distributed.get_rank() if dist else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def skip_next(self, n: int) -> None:
        """Drop the first ``n`` indices of the next pass only (resuming mid-epoch)."""
        if n < 0 or n > self.num_samples:
            raise ValueError(f"Cannot skip {n} samples of an epoch of {self.num_samples}.")
        self._skip = int(n)

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])
