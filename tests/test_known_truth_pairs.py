"""Tests for ``data_prep.known_truth.make_pairs`` (paired volumes for the IP-Adapter benchmark), and that adding it left
``make_volumes`` unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from data_prep.known_truth import PARAMETERS, SHAREABLE, make_pairs, make_volumes, measure_many

DRAWN = ("radius", "intensity", "center", "count", "texture", "rod_length")


def _digest(vols: np.ndarray, params: dict[str, np.ndarray]) -> tuple[str, str]:
    return (
        hashlib.sha256(vols.tobytes()).hexdigest()[:16],
        hashlib.sha256(b"".join(params[k].tobytes() for k in sorted(params))).hexdigest()[:16],
    )


# These digests were computed with the unmodified make_volumes (data_prep/known_truth.py at commit de491f0, before
# make_pairs was added), not by the code under test: they pin make_volumes' output bit-exactly.
@pytest.mark.parametrize(
    ("size", "seed", "num", "expected"),
    [
        (32, 0, 3, ("e5ce2845d8beba68", "d46df2d742c2edee")),
        (32, 7, 2, ("ab967e3c1d13d315", "99da544f7ee280dc")),
        (64, 1, 1, ("613cfa912ccd9d79", "95229af560498597")),
    ],
)
def test_make_volumes_unchanged(size, seed, num, expected):
    vols, params = make_volumes(num, size=size, seed=seed)
    assert _digest(vols, params) == expected


def test_shapes_ranges_and_param_format():
    refs, tgts, ref_params, tgt_params = make_pairs(3, size=32, seed=0)
    for vols in (refs, tgts):
        assert vols.shape == (3, 32, 32, 32) and vols.dtype == np.float32
        assert vols.min() >= 0.0 and vols.max() <= 1.0
    _, vol_params = make_volumes(3, size=32, seed=0)
    for params in (ref_params, tgt_params):
        assert tuple(params) == PARAMETERS
        for k in PARAMETERS:
            assert params[k].shape == (3,) and params[k].dtype == vol_params[k].dtype


def test_shared_parameters_equal_and_remeasured_equal():
    refs, tgts, ref_params, tgt_params = make_pairs(32, size=32, seed=1, shared=("radius", "intensity"))
    np.testing.assert_array_equal(ref_params["radius"], tgt_params["radius"])
    np.testing.assert_array_equal(ref_params["intensity"], tgt_params["intensity"])
    m_ref, m_tgt = measure_many(refs), measure_many(tgts)
    assert m_ref["valid"].all() and m_tgt["valid"].all()
    shared_gap = np.abs(m_ref["radius"] - m_tgt["radius"])
    # control: the same pairing with nothing shared (independent radii)
    ind_refs, ind_tgts, ind_ref_params, ind_tgt_params = make_pairs(32, size=32, seed=1, shared=())
    assert (ind_ref_params["radius"] != ind_tgt_params["radius"]).all()
    free_gap = np.abs(measure_many(ind_refs)["radius"] - measure_many(ind_tgts)["radius"])
    # observed on real draws: shared mean ~0.015, max ~0.075 voxels; independent mean ~1.3 voxels
    assert shared_gap.max() < 0.2
    assert shared_gap.mean() < 0.1 * free_gap.mean()
    intensity_gap = np.abs(m_ref["intensity"] - m_tgt["intensity"])
    free_intensity_gap = np.abs(measure_many(ind_refs)["intensity"] - measure_many(ind_tgts)["intensity"])
    assert intensity_gap.mean() < 0.2 * free_intensity_gap.mean()


@pytest.mark.parametrize("name", ["center", "offset"])
def test_position_shared_by_either_name(name):
    refs, tgts, ref_params, tgt_params = make_pairs(8, size=32, seed=2, shared=(name,))
    np.testing.assert_array_equal(ref_params["center"], tgt_params["center"])
    assert (ref_params["radius"] != tgt_params["radius"]).all()
    gap = np.abs(measure_many(refs)["center"] - measure_many(tgts)["center"])
    assert gap.max() < 0.5


def test_everything_shared_still_has_independent_noise():
    refs, tgts, ref_params, tgt_params = make_pairs(4, size=32, seed=3, shared=DRAWN)
    for k in PARAMETERS:
        np.testing.assert_array_equal(ref_params[k], tgt_params[k])
    for r, t in zip(refs, tgts):
        assert not np.array_equal(r, t)  # noise field (and lesion phase) drawn per volume


def test_unshared_parameters_differ_and_are_independent():
    refs, tgts, ref_params, tgt_params = make_pairs(64, size=32, seed=0)
    assert (ref_params["center"] != tgt_params["center"]).all()
    assert (ref_params["rod_length"] != tgt_params["rod_length"]).all()
    assert (ref_params["texture"] != tgt_params["texture"]).all()
    assert (refs != tgts).any(axis=(1, 2, 3)).all()
    for k in ("rod_length", "center", "texture"):
        r = np.corrcoef(ref_params[k], tgt_params[k])[0, 1]
        assert abs(r) < 0.4, (k, r)


def test_deterministic_and_prefix_stable():
    a = make_pairs(8, size=32, seed=5)
    b = make_pairs(8, size=32, seed=5)
    c = make_pairs(4, size=32, seed=5)
    for x, y in zip(a[:2], b[:2]):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a[:2], c[:2]):
        np.testing.assert_array_equal(x[:4], y)
    for x, y in zip(a[2:], c[2:]):
        for k in PARAMETERS:
            np.testing.assert_array_equal(x[k][:4], y[k])
    other = make_pairs(4, size=32, seed=6)
    assert not np.array_equal(other[0], c[0])


def test_streams_distinct_from_make_volumes_and_each_other():
    refs, tgts, ref_params, tgt_params = make_pairs(4, size=32, seed=0, shared=())
    vols, vol_params = make_volumes(4, size=32, seed=0)
    for i in range(4):
        assert not np.array_equal(refs[i], vols[i])
        assert not np.array_equal(tgts[i], vols[i])
        assert ref_params["radius"][i] != vol_params["radius"][i]
        assert tgt_params["radius"][i] != vol_params["radius"][i]
        assert ref_params["radius"][i] != tgt_params["radius"][i]


@pytest.mark.parametrize("bad", [("radius", "colour"), ("phase",), ("valid",), "noise"])
def test_invalid_shared_names_raise(bad):
    name = bad if isinstance(bad, str) else [n for n in bad if n not in SHAREABLE][0]
    with pytest.raises(ValueError, match=repr(name)):
        make_pairs(1, size=32, seed=0, shared=bad)


def test_single_name_string_accepted():
    _, _, ref_params, tgt_params = make_pairs(3, size=32, seed=4, shared="rod_length")
    np.testing.assert_array_equal(ref_params["rod_length"], tgt_params["rod_length"])
    assert (ref_params["radius"] != tgt_params["radius"]).all()
