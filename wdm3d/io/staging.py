"""The output folder of a sampling run, replaced only when the run is complete: a reader never sees half a run.

What a run writes is recognised by name (:data:`SAMPLE_FILE`, :data:`MANIFEST`); everything else in the folder is
the user's and is carried over to the new folder.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from .nifti import new_file_mode

__all__ = ["MANIFEST", "SAMPLE_FILE", "StagedOutput", "is_run_file"]

#: the files of one sample: its NIfTI volume, its PNG preview, its DICOM series folder
SAMPLE_FILE = re.compile(r"^sample_(\d{4,})(?:\.nii\.gz|\.png|_dicom)$")
MANIFEST = "manifest.json"


def is_run_file(name: str) -> bool:
    """A file a run writes (its samples and manifest), as opposed to the user's own files in the output folder."""
    return name == MANIFEST or SAMPLE_FILE.match(name) is not None


class StagedOutput:
    """A fresh folder that a run writes into, swapped in for ``output_dir`` once it is complete.

    Normally a hidden sibling, ``.<name>.partial-XXXX`` (same filesystem, so the swap is two renames): until the swap
    ``output_dir`` holds the previous run's complete output, untouched; a run that fails removes its folder, one that
    is killed leaves it beside ``output_dir`` (named in a warning by the next run). At the swap the previous folder is
    renamed aside, the new one renamed in, and the user's own files of the previous folder (anything that is not a
    ``sample_NNNN`` file or the manifest, e.g. notes or an ``evaluation/`` folder) are moved into the new one; if the
    process dies between the two renames both complete folders survive under their hidden names.

    When ``output_dir`` is a mount point (which cannot be renamed) or its parent is not writable, the run is staged in
    a hidden folder inside ``output_dir`` instead, and published by removing the previous manifest and samples and
    moving the new ones in, the manifest last: an interruption in that short step leaves samples without a manifest,
    which ``wdm3d evaluate`` refuses, never a manifest that describes other files.
    """

    def __init__(self, output_dir: Path) -> None:
        self.target = output_dir.resolve()  # a symlinked output folder: swap the folder it points to, not the link
        if self.target.exists() and not self.target.is_dir():
            raise NotADirectoryError(
                f"output_dir {output_dir} is a file, not a folder; choose a folder for the samples."
            )
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.inside = False
        if self.target.is_dir() and os.path.ismount(self.target):
            self.inside = True
        else:
            try:
                self.dir = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
            except OSError as err:  # a parent this user may not write in (a shared project folder, a read-only mount)
                if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                self.inside = True
        if self.inside:
            self.target.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".wdm3d-partial-", dir=self.target))
        # mkdtemp makes 0700: give the folder the mode of the one it replaces, else what mkdir gives under the umask
        mode = (self.target.stat().st_mode & 0o7777) if self.target.is_dir() else new_file_mode(directory=True)
        os.chmod(self.dir, mode)

    def leftovers(self) -> list[Path]:
        """Staging or set-aside folders of earlier runs that were killed before they finished."""
        if self.inside:
            return sorted(p for p in self.target.glob(".wdm3d-partial-*") if p != self.dir)
        pattern = [f".{self.target.name}.partial-*", f".{self.target.name}.old-*"]
        return sorted(p for g in pattern for p in self.target.parent.glob(g) if p != self.dir)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def publish(self) -> None:
        """Swap the complete staging folder in for the output folder (see the class docstring)."""
        if self.inside:
            self._publish_inside()
            return
        if not self.target.exists():
            os.rename(self.dir, self.target)
            return
        old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(self.target, old)
        try:
            os.rename(self.dir, self.target)
        except OSError:
            os.rename(old, self.target)  # the previous output back in place; the new one stays in self.dir
            raise
        for p in old.iterdir():
            if not is_run_file(p.name):
                os.rename(p, self.target / p.name)
        shutil.rmtree(old)

    def _publish_inside(self) -> None:
        (self.target / MANIFEST).unlink(missing_ok=True)
        for p in self.target.iterdir():
            if not SAMPLE_FILE.match(p.name):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        for p in sorted(self.dir.iterdir(), key=lambda p: p.name == MANIFEST):
            os.rename(p, self.target / p.name)
        self.dir.rmdir()
