"""Property-based fuzzing of the readers that take a user's NIfTI files (issue 23).

Hypothesis writes NIfTI files with arbitrary headers (affines: random, singular, NaN / Inf; dimensions: 1D to 5D,
zero-sized axes; dtypes from uint8 to float64; NaN / Inf voxels) and hands each to every reader of user volumes:
``wdm3d evaluate``'s :func:`~wdm3d.evaluate.load_volumes`, the training chain (:func:`wdm3d.data.volume_transforms`,
with and without skipping bad samples) and :func:`wdm3d.io.nifti.nifti_geometry` (inference's reference image).
Each input must end in a loaded volume or in an error that names the file: never a crash without the file's name,
never a hang (hypothesis' per-example deadline and pytest-timeout bound the time).
"""

import warnings

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wdm3d.data import BadSample, volume_transforms
from wdm3d.evaluate import load_volumes
from wdm3d.io.nifti import nifti_geometry

DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64]
SPECIAL = [0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e30, 1e-30]


@st.composite
def nifti_inputs(draw):
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from(["random", "constant", "special"]))
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if fill == "random":
        data = rng.normal(0.5, 0.5, size=shape)
    elif fill == "constant":
        data = np.full(shape, draw(st.floats(-2, 2)))
    else:
        data = rng.choice(SPECIAL, size=shape) if n else np.zeros(shape)
    if np.issubdtype(dtype, np.integer):
        data = np.nan_to_num(data, nan=0, posinf=0, neginf=0).clip(np.iinfo(dtype).min, np.iinfo(dtype).max)
    data = data.astype(dtype)
    kind = draw(st.sampled_from(["identity", "random", "singular", "nan", "inf"]))
    affine = np.eye(4)
    if kind == "random":
        affine[:3] = rng.normal(0, 3, size=(3, 4))
    elif kind == "singular":
        affine[0, :3] = 0
    elif kind in ("nan", "inf"):
        affine[rng.integers(0, 3), rng.integers(0, 4)] = np.nan if kind == "nan" else np.inf
    return data, affine, draw(st.booleans())


def _write(tmp_path_factory, data, affine, gz):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / ("case.nii.gz" if gz else "case.nii")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nib.save(nib.Nifti1Image(data, affine), path)
    except Exception:  # noqa: BLE001 - a header nibabel itself refuses to write is not a reader's input
        assume(False)
    return path


def _names_the_file(err: BaseException, path) -> bool:
    while err is not None:
        if str(path) in str(err) or path.name in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _attempt(read):
    """``(result, None)`` or ``(None, error)``: every reader's outcome, for the property to judge."""
    try:
        return read(), None
    except Exception as err:  # noqa: BLE001 - the property: any error must name the file
        return None, err


FUZZ = settings(
    max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@FUZZ
@given(nifti_inputs())
def test_evaluate_reader_loads_or_names_the_file(tmp_path_factory, case):
    data, affine, gz = case
    path = _write(tmp_path_factory, data, affine, gz)
    loaded, err = _attempt(lambda: load_volumes([path]))
    if err is not None:
        assert _names_the_file(err, path), f"{type(err).__name__} without the file name: {err}"
        return
    vols, names, _ = loaded
    assert vols.ndim == 4 and vols.shape[0] == 1 and names == [path.name]


@FUZZ
@given(nifti_inputs())
def test_training_chain_loads_or_names_the_file(tmp_path_factory, case):
    data, affine, gz = case
    path = _write(tmp_path_factory, data, affine, gz)
    chain = volume_transforms("image", image_size=(4, 4, 4), num_channels=1)
    out, err = _attempt(lambda: chain({"image": str(path)}))
    if err is not None:
        assert _names_the_file(err, path), f"{type(err).__name__} without the file name: {err}"
    else:
        vol = out["image"]
        assert tuple(vol.shape) == (1, 4, 4, 4) and bool(np.isfinite(np.asarray(vol)).all())
    skipping = volume_transforms("image", image_size=(4, 4, 4), num_channels=1, skip_bad=True)
    result = skipping({"image": str(path)})  # never raises: a bad file becomes a BadSample naming it
    if isinstance(result, BadSample):
        assert path.name in str(result)


@FUZZ
@given(nifti_inputs())
def test_reference_geometry_reader_loads_or_names_the_file(tmp_path_factory, case):
    data, affine, gz = case
    path = _write(tmp_path_factory, data, affine, gz)
    geometry, err = _attempt(lambda: nifti_geometry(nib.load(path)))
    if err is not None:  # nibabel's own load errors carry the name; ours must too
        assert _names_the_file(err, path) or isinstance(err, nib.filebasedimages.ImageFileError), str(err)
        return
    affine, _, qform = geometry
    assert np.asarray(affine).shape == (4, 4) and np.asarray(qform).shape == (4, 4)


def test_fuzz_strategy_reaches_the_hard_cases():
    """The strategy must actually produce what the issue lists, or the properties above test little."""
    seen = {"zero_size": False, "nan_voxels": False, "nan_affine": False, "5d": False, "int": False}

    @settings(max_examples=200, deadline=None, database=None)
    @given(nifti_inputs())
    def collect(case):
        data, affine, _ = case
        seen["zero_size"] |= data.size == 0
        seen["nan_voxels"] |= data.dtype.kind == "f" and bool(np.isnan(data).any())
        seen["nan_affine"] |= bool(np.isnan(affine).any())
        seen["5d"] |= data.ndim == 5
        seen["int"] |= data.dtype.kind in "iu"

    collect()
    assert all(seen.values()), seen


pytestmark = pytest.mark.timeout(120)
