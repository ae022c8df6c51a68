"""Training checkpoints: save every N epochs/iterations and on SIGTERM, and resume from the newest one exactly.

:class:`TrainingCheckpoints` writes ``checkpoint_epoch=N.pt`` every N epochs, ``checkpoint_iteration=N.pt`` every N
iterations, ``checkpoint_interrupted_iteration=N.pt`` on SIGTERM and ``checkpoint_final_iteration=N.pt`` at the end
(atomically: temp file + rename), logs each save in ``checkpoints.json`` and resumes from the newest one. What
MONAI's ``CheckpointSaver``/``Loader`` lack: atomic writes, "resume from the newest file in this folder, if there is
one", mid-epoch resume (data position and RNG states), a signal-triggered save, and errors that name the mismatching
weight.

One module per concept: the RNG states (:mod:`.rng`), what a run was trained with (:mod:`.run_config`), restoring
(:mod:`.resume`), the one-writer folder lock (:mod:`.folder_lock`) and saving (:mod:`.saving`). The files
themselves (newest, load, atomic save, save log) are :mod:`wdm3d.artifacts`'s.
"""

from .resume import ResumeFromLatest
from .rng import RNGState
from .run_config import RunConfig
from .saving import TrainingCheckpoints

__all__ = ["RNGState", "RunConfig", "ResumeFromLatest", "TrainingCheckpoints"]
