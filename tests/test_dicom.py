"""DICOM export: geometry and values read back by SimpleITK, synthetic markers, new UIDs, atomic writes, CLI, bundle."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from wdm3d.cli import main as cli
from wdm3d.io import write_dicom_series
from wdm3d.io.dicom import (
    MR_STORED_MAX,
    PRIVATE_CREATOR,
    SYNTHETIC_COMMENT,
    dicom_value_mapping,
)

# RAS-world affines: a plain one; flipped + anisotropic + off-centre; axes permuted (the S axis is voxel axis 1)
PLAIN = np.diag([1.0, 1.0, 1.0, 1.0])
FLIPPED = np.array([[-2.0, 0, 0, 90.0], [0, 1.5, 0, -120.0], [0, 0, 2.5, -70.0], [0, 0, 0, 1]])
PERMUTED = np.array([[0, 0, 2.5, -70.0], [-1.5, 0, 0, 90.0], [0, -2.0, 0, -120.0], [0, 0, 0, 1]])
SECRET = "PATIENT-JANE-DOE-1234567"  # stands in for anything a training scan could carry


def read_series(folder):
    """SimpleITK's reading of a series folder: (image, voxel-to-RAS affine of its array in (x, y, z) order, values).

    SimpleITK applies CT's rescale; MR files have none (their IOD defines none), so their stored values are mapped
    with the Real World Value Mapping every file carries (``dicom_value_mapping``), the same in every file.
    """
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    assert len(names) > 0, f"no series in {folder}"
    reader.SetFileNames(names)
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # ITK reports LPS; NIfTI is RAS
    values = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float64)
    headers = [pydicom.dcmread(n, stop_before_pixels=True) for n in names]
    if "RescaleSlope" not in headers[0]:
        mappings = {dicom_value_mapping(ds) for ds in headers}
        assert len(mappings) == 1, f"slices of {folder} map their values differently: {mappings}"
        slope, intercept = mappings.pop()
        values = values * slope + intercept
    return img, ras, values


def assert_same_volume(folder, volume, affine, atol):
    """Every voxel SimpleITK reads sits at the world position of a NIfTI voxel, with that voxel's value."""
    img, ras, values = read_series(folder)
    assert sorted(values.shape) == sorted(volume.shape) and values.size == volume.size
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in values.shape], indexing="ij"), -1).reshape(-1, 3)
    world = ras @ np.c_[idx, np.ones(len(idx))].T
    vox = (np.linalg.inv(affine) @ world)[:3]
    nearest = np.rint(vox).astype(int)
    np.testing.assert_allclose(vox, nearest, atol=1e-3)  # lands on voxel centres
    for axis, size in enumerate(volume.shape):
        assert nearest[axis].min() == 0 and nearest[axis].max() == size - 1
    assert len({tuple(v) for v in nearest.T}) == volume.size  # a permutation of the voxels, none twice
    np.testing.assert_allclose(values.reshape(-1), volume[tuple(nearest)], atol=atol)
    # the spacing is the NIfTI's voxel size, in some axis order
    np.testing.assert_allclose(sorted(img.GetSpacing()), sorted(np.linalg.norm(affine[:3, :3], axis=0)), atol=1e-6)
    return img


def datasets(folder):
    return [pydicom.dcmread(str(p)) for p in sorted(Path(folder).glob("*.dcm"))]


@pytest.mark.parametrize("affine", [PLAIN, FLIPPED, PERMUTED], ids=["plain", "flipped", "permuted"])
def test_ct_series_reads_back_with_the_nifti_geometry_and_hu(tmp_path, affine):
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1000.0, 2000.0, size=(9, 11, 7)).astype(np.float32)
    info = write_dicom_series(hu, affine, tmp_path / "ct", modality="CT")
    assert info["rescale_slope"] == 1.0 and info["rescale_intercept"] == -1024.0 and info["rescale_type"] == "HU"
    assert_same_volume(tmp_path / "ct", hu, affine, atol=0.5 + 1e-6)  # 1 HU steps
    # slices go along the voxel axis closest to S, from inferior to superior
    s_axis = int(np.argmax(np.abs(affine[2, :3])))
    assert info["slice_axis"] == s_axis and info["num_slices"] == hu.shape[s_axis]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets(tmp_path / "ct")]
    assert z == sorted(z) and len(set(z)) == len(z)


def test_ct_from_normalised_volume_with_hu_window(tmp_path):
    norm = np.random.default_rng(2).uniform(0.0, 1.0, size=(8, 8, 6))
    write_dicom_series(norm, FLIPPED, tmp_path / "ct", modality="CT", hu_window=(-1000.0, 400.0))
    assert_same_volume(tmp_path / "ct", -1000.0 + norm * 1400.0, FLIPPED, atol=0.5 + 1e-6)
    ds = datasets(tmp_path / "ct")[0]
    assert ds.RescaleType == "HU" and "window [-1000, 400] HU" in ds.ImageComments


def test_ct_outside_int16_with_slope_1_gets_a_wider_slope(tmp_path):
    hu = np.linspace(-30000.0, 60000.0, 8 * 8 * 4).reshape(8, 8, 4)
    info = write_dicom_series(hu, PLAIN, tmp_path / "ct", modality="CT")
    assert info["rescale_slope"] > 1.0
    assert_same_volume(tmp_path / "ct", hu, PLAIN, atol=info["rescale_slope"] / 2 + 1e-3)


@pytest.mark.parametrize("affine", [FLIPPED, PERMUTED], ids=["flipped", "permuted"])
def test_mr_series_reads_back_within_the_stated_quantisation(tmp_path, affine):
    vol = np.random.default_rng(3).uniform(0.0, 1.0, size=(10, 6, 8)).astype(np.float32)
    info = write_dicom_series(vol, affine, tmp_path / "mr", modality="MR", value_range=(0.0, 1.0))
    assert info["rescale_slope"] == pytest.approx(1.0 / MR_STORED_MAX) and info["rescale_intercept"] == 0.0
    assert_same_volume(tmp_path / "mr", vol, affine, atol=0.5 / MR_STORED_MAX + 1e-6)
    stored = np.stack([ds.pixel_array for ds in datasets(tmp_path / "mr")])
    assert stored.dtype == np.int16 and stored.min() >= 0 and stored.max() <= MR_STORED_MAX
    assert "[0, 1] stored as [0, 4095]" in datasets(tmp_path / "mr")[0].ImageComments
    assert not any("RescaleSlope" in ds or "RescaleIntercept" in ds for ds in datasets(tmp_path / "mr"))  # MR IOD


def test_tags_mark_the_series_synthetic_with_new_uids(tmp_path):
    vol = np.random.default_rng(4).uniform(0, 1, size=(6, 6, 5))
    a = write_dicom_series(vol, FLIPPED, tmp_path / "a", modality="MR", series_description="test")
    b = write_dicom_series(vol, FLIPPED, tmp_path / "b", modality="CT")
    da, db = datasets(tmp_path / "a"), datasets(tmp_path / "b")
    assert len(da) == 5 and len(db) == 5
    for ds, sop in [(d, "1.2.840.10008.5.1.4.1.1.4") for d in da] + [(d, "1.2.840.10008.5.1.4.1.1.2") for d in db]:
        assert ds.SOPClassUID == sop and ds.file_meta.MediaStorageSOPClassUID == sop
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription.startswith("synthetic (wdm3d)")
        assert SYNTHETIC_COMMENT in ds.ImageComments and SYNTHETIC_COMMENT in ds.DerivationDescription
        assert ds.BurnedInAnnotation == "NO"
        assert str(ds.PatientName) == "SYNTHETIC^WDM3D" and ds.PatientID.startswith("WDM3D-SYN-")
        block = ds.private_block(0x0011, PRIVATE_CREATOR)
        assert block[0x01].value == "SYNTHETIC"
        assert ds.pixel_array.dtype == np.int16
    assert da[0].SeriesDescription == "synthetic (wdm3d) test" and da[0].Modality == "MR" and db[0].Modality == "CT"
    # new UIDs: one study/series/frame per call, one SOP instance per file, nothing shared between the two series
    for group in (da, db):
        assert len({d.SeriesInstanceUID for d in group}) == 1 and len({d.StudyInstanceUID for d in group}) == 1
        assert len({d.FrameOfReferenceUID for d in group}) == 1
    assert da[0].SeriesInstanceUID != db[0].SeriesInstanceUID and da[0].StudyInstanceUID != db[0].StudyInstanceUID
    assert da[0].FrameOfReferenceUID != db[0].FrameOfReferenceUID and da[0].PatientID != db[0].PatientID
    sops = [d.SOPInstanceUID for d in da + db]
    assert len(set(sops)) == len(sops) == 10
    assert a["series_uid"] == da[0].SeriesInstanceUID and b["patient_id"] == db[0].PatientID
    # valid values: pydicom reads every element with validation errors raised, not warned
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        for path in a["files"][:1] + b["files"][:1]:
            ds = pydicom.dcmread(str(path))
            assert ds.preamble is not None and "TransferSyntaxUID" in ds.file_meta
            values = [elem.value for elem in ds.iterall()]  # converts (and so validates) each value
            assert len(values) > 40
    finally:
        pydicom.config.settings.reading_validation_mode = mode


def test_refuses_to_overwrite_and_leaves_no_temporaries(tmp_path):
    vol = np.zeros((4, 4, 3))
    write_dicom_series(vol, PLAIN, tmp_path / "s", modality="MR")
    first = sorted(p.name for p in (tmp_path / "s").iterdir())
    uid = datasets(tmp_path / "s")[0].SeriesInstanceUID
    with pytest.raises(FileExistsError, match="already exists"):
        write_dicom_series(vol, PLAIN, tmp_path / "s", modality="MR")
    assert datasets(tmp_path / "s")[0].SeriesInstanceUID == uid  # untouched
    write_dicom_series(np.ones((4, 4, 2)), PLAIN, tmp_path / "s", modality="MR", overwrite=True)
    assert len(first) == 3 and len(list((tmp_path / "s").iterdir())) == 2  # replaced as a whole
    assert datasets(tmp_path / "s")[0].SeriesInstanceUID != uid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pydicom.dcmwrite

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmwrite", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(np.zeros((4, 4, 5)), PLAIN, tmp_path / "s", modality="CT")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "PET"}, "modality must be"),
        ({"volume": np.zeros((4, 4))}, "volume must be"),
        ({"volume": np.full((4, 4, 4), np.nan)}, "NaN"),
        ({"affine": np.zeros((4, 4))}, "affine must be"),
        ({"affine": np.array([[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])}, "shear"),
        ({"hu_window": (0, 1), "modality": "MR"}, "CT only"),
        ({"value_range": (1, 0)}, "low < high"),
        ({"patient_id": "REAL-123"}, "WDM3D-SYN-"),
    ],
)
def test_bad_arguments_say_what_is_wrong(tmp_path, kwargs, message):
    args = {"volume": np.zeros((4, 4, 4)), "affine": PLAIN, "out_dir": tmp_path / "s", **kwargs}
    with pytest.raises(ValueError, match=message):
        write_dicom_series(**args)
    assert not (tmp_path / "s").exists()


def write_training_nifti(path, data, affine):
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header["descrip"] = SECRET.encode()
    img.header["aux_file"] = b"SECRETAUX"
    nib.save(img, str(path))
    assert SECRET.encode() in nib.load(str(path)).header["descrip"].tobytes()


def no_secret_in(folder):
    for p in Path(folder).rglob("*"):
        if p.is_file():
            raw = p.read_bytes()
            assert SECRET.encode() not in raw and b"SECRETAUX" not in raw, p


def test_cli_exports_good_files_and_names_the_bad_one(tmp_path, capsys):
    rng = np.random.default_rng(5)
    good = rng.uniform(0, 1, size=(8, 7, 6))
    write_training_nifti(tmp_path / "a.nii.gz", good, PERMUTED)
    write_training_nifti(tmp_path / "c.nii", good[::-1], FLIPPED)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti at all")
    out = tmp_path / "out"
    code = cli(
        [
            "export-dicom",
            str(tmp_path / "a.nii.gz"),
            str(tmp_path / "bad.nii.gz"),
            str(tmp_path / "c.nii"),
            "--out",
            str(out),
            "--modality",
            "CT",
            "--hu",
            "-1000",
            "500",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "bad.nii.gz" in captured.err and "a.nii.gz" not in captured.err
    assert str(out / "a_dicom") in captured.out and str(out / "c_dicom") in captured.out
    assert "Wrote 2 of 3" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a_dicom", "c_dicom"]
    assert_same_volume(out / "a_dicom", -1000 + 1500 * good, PERMUTED, atol=0.5 + 1e-3)
    assert_same_volume(out / "c_dicom", -1000 + 1500 * good[::-1], FLIPPED, atol=0.5 + 1e-3)
    no_secret_in(out)
    # a second run refuses to overwrite without --overwrite, and succeeds with it
    assert cli(["export-dicom", str(tmp_path / "a.nii.gz"), "--out", str(out), "--modality", "MR"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (
        cli(
            [
                "export-dicom",
                str(tmp_path / "a.nii.gz"),
                "--out",
                str(out),
                "--modality",
                "MR",
                "--intensity-range",
                "0",
                "1",
                "--overwrite",
            ]
        )
        == 0
    )
    assert_same_volume(out / "a_dicom", good, PERMUTED, atol=0.5 / MR_STORED_MAX + 1e-6)
    assert cli(["export-dicom", str(tmp_path / "missing.nii.gz"), "--out", str(out), "--modality", "MR"]) == 1
    assert "missing.nii.gz" in capsys.readouterr().err
    assert (
        cli(["export-dicom", str(tmp_path / "a.nii.gz"), "--out", str(out), "--modality", "MR", "--hu", "0", "1"]) == 2
    )
    # two runs' samples with one file name would share a series folder: refused before anything is written
    for run in ("runA", "runB"):
        (tmp_path / run).mkdir()
        write_training_nifti(tmp_path / run / "sample_0000.nii.gz", good, PERMUTED)
    both = [str(tmp_path / "runA" / "sample_0000.nii.gz"), str(tmp_path / "runB" / "sample_0000.nii.gz")]
    capsys.readouterr()
    assert cli(["export-dicom", *both, "--out", str(tmp_path / "out2"), "--modality", "MR", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "runA/sample_0000.nii.gz and " in err and "runB/sample_0000.nii.gz would both be written" in err
    assert not (tmp_path / "out2").exists()
    # the same file named twice is exported once
    assert cli(["export-dicom", both[0], both[0], "--out", str(tmp_path / "out3"), "--modality", "MR"]) == 0
    assert "Wrote 1 of 1" in capsys.readouterr().out


def test_inference_option_writes_a_series_per_sample(tmp_path):
    from test_bundle import AFFINE, TINY, train, workflow

    from wdm3d.demo import phantom_volumes

    root = tmp_path / "prepared"
    entries = []
    for i, v in enumerate(phantom_volumes(5, 16, seed=3)):
        (root / f"case{i}").mkdir(parents=True)
        name = f"case{i}/case{i}-t1n.nii.gz"
        write_training_nifti(root / name, (v[0].numpy() + 1) / 2, AFFINE)
        entries.append({"case": f"case{i}", "t1n": name})
    (root / "datalist.json").write_text(
        json.dumps(
            {
                "intensity_range": [0.0, 1.0],
                "hu_clip": {"low": -1000.0, "high": 500.0},
                "training": entries[:4],
                "validation": entries[4:],
                "test": [],
            }
        )
    )
    train(root, tmp_path, max_epochs=1)
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(root),
        output_dir=str(tmp_path),
        num_samples=2,
        sampler="rflow",
        num_steps=2,
        mlflow=False,
        dicom=True,
        **TINY,
    )
    wf.run()
    out = tmp_path / "samples"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dicom"] == {"modality": "MR", "hu_window": None}
    uids = set()
    for s in manifest["samples"]:
        assert s["dicom"] == s["nifti"].replace(".nii.gz", "_dicom") and (out / s["dicom"]).is_dir()
        assert s["dicom_num_files"] == 16
        nii = nib.load(out / s["nifti"])
        assert_same_volume(out / s["dicom"], nii.get_fdata(), nii.affine, atol=0.5 / MR_STORED_MAX + 1e-6)
        ds = datasets(out / s["dicom"])[0]
        assert ds.SeriesInstanceUID == s["dicom_series_uid"] and ds.Modality == "MR"
        uids.add(ds.SeriesInstanceUID)
    assert len(uids) == 2
    no_secret_in(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # CT: [0, 1] samples go back to HU through the datalist's numeric hu_clip
    ct_out = tmp_path / "samples_ct"
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(root),
        output_dir=str(tmp_path),
        num_samples=1,
        sampler="rflow",
        num_steps=2,
        mlflow=False,
        dicom=True,
        dicom_modality="CT",
        samples_dir=str(ct_out),
        **TINY,
    )
    wf.run()
    manifest = json.loads((ct_out / "manifest.json").read_text())
    assert manifest["dicom"] == {"modality": "CT", "hu_window": [-1000.0, 500.0]}
    s = manifest["samples"][0]
    nii = nib.load(ct_out / s["nifti"])
    assert_same_volume(ct_out / s["dicom"], -1000.0 + 1500.0 * nii.get_fdata(), nii.affine, atol=0.5 + 1e-3)
    ds = datasets(ct_out / s["dicom"])[0]
    assert ds.Modality == "CT" and ds.RescaleType == "HU" and "window [-1000, 500] HU" in ds.ImageComments
    no_secret_in(ct_out)


def test_bundle_configs_default_to_no_dicom():
    from monai.bundle import ConfigParser

    repo = Path(__file__).resolve().parents[1]
    for bundle, modality in (("wdm3d_brats", "MR"), ("wdm3d_lidc", "CT")):
        parser = ConfigParser()
        parser.read_config(str(repo / "bundles" / bundle / "configs" / "inference.json"))
        assert parser["dicom"] is False and parser["dicom_modality"] == modality
        assert parser["evaluator"]["dicom"] == "@dicom" and parser["evaluator"]["dicom_modality"] == "@dicom_modality"
