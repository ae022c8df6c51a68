"""data_prep.ct_phantom (DICOM phantom), data_prep.lidc (DICOM -> NIfTI + datalist) and the wdm3d_lidc bundle.

Phantom series are 32x32x24 voxels at 3 mm; prepared volumes 16^3 to 48^3. Everything runs on CPU in seconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data_prep import lidc
from data_prep.ct_phantom import SYNTHETIC_DESCRIPTION, make_phantom_raw, phantom_case_id
from data_prep.datalist import SPLIT_KEYS
from data_prep.lidc import find_cases, hu_from_dataset, prepare_lidc, read_ct_series
from data_prep.lidc_dicom import read_header
from data_prep.lidc_discovery import rank_series

SHAPE, SPACING = (32, 32, 24), (3.0, 3.0, 3.0)
TINY_PREP = dict(spacing=6.0, spatial_size=(16, 16, 16), progress=False)
CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "wdm3d_lidc" / "configs"


def _tree_hash(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
    return out


def _series_hu(folder: Path) -> tuple[np.ndarray, list[float]]:
    """Independent reader: stored int16 + intercept, slices sorted by z position, as (X, Y, Z); and the lowest IPP."""
    slices = []
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns)
        slices.append(
            (
                float(ds.ImagePositionPatient[2]),
                raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                [float(v) for v in ds.ImagePositionPatient],
            )
        )
    slices.sort(key=lambda s: s[0])
    return np.stack([s[1].T for s in slices], axis=-1).astype(np.float32), slices[0][2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc_raw")
    cases = make_phantom_raw(
        root, num_cases=6, seed=0, shape=SHAPE, spacing=SPACING, marker=True, extra_series={0: "CT", 1: "MR"}
    )
    return root, cases


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    root, _ = raw
    dst = tmp_path_factory.mktemp("lidc_prepared")
    summary = prepare_lidc(root, dst, **TINY_PREP)
    return dst, summary


# --------------------------------------------------------------------------------------------------------------------
# phantom and DICOM reading
# --------------------------------------------------------------------------------------------------------------------


def test_phantom_is_a_seeded_synthetic_ct_series_in_the_lidc_layout(raw, tmp_path):
    root, cases = raw
    case = cases[0]
    assert case.case_id == phantom_case_id(0) == "LIDC-PHANTOM-0001"
    rel = case.files[0].relative_to(root)
    assert rel.parts[0] == case.case_id and len(rel.parts) == 4 and rel.name == "1-001.dcm"
    ds = pydicom.dcmread(case.files[0])
    assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.SeriesDescription == SYNTHETIC_DESCRIPTION
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == rel.parts[1:3] and ds.PatientID == case.case_id
    assert len({ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID}) == 4
    assert ds.pixel_array.dtype == np.int16 and float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
    assert [float(v) for v in ds.PixelSpacing] == [3.0, 3.0] and float(ds.SliceThickness) == 3.0
    # file 1-001 is the top slice (LIDC numbering): positions decrease with the file number
    zs = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in case.files]
    np.testing.assert_allclose(np.diff(zs), -3.0, atol=1e-3)

    hu, _ = _series_hu(case.series_dir)
    assert hu.shape == SHAPE
    for lo, hi in ((-1050, -950), (-900, -800), (-150, -50), (0, 80), (650, 1250)):  # air, lung, fat, tissue, bone
        assert np.count_nonzero((hu > lo) & (hu < hi)) > 20, (lo, hi)
    again = make_phantom_raw(tmp_path / "a", num_cases=1, seed=0, shape=SHAPE, spacing=SPACING, marker=True)
    np.testing.assert_array_equal(_series_hu(again[0].series_dir)[0], hu)  # case i depends on (seed, i) only
    other = make_phantom_raw(tmp_path / "b", num_cases=1, seed=1, shape=SHAPE, spacing=SPACING)
    assert not np.array_equal(_series_hu(other[0].series_dir)[0], hu)
    assert cases[0].nodules and all(n["radius_mm"] > 0 for n in cases[0].nodules)


def test_ct_small_hu_conversion_from_pydicom_test_data():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = hu_from_dataset(ds)
    stored = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns).astype(np.float64)
    expected = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # 1 and -1024 in this file
    assert hu.shape == (128, 128) and hu.dtype == np.float32
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert float(ds.RescaleIntercept) == -1024 and hu.min() < -800 < 0 < hu.max()  # lung and soft tissue
    header = read_header(path)
    assert header["modality"] == "CT" and header["series"] == ds.SeriesInstanceUID and header["ipp"] is not None


def test_series_is_sorted_by_position_not_file_name(raw):
    _, cases = raw
    case = cases[2]
    files = list(case.files)
    shuffled = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
    hu, affine = read_ct_series(shuffled)
    expected, lowest = _series_hu(case.series_dir)
    np.testing.assert_array_equal(hu, expected)
    np.testing.assert_allclose(affine[:3, 3], lowest, atol=1e-3)
    np.testing.assert_allclose(affine[:3, :3], np.diag([3.0, 3.0, 3.0]), atol=1e-6)  # LPS, slices going up


def test_series_rule_ranking(raw):
    root, cases = raw
    found = {c.case_id: c for c in find_cases(root)}
    first = found[cases[0].case_id]
    assert sorted(s.modality for s in first.series.values()) == ["CT", "CT"]
    ranked, _ = rank_series(first, "most_slices")
    assert len(ranked[0].files) == 24 and len(ranked[1].files) == 12 and ranked[0].slice_spacing == 3.0
    assert rank_series(first, "thinnest")[0][0].uid == ranked[0].uid
    # thinnest prefers the thinner series even when it has fewer slices
    thick = lidc.DicomSeries("b", "CT", [Path(f"{i}") for i in range(30)], slice_spacing=5.0)
    thin = lidc.DicomSeries("a", "CT", [Path(f"{i}") for i in range(20)], slice_spacing=1.0)
    scout = lidc.DicomSeries("c", "CT", [Path("x")] * 40, localizer=True)
    case = lidc.LidcCase("p", {"a": thin, "b": thick, "c": scout})
    assert [s.uid for s in rank_series(case, "most_slices")[0]] == ["b", "a"]
    assert [s.uid for s in rank_series(case, "thinnest")[0]] == ["a", "b"]


# --------------------------------------------------------------------------------------------------------------------
# prepare_lidc
# --------------------------------------------------------------------------------------------------------------------


def test_prepared_volumes_datalist_and_split(raw, prepared):
    from monai.data import load_decathlon_datalist

    _, cases = raw
    dst, summary = prepared
    assert summary["counts"] == {"found": 6, "done": 6, "skipped": 0, "failed": 0}
    datalist = json.loads((dst / "datalist.json").read_text())
    assert datalist["intensity_range"] == [0.0, 1.0] and datalist["modality"] == "CT" and datalist["image_key"] == "ct"
    assert datalist["spatial_size"] == [16, 16, 16] and datalist["spacing"] == [6.0, 6.0, 6.0]
    assert [datalist["numTraining"], datalist["numValidation"], datalist["numTest"]] == [4, 1, 1]
    listed = [e for k in SPLIT_KEYS for e in datalist[k]]
    assert sorted(e["case"] for e in listed) == [c.case_id for c in cases]
    assert all(e["patient"] == e["case"] and e["ct"] == f"{e['case']}/{e['case']}-ct.nii.gz" for e in listed)
    chosen = {r["case"]: r["series"] for r in summary["cases"]}
    assert chosen[cases[0].case_id] == cases[0].series_dir.name  # most slices, not the 12-slice series
    assert chosen[cases[1].case_id] == cases[1].series_dir.name  # the MR series is ignored
    for key in SPLIT_KEYS:
        for item in load_decathlon_datalist(dst / "datalist.json", data_list_key=key, base_dir=dst):
            img = nib.load(item["ct"])
            data = np.asanyarray(img.dataobj)
            assert img.shape == (16, 16, 16) and data.dtype == np.float32
            assert data.min() == 0.0 and data.max() <= 1.0 and np.isfinite(data).all()
            np.testing.assert_allclose(img.header.get_zooms(), 6.0)
    # seeded, patient-level, reproducible
    ids = sorted(e["patient"] for e in listed)
    again = prepare_lidc(raw[0], dst.parent / "again", **TINY_PREP)
    assert json.loads((dst.parent / "again" / "datalist.json").read_text())["test"] == datalist["test"]
    assert again["splits"] == summary["splits"]
    other = prepare_lidc(raw[0], dst.parent / "seed1", seed=1, **TINY_PREP)
    assert (
        sorted(
            e["patient"]
            for k in SPLIT_KEYS
            for e in json.loads((dst.parent / "seed1" / "datalist.json").read_text())[k]
        )
        == ids
    )
    assert other["counts"]["done"] == 6


def test_hu_clipping_matches_an_independent_numpy_computation(raw, tmp_path):
    _, cases = raw
    # no resampling (3 mm in, 3 mm out): x 32 -> 28 is cropped, y 32 -> 36 and z 24 -> 30 are padded with air
    prepare_lidc(raw[0], tmp_path / "out", spacing=3.0, spatial_size=(28, 36, 30), progress=False)
    prepare_lidc(raw[0], tmp_path / "win", spacing=3.0, spatial_size=(28, 36, 30), window=(-1200, 400), progress=False)
    case = cases[3]
    hu, _ = _series_hu(case.series_dir)
    cropped = hu[2:30]
    lo, hi = -1000.0, np.percentile(np.maximum(cropped, -1000.0), 99.9)
    padded = np.full((28, 36, 30), -1000.0, dtype=np.float32)
    padded[:, 2:34, 3:27] = cropped
    expected = (np.clip(padded, lo, hi) - lo) / (hi - lo)
    got = nib.load(tmp_path / "out" / case.case_id / f"{case.case_id}-ct.nii.gz").get_fdata()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (hu < -1000).any() and got.min() == 0.0 and got.max() == pytest.approx(1.0) and got[0, 0, 0] == 0.0
    padded_win = np.pad(cropped, ((0, 0), (2, 2), (3, 3)), constant_values=-1000.0)
    expected_win = (np.clip(padded_win, -1200, 400) + 1200) / 1600
    got_win = nib.load(tmp_path / "win" / case.case_id / f"{case.case_id}-ct.nii.gz").get_fdata()
    np.testing.assert_allclose(got_win, expected_win, atol=1e-5)
    assert got_win[0, 0, 0] == pytest.approx(200 / 1600)  # air padding is -1000 HU, not 0 after scaling


def test_marker_lands_at_its_patient_position(raw, tmp_path):
    _, cases = raw
    dst = tmp_path / "out"
    # resampled 3 mm -> 2 mm, cropped in x/y, padded in z; a fixed window keeps the 3000 HU marker the only bright spot
    prepare_lidc(raw[0], dst, spacing=2.0, spatial_size=(40, 40, 48), window=(-1000, 3000), progress=False)
    for case in cases[:3]:
        img = nib.load(dst / case.case_id / f"{case.case_id}-ct.nii.gz")
        data = img.get_fdata()
        weights = np.clip(data - 0.6, 0.0, None)
        centroid = (np.argwhere(weights > 0) * weights[weights > 0][:, None]).sum(0) / weights.sum()
        world = (img.affine @ np.array([*centroid, 1.0]))[:3]
        x, y, z = case.marker_lps
        np.testing.assert_allclose(world, [-x, -y, z], atol=1.0)  # LPS -> RAS
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), 2.0, atol=1e-6)
        assert img.header.get_sform(coded=True)[1] == 1 and img.header.get_qform(coded=True)[1] == 1
        assert img.affine[0, 0] < 0 and img.affine[1, 1] < 0  # RAS from LPS: x and y flipped


def test_sources_untouched_rerun_skips_and_overwrite_redoes(raw, tmp_path):
    root, cases = raw
    before = _tree_hash(root)
    dst = tmp_path / "out"
    assert (
        lidc.main(
            ["--src", str(root), "--dst", str(dst), "--spacing", "6", "--spatial-size", "16", "16", "16", "--quiet"]
        )
        == 0
    )
    out_file = dst / cases[0].case_id / f"{cases[0].case_id}-ct.nii.gz"
    mtime = out_file.stat().st_mtime_ns
    again = prepare_lidc(root, dst, **TINY_PREP)
    assert again["counts"] == {"found": 6, "done": 0, "skipped": 6, "failed": 0}
    assert {s["reason"] for s in again["skipped"]} == {"up to date"} and out_file.stat().st_mtime_ns == mtime
    datalist = json.loads((dst / "datalist.json").read_text())
    assert sum(datalist[f"num{k}"] for k in ("Training", "Validation", "Test")) == 6  # up-to-date cases stay listed
    redo = prepare_lidc(root, dst, overwrite=True, workers=2, **TINY_PREP)
    assert redo["counts"]["done"] == 6 and out_file.stat().st_mtime_ns != mtime
    assert prepare_lidc(root, dst, **{**TINY_PREP, "spatial_size": (20, 20, 20)})["counts"]["done"] == 6  # settings
    assert _tree_hash(root) == before  # byte-identical, same mtimes, nothing added or removed
    assert not [p for p in dst.rglob(".*")]


def test_each_bad_input_fails_alone_and_the_exit_status_says_so(tmp_path):
    src = tmp_path / "raw"
    bad = {
        1: "missing_slice",
        2: "uneven_spacing",
        3: "gantry_tilt",
        4: "mixed_sizes",
        5: "non_ct",
        6: "truncated",
        7: "nan",
        8: "empty",
    }
    cases = make_phantom_raw(
        src, num_cases=10, seed=2, shape=SHAPE, spacing=SPACING, defects={k: [v] for k, v in bad.items()}
    )
    corrupt = src / phantom_case_id(9) / "x" / "y" / "garbage.dcm"  # a DICOM preamble, then noise
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\0" * 128 + b"DICM" + bytes(np.random.default_rng(0).integers(0, 255, 300, dtype=np.uint8)))
    (src / phantom_case_id(0) / "069.xml").write_text("<LidcReadMessage/>")  # annotations are ignored
    before = _tree_hash(src)

    summary = prepare_lidc(src, tmp_path / "out", **TINY_PREP)
    status = {r["case"]: r for r in summary["cases"]}
    expected = {
        "missing_slice": "missing slice(s): a gap of 6.000 mm (1 slice(s)",
        "uneven_spacing": "uneven slice spacing",
        "gantry_tilt": "gantry tilt: slice positions run 15.00 degrees",
        "mixed_sizes": "mixed slice sizes (rows x columns 32x32: 23 slice(s), 32x28: 1 slice(s))",
        "non_ct": "no CT series (found MR (24 files))",
        "truncated": "the file is truncated",
        "nan": "NaN/inf voxels",
        "empty": "empty folder: no DICOM files",
    }
    for index, kind in bad.items():
        record = status[phantom_case_id(index)]
        assert record["status"] == "failed" and expected[kind] in record["reason"], (kind, record)
    garbage = status[phantom_case_id(9)]
    assert garbage["status"] == "failed" and "corrupt DICOM file" in garbage["reason"]
    assert garbage["file"] == str(corrupt)
    assert (
        status[phantom_case_id(6)]["reason"].startswith("series ")
        and cases[6].files[12].name in status[phantom_case_id(6)]["reason"]
    )  # the truncated file is named
    assert status[phantom_case_id(0)]["status"] == "done" and summary["counts"]["failed"] == 9
    assert not (tmp_path / "out" / phantom_case_id(1)).exists()  # nothing half-written for a rejected series
    rows = list(csv.DictReader((tmp_path / "out" / "prepare_report.csv").open()))
    assert len(rows) == 10 and sum(r["status"] == "failed" for r in rows) == 9
    assert _tree_hash(src) == before
    # the command line: non-zero as soon as one case failed, with the report named
    argv = [
        "--src",
        str(src),
        "--dst",
        str(tmp_path / "cli"),
        "--spacing",
        "6",
        "--spatial-size",
        "16",
        "16",
        "16",
        "--quiet",
    ]
    assert lidc.main(argv) == 1
    assert lidc.main(["--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "o"), "--quiet"]) == 2
    with pytest.raises(RuntimeError, match="None of the 1"):
        prepare_lidc(src / phantom_case_id(1), tmp_path / "none", **TINY_PREP)


def test_a_patient_id_that_is_not_a_file_name_cannot_write_outside_the_output(tmp_path):
    from pydicom.uid import generate_uid

    from data_prep.ct_phantom import write_series

    hu = np.full((16, 16, 12), -1000.0)
    hu[4:12, 4:12, 3:9] = 40
    write_series(
        hu,
        tmp_path / "src" / "LIDC-IDRI-0001" / "st" / "se",
        (0, 0, 0),
        (2, 2, 2),
        "LIDC-IDRI-0001",
        generate_uid(),
        generate_uid(),
    )
    # PatientID is free text (VR LO): a path in it must not become an output path
    write_series(
        hu,
        tmp_path / "src" / "LIDC-IDRI-0002" / "st" / "se",
        (0, 0, 0),
        (2, 2, 2),
        "../../escaped",
        generate_uid(),
        generate_uid(),
    )
    summary = prepare_lidc(
        tmp_path / "src", tmp_path / "work" / "out", spacing=2, spatial_size=(16, 16, 16), min_slices=2, progress=False
    )
    assert sorted(c["case"] for c in summary["cases"]) == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]  # the folder's name
    assert summary["counts"]["done"] == 2
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.nii.gz") if "src" not in p.parts)
    assert all(p.parts[:2] == ("work", "out") for p in written) and len(written) == 2


def test_bad_arguments_fail_clearly(raw, tmp_path):
    root, _ = raw
    with pytest.raises(ValueError, match="overlap"):
        prepare_lidc(root, root / "prepared", progress=False)
    with pytest.raises(ValueError, match="series_rule"):
        prepare_lidc(root, tmp_path / "o", series_rule="newest", progress=False)
    with pytest.raises(ValueError, match="low < high"):
        prepare_lidc(root, tmp_path / "o", window=(100, -100), progress=False)
    with pytest.raises(ValueError, match="not divisible by pool=3"):
        prepare_lidc(root, tmp_path / "o", spatial_size=(16, 16, 16), pool=3, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No DICOM files"):
        prepare_lidc(tmp_path / "empty", tmp_path / "o", progress=False)


# --------------------------------------------------------------------------------------------------------------------
# the wdm3d_lidc bundle
# --------------------------------------------------------------------------------------------------------------------

TINY_NET = {
    "image_size": [16, 16, 16],
    "network_def#base_channels": 8,
    "network_def#channel_mult": [1, 2],
    "network_def#num_res_blocks": 1,
    "network_def#norm_num_groups": 4,
}
TINY_TRAIN = {
    **TINY_NET,
    "mlflow": False,
    "batch_size": 2,
    "num_workers": 0,
    "val_interval": 1,
    "val_num_steps": 2,
    "save_interval": 1,
    "max_epochs": 1,
}


def _workflow(files, run_id, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train" if run_id == "training" else "infer",
        run_id=run_id,
        **overrides,
    )
    wf.initialize()
    return wf


def test_bundle_configs_parse_and_defaults_are_wdm_lidc(prepared, tmp_path):
    from monai.bundle import ConfigParser

    dst, _ = prepared
    wf = _workflow(["train.json"], "training", dataset_dir=str(dst), output_dir=str(tmp_path), **TINY_TRAIN)
    assert wf.check_properties() == []
    wf = _workflow(["inference.json"], "inference", dataset_dir=str(dst), output_dir=str(tmp_path), **TINY_NET)
    assert wf.check_properties() == []
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert parser["image_key"] == "ct" and parser["bundle_root"] == "$wdm3d.bundle.bundle_root('wdm3d_lidc')"
    assert parser["batch_size"] == 10 and parser["learning_rate"] == 1e-5 and parser["image_size"] == [128] * 3
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "wdm_256.json")])
    assert parser["image_size"] == [256] * 3 and parser["batch_size"] == 1
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["name"] == "wdm3d_lidc" and meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "CT"
    demo = json.loads((CONFIGS / "demo.json").read_text())
    assert demo["image_size"] == [32, 32, 32]


def test_bundle_trains_on_the_prepared_phantom_and_generates_with_its_geometry(prepared, tmp_path):
    from wdm3d.engine import latest_checkpoint, load_checkpoint

    dst, _ = prepared
    wf = _workflow(
        ["train.json", "demo.json"], "training", dataset_dir=str(dst), output_dir=str(tmp_path), **TINY_TRAIN
    )
    wf.run()
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert ckpt["trainer"]["iteration"] == 2  # 4 training patients, batch 2
    first = json.loads((dst / "datalist.json").read_text())["training"][0]["ct"]
    affine = nib.load(dst / first).affine
    np.testing.assert_allclose(ckpt["geometry"]["affine"].numpy(), affine, atol=1e-5)

    wf = _workflow(
        ["inference.json", "demo.json"],
        "inference",
        dataset_dir=str(dst),
        output_dir=str(tmp_path),
        num_samples=1,
        sampler="rflow",
        num_steps=2,
        mlflow=False,
        **TINY_NET,
    )
    wf.run()
    img = nib.load(tmp_path / "samples" / "sample_0000.nii.gz")
    assert img.shape == (16, 16, 16)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    data = img.get_fdata()
    assert np.isfinite(data).all() and 0.0 <= data.min() and data.max() <= 1.0
