"""data_prep.brats (discovery, WDM preprocessing maths, geometry, split, datalist) and data_prep.demo (seeded demo).

Raw folders are built in tmp_path with nibabel at a few voxels per axis; the demo runs at its tiny setting
(``resolution=4``: 60x60x39 raw, 32^3 prepared).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from data_prep import brats
from data_prep.brats import (
    find_cases,
    load_datalist,
    normalize_intensity,
    normalize_modalities,
    pad_or_crop,
    pool_volume,
    prepare_brats,
    preprocess_image,
    preprocess_label,
    split_patients,
)

MODS_2023 = ("t1n", "t1c", "t2w", "t2f", "seg")
MODS_2021 = ("t1", "t1ce", "t2", "flair", "seg")
SMALL = dict(spatial_size=(8, 8, 8), progress=False)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _volume(rng: np.random.Generator, shape=(10, 9, 7)) -> np.ndarray:
    """Scanner-like image: zero background, a 'brain' block with random intensities and a few outliers."""
    x = np.zeros(shape, dtype=np.float32)
    x[2:-2, 2:-2, 1:-1] = rng.uniform(100, 900, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
    x[3, 3, 3] = 5000.0  # outlier above the 99.9th percentile
    return x


def _seg(rng: np.random.Generator, shape=(10, 9, 7), labels=(0, 1, 2, 3)) -> np.ndarray:
    return rng.choice(np.asarray(labels, dtype=np.uint8), size=shape)


def _case_2023(root: Path, case_id: str, rng, mods=MODS_2023, ext=".nii.gz", shape=(10, 9, 7), affine=None) -> Path:
    folder = root / case_id
    for m in mods:
        data = _seg(rng, shape) if m == "seg" else _volume(rng, shape)
        _save(folder / f"{case_id}-{m}{ext}", data, affine)
    return folder


def _case_2021(root: Path, case_id: str, rng, mods=MODS_2021, shape=(10, 9, 7)) -> Path:
    folder = root / case_id
    for m in mods:
        data = _seg(rng, shape, labels=(0, 1, 2, 4)) if m == "seg" else _volume(rng, shape)
        _save(folder / f"{case_id}_{m}.nii.gz", data)
    return folder


def _tree_hash(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------------------------


def test_find_cases_both_schemes_and_normalised_modalities(tmp_path):
    rng = np.random.default_rng(0)
    _case_2023(tmp_path / "GLI-Training", "BraTS-GLI-00002-000", rng)
    _case_2023(tmp_path / "MEN", "BraTS-MEN-00010-001", rng, mods=("t1n", "t2f"), ext=".nii")
    _case_2021(tmp_path / "2021" / "nested", "BraTS2021_00007", rng)
    _case_2021(tmp_path, "BraTS20_Training_001", rng, mods=("t1ce", "flair"))
    (tmp_path / "GLI-Training" / "._BraTS-GLI-00002-000-t1n.nii.gz").write_bytes(b"macOS resource fork")
    (tmp_path / "notes.txt").write_text("not a volume")

    cases = {c.case_id: c for c in find_cases(tmp_path)}

    expected = ["BraTS-GLI-00002-000", "BraTS-MEN-00010-001", "BraTS2021_00007", "BraTS20_Training_001"]
    assert sorted(cases) == sorted(expected)
    assert sorted(cases["BraTS-GLI-00002-000"].files) == sorted(MODS_2023)
    assert sorted(cases["BraTS2021_00007"].files) == sorted(MODS_2023)  # t1/t1ce/t2/flair renamed
    assert cases["BraTS2021_00007"].files["t2f"].name == "BraTS2021_00007_flair.nii.gz"
    assert sorted(cases["BraTS20_Training_001"].files) == ["t1c", "t2f"]
    assert cases["BraTS-MEN-00010-001"].files["t2f"].suffix == ".nii"
    assert cases["BraTS-GLI-00002-000"].scheme == "2023" and cases["BraTS2021_00007"].scheme == "2021"
    assert cases["BraTS-MEN-00010-001"].patient_id == "BraTS-MEN-00010"
    assert cases["BraTS2021_00007"].patient_id == "BraTS2021_00007"
    assert all(not c.duplicates for c in cases.values())


def test_normalize_modalities_aliases_order_and_errors():
    assert normalize_modalities(["seg", "FLAIR", "t1"]) == ["t1n", "t2f", "seg"]
    assert normalize_modalities(["t2w", "t1ce"]) == ["t1c", "t2w"]
    with pytest.raises(ValueError, match="Unknown modality 't3'"):
        normalize_modalities(["t1n", "t3"])


# --------------------------------------------------------------------------------------------------------------------
# preprocessing maths
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("percentiles", [(0.1, 99.9), (2.0, 98.0)])
def test_normalize_intensity_matches_independent_numpy(percentiles):
    rng = np.random.default_rng(1)
    x = np.concatenate([np.zeros(3000), rng.gamma(2.0, 200.0, size=4998), [1e5, -50.0]]).reshape(40, 25, 8)
    got = normalize_intensity(x, percentiles)

    # independent computation: percentiles over all voxels (background zeros included), clip, min-max
    flat = np.sort(x.ravel())

    def pct(q):  # numpy's default 'linear' method written out
        pos = q / 100 * (flat.size - 1)
        i = int(np.floor(pos))
        return flat[i] + (pos - i) * (flat[min(i + 1, flat.size - 1)] - flat[i])

    lo, hi = pct(percentiles[0]), pct(percentiles[1])
    expected = (np.minimum(np.maximum(x, lo), hi) - lo) / (hi - lo)

    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.min() == 0.0 and got.max() == 1.0
    assert np.all(normalize_intensity(np.full((4, 4, 4), 7.0)) == 0.0)  # constant volume -> zeros, no NaN
    with pytest.raises(ValueError, match="0 <= low < high <= 100"):
        normalize_intensity(x, (99.9, 0.1))


def test_pad_crop_pool_shapes_and_content():
    rng = np.random.default_rng(2)
    x = rng.random((10, 7, 5)).astype(np.float32)
    out, aff = pad_or_crop(x, np.eye(4), (8, 8, 8))
    assert out.shape == (8, 8, 8)
    # x: 10 -> 8 crops 1 voxel before; y: 7 -> 8 pads 0 before, 1 after; z: 5 -> 8 pads 1 before, 2 after
    np.testing.assert_array_equal(out[:, :7, 1:6], x[1:9])
    assert not out[:, 7, :].any() and not out[:, :, 0].any() and not out[:, :, 6:].any()
    np.testing.assert_allclose(aff[:3, 3], [1.0, 0.0, -1.0])
    assert pad_or_crop(x, np.eye(4), (-1, 9, -1))[0].shape == (10, 9, 5)  # -1 keeps an axis

    pooled, paff = pool_volume(out, aff, 2)
    assert pooled.shape == (4, 4, 4) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled[1, 2, 3], out[2:4, 4:6, 6:8].mean(), rtol=1e-6)
    assert pool_volume(np.zeros((7, 6, 5)), np.eye(4), 2)[0].shape == (4, 3, 3)  # odd axes padded at the end

    # the presets on BraTS' raw size: wdm 240x240x155 -> 256^3 (-> 128^3 with pool 2), cwdm -> 224x224x160
    raw = np.zeros((240, 240, 155), dtype=np.uint8)
    wdm, waff = pad_or_crop(raw, np.eye(4), brats.PRESETS["wdm"]["spatial_size"])
    assert wdm.shape == (256, 256, 256) and pool_volume(wdm, waff, 2)[0].shape == (128, 128, 128)
    np.testing.assert_allclose(waff[:3, 3], [-8, -8, -50])
    cw, caff = pad_or_crop(raw, np.eye(4), brats.PRESETS["cwdm"]["spatial_size"])
    assert cw.shape == (224, 224, 160)
    np.testing.assert_allclose(caff[:3, 3], [8, 8, -2])


def _oblique_affine() -> np.ndarray:
    """Anisotropic voxels, an LPS-like flip and a rotation: geometry errors cannot hide behind an identity."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.2, -0.9, 2.0])
    aff[:3, 3] = [40.0, -17.5, 3.25]
    return aff


@pytest.mark.parametrize("point", [(1, 2, 4), (6, 7, 3), (10, 11, 8), (5, 3, 0)])
def test_bright_voxel_keeps_its_world_position(tmp_path, point):
    shape, aff = (11, 14, 9), _oblique_affine()
    x = np.random.default_rng(3).uniform(0, 1, size=shape).astype(np.float32)
    x[point] = 1000.0
    # pad x (11 -> 12: 0 before), crop y (14 -> 10: 2 before), pad z (9 -> 12: 1 before), then pool 2; in memory
    # and through NIfTI files. No clipping here: only the geometry is under test.
    out, out_aff = preprocess_image(x, aff, (0, 100), (12, 10, 12), pool=2)
    src = tmp_path / "raw"
    _save(src / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz", x, aff)
    prepare_brats(src, tmp_path / "out", percentiles=(0, 100), spatial_size=(12, 10, 12), pool=2, progress=False)
    img = nib.load(str(tmp_path / "out" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz"))

    world_in = aff @ np.array([*point, 1.0])
    for arr, a in ((out, out_aff), (np.asanyarray(img.dataobj), img.affine)):
        assert arr.shape == (6, 5, 6)
        brightest = np.array(np.unravel_index(np.argmax(arr), arr.shape))
        in_out_voxels = (np.linalg.inv(a) @ world_in)[:3]
        assert np.all(np.abs(in_out_voxels - brightest) <= 0.5 + 1e-4), (in_out_voxels, brightest)
    # the affine is exactly the composition the docstrings state
    shift = np.array([[1, 0, 0, 0], [0, 1, 0, 2], [0, 0, 1, -1], [0, 0, 0, 1]], dtype=float)
    pool = np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1]])
    expected = aff @ shift @ pool
    np.testing.assert_allclose(out_aff, expected, atol=1e-9)
    np.testing.assert_allclose(img.affine, expected, atol=1e-4)
    np.testing.assert_allclose(img.header.get_zooms(), [2.4, 1.8, 4.0], atol=1e-5)


def test_a_qform_that_differs_from_the_sform_moves_with_the_volume(tmp_path):
    x = np.random.default_rng(2).uniform(0, 1, size=(11, 14, 9)).astype(np.float32)
    sform = _oblique_affine()
    qform = np.diag([1.1, 1.2, 1.3, 1.0])
    qform[:3, 3] = [100.0, 120.0, -50.0]
    img = nib.Nifti1Image(x, None)
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=1)
    src = tmp_path / "raw" / "BraTS-GLI-00000-000"
    src.mkdir(parents=True)
    nib.save(img, src / "BraTS-GLI-00000-000-t1n.nii.gz")
    prepare_brats(
        tmp_path / "raw", tmp_path / "out", percentiles=(0, 100), spatial_size=(12, 10, 12), pool=2, progress=False
    )
    out = nib.load(str(tmp_path / "out" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz"))
    shift = np.array([[1, 0, 0, 0], [0, 1, 0, 2], [0, 0, 1, -1], [0, 0, 0, 1]], dtype=float)  # as above
    pool = np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1]])
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(out.header.get_sform(), sform @ shift @ pool, atol=1e-4)
    np.testing.assert_allclose(out.header.get_qform(), qform @ shift @ pool, atol=1e-4)


def test_seg_pooling_keeps_integer_labels():
    seg = _seg(np.random.default_rng(4), (8, 8, 8))
    for mode in brats.SEG_POOL_MODES:
        out, _ = preprocess_label(seg, np.eye(4), (10, 8, 8), pool=2, seg_pool=mode)
        assert out.dtype == np.uint8 and out.shape == (5, 4, 4)
        assert set(np.unique(out)) <= {0, 1, 2, 3}

    block = np.zeros((2, 2, 2), dtype=np.uint8)
    block.flat[:5] = 2  # 5 x label 2, 3 x background -> 2
    assert pool_volume(block, np.eye(4), 2, mode="mode")[0].item() == 2
    tie = np.zeros((2, 2, 2), dtype=np.uint8)
    tie.flat[:4] = 3  # 4 : 4 tie -> the larger label
    assert pool_volume(tie, np.eye(4), 2, mode="mode")[0].item() == 3
    one = np.zeros((2, 2, 2), dtype=np.uint8)
    one[0, 0, 0] = 1
    assert pool_volume(one, np.eye(4), 2, mode="max")[0].item() == 1
    assert pool_volume(one, np.eye(4), 2, mode="mode")[0].item() == 0

    relabelled, _ = preprocess_label(np.full((2, 2, 2), 4.0), np.eye(4), None, label_map={4: 3})
    assert relabelled.dtype == np.uint8 and np.all(relabelled == 3)
    with pytest.raises(ValueError, match="integer labels"):
        preprocess_label(np.full((4, 4, 4), 0.5), np.eye(4), None)


# --------------------------------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------------------------------


def test_split_patients_seeded_disjoint_and_small_sizes():
    ids = [f"BraTS-GLI-{i:05d}" for i in range(20)]
    a, b, c = split_patients(ids, seed=0), split_patients(list(reversed(ids)), seed=0), split_patients(ids, seed=1)
    assert a == b  # order of the input does not matter, only the seed
    assert a != c
    assert [len(a[k]) for k in brats.SPLIT_KEYS] == [16, 2, 2]
    assert sorted(sum(a.values(), [])) == ids  # disjoint and complete
    sizes = {n: [len(v) for v in split_patients(ids[:n]).values()] for n in (1, 2, 3, 5)}
    assert sizes == {1: [1, 0, 0], 2: [1, 1, 0], 3: [1, 1, 1], 5: [3, 1, 1]}
    assert [len(v) for v in split_patients(ids[:4], (1.0, 0.0, 0.0)).values()] == [4, 0, 0]
    with pytest.raises(ValueError, match="summing to 1"):
        split_patients(ids, (0.8, 0.1, 0.2))


def test_timepoints_of_one_patient_share_a_split(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "raw"
    for p in range(6):
        for t in range(3 if p < 2 else 1):
            _case_2023(src, f"BraTS-GLI-{p:05d}-{t:03d}", rng, mods=("t1n",), shape=(6, 6, 6))
    summary = prepare_brats(src, tmp_path / "out", split=(0.5, 0.25, 0.25), seed=3, **SMALL)
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())

    split_of: dict[str, set[str]] = {}
    for key in brats.SPLIT_KEYS:
        for entry in datalist[key]:
            split_of.setdefault(entry["patient"], set()).add(key)
            assert entry["patient"] == entry["case"][:-4]
    assert all(len(s) == 1 for s in split_of.values())
    assert sum(len(datalist[k]) for k in brats.SPLIT_KEYS) == 10 == summary["counts"]["done"]
    assert all(datalist[k] for k in brats.SPLIT_KEYS)
    again = prepare_brats(src, tmp_path / "out2", split=(0.5, 0.25, 0.25), seed=3, **SMALL)
    assert again["splits"] == summary["splits"]
    assert json.loads((tmp_path / "out2" / "datalist.json").read_text())["test"] == datalist["test"]


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_cases_do_not_crash(tmp_path, n):
    rng = np.random.default_rng(6)
    for i in range(n):
        _case_2023(tmp_path / "raw", f"BraTS-GLI-{i:05d}-000", rng, mods=("t1n",), shape=(6, 6, 6))
    summary = prepare_brats(tmp_path / "raw", tmp_path / "out", **SMALL)
    assert summary["splits"] == {"training": 1, "validation": n - 1, "test": 0}
    assert load_datalist(tmp_path / "out" / "datalist.json", "test") == []


# --------------------------------------------------------------------------------------------------------------------
# the whole run: failures, source untouched, datalist
# --------------------------------------------------------------------------------------------------------------------


def test_corrupt_file_is_reported_others_written_source_untouched(tmp_path):
    rng = np.random.default_rng(7)
    src, dst = tmp_path / "raw", tmp_path / "out"
    for i in range(3):
        _case_2023(src, f"BraTS-GLI-{i:05d}-000", rng, mods=("t1n", "t2w", "seg"))
    _case_2021(src, "BraTS2021_00009", rng, mods=("t1", "t2", "seg"))
    _case_2023(src, "BraTS-GLI-00005-000", rng, mods=("t1n", "seg"))  # no t2w
    bad = src / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2w.nii.gz"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated download
    before = _tree_hash(src)

    summary = prepare_brats(src, dst, **SMALL)

    assert _tree_hash(src) == before  # byte-identical, nothing added or removed
    assert summary["counts"] == {"found": 5, "done": 3, "skipped": 0, "failed": 2}
    failed = {f["case"]: f for f in summary["failed"]}
    assert failed["BraTS-GLI-00001-000"]["file"].endswith(bad.name) and failed["BraTS-GLI-00001-000"]["reason"]
    assert "missing modalities ['t2w']" in failed["BraTS-GLI-00005-000"]["reason"]  # a missing modality is an error
    assert not (dst / "BraTS-GLI-00001-000").exists() or not any((dst / "BraTS-GLI-00001-000").iterdir())
    for case in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000", "BraTS2021_00009"):
        for mod, dtype in (("t1n", np.float32), ("t2w", np.float32), ("seg", np.uint8)):
            img = nib.load(str(dst / case / f"{case}-{mod}.nii.gz"))
            assert img.get_data_dtype() == dtype and img.shape == (8, 8, 8)
    seg2021 = np.asanyarray(nib.load(str(dst / "BraTS2021_00009" / "BraTS2021_00009-seg.nii.gz")).dataobj)
    assert set(np.unique(seg2021)) <= {0, 1, 2, 3} and 3 in seg2021  # 2021's ET label 4 -> 3
    on_disk = json.loads((dst / "prepare_summary.json").read_text())
    assert on_disk["failed"] == summary["failed"] and on_disk["done"] == summary["done"]
    assert not [p for p in dst.rglob(".*")]  # no temporary files left behind
    listed = [e["case"] for k in brats.SPLIT_KEYS for e in json.loads((dst / "datalist.json").read_text())[k]]
    assert sorted(listed) == summary["done"]


def test_labels_are_only_named_for_the_glioma_convention(tmp_path):
    rng = np.random.default_rng(6)
    _case_2023(tmp_path / "gli", "BraTS-GLI-00000-000", rng, mods=("t1n", "seg"))
    _case_2023(tmp_path / "ped", "BraTS-PED-00001-000", rng, mods=("t1n", "seg"))  # PED labels are not GLI's
    gli = json.loads(Path(prepare_brats(tmp_path / "gli", tmp_path / "o1", **SMALL)["datalist"]).read_text())
    assert gli["labels"] == brats.BRATS_LABELS and gli["subchallenges"] == ["GLI"]
    ped = json.loads(Path(prepare_brats(tmp_path / "ped", tmp_path / "o2", **SMALL)["datalist"]).read_text())
    assert ped["labels"] == {} and ped["subchallenges"] == ["PED"] and "BraTS PED" in ped["label_convention"]
    assert brats.subchallenge("BraTS2021_00001") == "GLI" and brats.subchallenge("BraTS-men-00001-000") == "MEN"


def test_a_dangling_symlink_fails_its_case_only(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "raw"
    for i in range(3):
        _case_2023(src, f"BraTS-GLI-{i:05d}-000", rng, mods=("t1n", "t2w", "seg"))
    link = src / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2w.nii.gz"
    link.unlink()
    link.symlink_to(tmp_path / "gone.nii.gz")  # e.g. a dataset linked from a disk that is not mounted
    summary = prepare_brats(src, tmp_path / "out", **SMALL)
    assert summary["counts"]["done"] == 2 and summary["counts"]["failed"] == 1
    (failed,) = summary["failed"]
    assert failed["case"] == "BraTS-GLI-00001-000" and "gone.nii.gz" in failed["file"] + failed["reason"]


def _dies_on_zero(i):  # module level: picklable for the worker processes
    if i == 0:
        os._exit(137)  # as the out-of-memory killer would end it
    return {"case": i, "status": "done"}


def test_a_worker_that_dies_fails_only_its_own_case():
    jobs = [(i, (i,)) for i in range(6)]
    records = brats.run_cases(
        _dies_on_zero,
        jobs,
        workers=2,
        desc="x",
        progress=False,
        crashed=lambda key, err: {"case": key, "status": "failed", "reason": str(err)},
    )
    assert sorted(records) == list(range(6))
    assert [records[i]["status"] for i in range(6)] == ["failed"] + ["done"] * 5
    assert "worker process died" in records[0]["reason"]


def test_datalist_resolves_with_monai_and_has_metadata(tmp_path):
    from monai.data import load_decathlon_datalist

    rng = np.random.default_rng(8)
    for i in range(10):
        _case_2023(tmp_path / "raw", f"BraTS-GLI-{i:05d}-000", rng)
    dst = tmp_path / "out"
    prepare_brats(tmp_path / "raw", dst, modalities=["t1", "t2", "seg"], pool=2, **SMALL)
    datalist = json.loads((dst / "datalist.json").read_text())

    assert datalist["intensity_range"] == [0.0, 1.0] and datalist["preset"] == "wdm"
    assert datalist["spatial_size"] == [4, 4, 4] and datalist["spacing"] == [2.0, 2.0, 2.0]
    assert all(type(v) is int for v in datalist["spatial_size"])
    assert datalist["modalities"] == ["t1n", "t2w"] and datalist["label_key"] == "seg"
    assert [datalist["numTraining"], datalist["numValidation"], datalist["numTest"]] == [8, 1, 1]
    entry = datalist["training"][0]
    assert set(entry) == {"case", "patient", "t1n", "t2w", "seg"}
    assert entry["t1n"] == f"{entry['case']}/{entry['case']}-t1n.nii.gz"  # relative to OUT

    for key in brats.SPLIT_KEYS:
        items = load_decathlon_datalist(dst / "datalist.json", data_list_key=key, base_dir=dst)
        for item in items:
            for mod in ("t1n", "t2w", "seg"):
                assert os.path.isabs(item[mod]) and os.path.isfile(item[mod])
        ours = load_datalist(dst / "datalist.json", key)
        assert [i["case"] for i in ours] == [e["case"] for e in datalist[key]]  # ids stay ids
        assert [i["t1n"] for i in ours] == [i["t1n"] for i in items]
    with pytest.raises(FileNotFoundError, match="base_dir"):
        load_datalist(dst / "datalist.json", "training", base_dir=tmp_path)


def test_bad_arguments_fail_clearly(tmp_path):
    rng = np.random.default_rng(9)
    _case_2023(tmp_path / "raw", "BraTS-GLI-00000-000", rng, mods=("t1n",))
    with pytest.raises(ValueError, match="overlap"):
        prepare_brats(tmp_path / "raw", tmp_path / "raw" / "prepared", progress=False)
    with pytest.raises(ValueError, match="not divisible by pool=3"):
        prepare_brats(tmp_path / "raw", tmp_path / "out", spatial_size=(8, 8, 8), pool=3, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No BraTS files"):
        prepare_brats(tmp_path / "empty", tmp_path / "x", progress=False)
    with pytest.raises(RuntimeError, match="None of the 1"):
        prepare_brats(tmp_path / "raw", tmp_path / "out2", modalities=["t2f"], **SMALL)
    assert json.loads((tmp_path / "out2" / "prepare_summary.json").read_text())["counts"]["failed"] == 1


def test_cli(tmp_path, capsys):
    rng = np.random.default_rng(10)
    for i in range(3):
        _case_2023(tmp_path / "raw", f"BraTS-GLI-{i:05d}-000", rng, mods=("t1n", "seg"))
    argv = [
        "--src",
        str(tmp_path / "raw"),
        "--dst",
        str(tmp_path / "out"),
        "--spatial-size",
        "8",
        "8",
        "8",
        "--pool",
        "2",
        "--split",
        "0.6",
        "0.2",
        "0.2",
        "--seed",
        "1",
        "--quiet",
    ]
    assert brats.main(argv) == 0
    assert str(tmp_path / "out") in capsys.readouterr().out
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert datalist["spatial_size"] == [4, 4, 4] and datalist["seed"] == 1
    assert brats.main(["--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "o"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # one failed case makes the exit status non-zero, although the others were prepared
    (tmp_path / "raw" / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz").write_bytes(b"not gzip")
    assert brats.main(argv[:4] + ["--quiet"]) == 1
    assert "1 case(s) failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "prepare_summary.json").read_text())["counts"]["done"] == 2


def test_rerun_skips_up_to_date_cases_and_overwrite_redoes_them(tmp_path):
    import csv

    rng = np.random.default_rng(11)
    src, dst = tmp_path / "raw", tmp_path / "out"
    for i in range(3):
        _case_2023(src, f"BraTS-GLI-{i:05d}-000", rng, mods=("t1n", "seg"))
    (src / "BraTS-GLI-00009-000").mkdir()  # an empty case folder (failed extraction)
    first = prepare_brats(src, dst, **SMALL)
    assert first["counts"] == {"found": 4, "done": 3, "skipped": 0, "failed": 1}
    assert "empty case folder" in first["failed"][0]["reason"]
    out_file = dst / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz"
    mtime = out_file.stat().st_mtime_ns
    datalist = json.loads((dst / "datalist.json").read_text())

    again = prepare_brats(src, dst, **SMALL)
    assert again["counts"] == {"found": 4, "done": 0, "skipped": 3, "failed": 1}
    assert {s["reason"] for s in again["skipped"]} == {"up to date"}
    assert out_file.stat().st_mtime_ns == mtime  # not rewritten
    assert json.loads((dst / "datalist.json").read_text())["training"] == datalist["training"]  # still listed
    rows = list(csv.DictReader((dst / "prepare_report.csv").open()))
    assert [(r["case"], r["status"]) for r in rows] == [
        ("BraTS-GLI-00000-000", "skipped"),
        ("BraTS-GLI-00001-000", "skipped"),
        ("BraTS-GLI-00002-000", "skipped"),
        ("BraTS-GLI-00009-000", "failed"),
    ]
    assert rows[0]["reason"] == "up to date" and "t1n=BraTS-GLI-00000-000/" in rows[0]["outputs"]

    # a changed input, or changed settings, redo that case / every case; --overwrite redoes everything
    changed = src / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1n.nii.gz"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert prepare_brats(src, dst, **SMALL)["done"] == ["BraTS-GLI-00001-000"]
    assert prepare_brats(src, dst, **{**SMALL, "spatial_size": (10, 10, 10)})["counts"]["done"] == 3
    redo = prepare_brats(src, dst, overwrite=True, workers=2, **{**SMALL, "spatial_size": (10, 10, 10)})
    assert redo["counts"]["done"] == 3 and out_file.stat().st_mtime_ns != mtime
    assert not [p for p in dst.rglob(".*")]


# --------------------------------------------------------------------------------------------------------------------
# demo dataset
# --------------------------------------------------------------------------------------------------------------------


def _raw_arrays(root: Path, case: str) -> dict[str, np.ndarray]:
    return {m: np.asanyarray(nib.load(str(root / case / f"{case}-{m}.nii.gz")).dataobj) for m in ("t1n", "t2w", "seg")}


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    from data_prep.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return root, make_demo_dataset(root, num_cases=4, seed=0, resolution=4, progress=False)


def test_demo_never_deletes_or_overwrites_real_prepared_data(demo_dataset, tmp_path):
    import shutil

    from data_prep.demo import make_demo_dataset

    root, _ = demo_dataset
    # real BraTS data prepared into DST/prepared: same case-name pattern, no demo marker
    real = tmp_path / "prepared"
    shutil.copytree(root / "prepared", real)
    (real / "demo_info.json").unlink()
    summary = json.loads((real / "prepare_summary.json").read_text())
    summary["src"] = "/data/BraTS2023-GLI"
    (real / "prepare_summary.json").write_text(json.dumps(summary))
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"prepared' is not empty and was not written by data_prep\.demo"):
        make_demo_dataset(tmp_path, num_cases=2, seed=1, resolution=4, progress=False)
    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before
    # the demo's own folder is reused, smaller demos drop its extra cases; one written before the marker existed
    # (its summary names the demo's raw folder) is recognised too
    (root / "prepared" / "demo_info.json").unlink()
    make_demo_dataset(root, num_cases=3, seed=0, resolution=4, progress=False)
    assert sorted(p.name for p in (root / "prepared").iterdir() if p.is_dir()) == [
        f"BraTS-GLI-0000{i}-000" for i in range(3)
    ]
    make_demo_dataset(root, num_cases=4, seed=0, resolution=4, progress=False)  # back to the fixture's state


def test_demo_dataset_prepared_images(demo_dataset):
    root, datalist_path = demo_dataset
    assert datalist_path == root / "prepared" / "datalist.json"
    datalist = json.loads(datalist_path.read_text())
    assert datalist["spatial_size"] == [32, 32, 32] and datalist["spacing"] == [8.0, 8.0, 8.0]
    entries = [e for k in brats.SPLIT_KEYS for e in load_datalist(datalist_path, k)]
    assert len(entries) == 4 and [len(datalist[k]) for k in brats.SPLIT_KEYS] == [2, 1, 1]
    lesion_voxels = 0
    for e in entries:
        imgs = {m: nib.load(e[m]) for m in ("t1n", "t2w", "seg")}
        t1, t2, seg = (np.asanyarray(imgs[m].dataobj) for m in ("t1n", "t2w", "seg"))
        assert t1.shape == t2.shape == seg.shape == (32, 32, 32)
        for m in ("t1n", "t2w"):
            np.testing.assert_allclose(imgs[m].affine, imgs["seg"].affine)
        for v in (t1, t2):
            assert v.dtype == np.float32 and v.min() >= 0.0 and v.max() <= 1.0 and v.max() > 0.9
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 3}
        brain = t1 > 0
        assert 0.03 < brain.mean() < 0.5  # a brain in the middle of a mostly empty 256 mm field of view
        # T2 contrast is not T1's: inside the brain (away from its partial-volume edge) what is darkest in T1
        # (CSF) is brighter in T2 than what is brightest in T1 (white matter)
        inner = ndi.binary_erosion(brain)
        dark, bright = (t1 < np.percentile(t1[inner], 20)) & inner, (t1 > np.percentile(t1[inner], 80)) & inner
        assert t2[dark].mean() > t2[bright].mean() + 0.05
        lesion_voxels += int((seg > 0).sum())
        assert np.all(t2[seg > 0] > 0)  # lesions lie inside the brain
    assert lesion_voxels > 0


def test_demo_raw_is_seeded_and_cases_differ(demo_dataset, tmp_path):
    from data_prep.demo import make_demo_raw

    root, _ = demo_dataset
    a = make_demo_raw(tmp_path / "a", num_cases=2, seed=0, resolution=4, progress=False)
    b = make_demo_raw(tmp_path / "b", num_cases=2, seed=0, resolution=4, progress=False)
    c = make_demo_raw(tmp_path / "c", num_cases=1, seed=1, resolution=4, progress=False)
    case0, case1 = "BraTS-GLI-00000-000", "BraTS-GLI-00001-000"
    ra, rb, rc = _raw_arrays(a, case0), _raw_arrays(b, case0), _raw_arrays(c, case0)
    for m in ("t1n", "t2w", "seg"):
        np.testing.assert_array_equal(ra[m], rb[m])
        np.testing.assert_array_equal(ra[m], _raw_arrays(root / "raw", case0)[m])  # case i depends on (seed, i) only
    assert not np.array_equal(ra["t1n"], rc["t1n"]) and not np.array_equal(ra["seg"], rc["seg"])
    assert not np.array_equal(ra["t1n"], _raw_arrays(a, case1)["t1n"])
    img = nib.load(str(a / case0 / f"{case0}-t1n.nii.gz"))
    assert img.shape == (60, 60, 39) and np.allclose(img.header.get_zooms(), 4.0)
    assert ra["t1n"].dtype == np.int16 and ra["seg"].max() == 3 and ra["t1n"][ra["seg"] > 0].min() >= 0
    healthy = make_demo_raw(tmp_path / "h", num_cases=1, seed=0, lesions=False, resolution=4, progress=False)
    assert not _raw_arrays(healthy, case0)["seg"].any()


def test_demo_refuses_foreign_folder_and_reports_missing_nilearn(tmp_path, monkeypatch):
    import importlib.util

    from data_prep import demo

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        demo.make_demo_raw(tmp_path / "mine", num_cases=1, resolution=4, progress=False)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install nilearn"):
        demo.template_paths()
