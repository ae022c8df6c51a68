"""NIfTI/PNG writing, datalists, checkpoint loading and resuming helpers."""

import json
import os
import pickle
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from wdm3d.artifacts import latest_checkpoint, load_checkpoint, load_network_weights
from wdm3d.data import intensity_range, load_datalist, volume_transforms
from wdm3d.engine import DataGeometry
from wdm3d.io import mid_slices, montage, save_montage, save_nifti
from wdm3d.networks import WDMUNet

# --- NIfTI -------------------------------------------------------------------------------------------------------


def test_save_nifti_keeps_the_affine_and_codes(tmp_path):
    aff = np.array([[0, 0, -1.5, 10], [2.0, 0, 0, -5], [0, 3.0, 0, 7], [0, 0, 0, 1]])  # permuted axes, flipped
    vol = np.random.rand(4, 6, 8).astype(np.float32)
    path = save_nifti(vol, aff, tmp_path / "a.nii.gz", description="synthetic (wdm3d)")
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, aff)
    assert img.header.get_sform(coded=True)[1] == 1 and img.header.get_qform(coded=True)[1] == 1
    np.testing.assert_allclose(img.header.get_qform(), aff, atol=1e-5)  # qform can represent it (proper rotation)
    assert img.header.get_xyzt_units()[0] == "mm" and bytes(img.header["descrip"]).startswith(b"synthetic")
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    assert os.listdir(tmp_path) == ["a.nii.gz"]


def test_save_nifti_writes_a_separate_qform_and_keeps_an_unset_code(tmp_path):
    sform = np.array([[1.0, 0.2, 0, 3], [0, 1.0, 0, -4], [0, 0, 2.0, 5], [0, 0, 0, 1]])  # sheared: no qform can say it
    qform = np.array([[1.0, 0, 0, 3], [0, 1.0, 0, -4], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    img = nib.load(save_nifti(np.zeros((3, 4, 5)), sform, tmp_path / "a.nii.gz", codes=(0, 2), qform=qform))
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (0, 2)
    np.testing.assert_allclose(img.header.get_sform(), sform)
    np.testing.assert_allclose(img.header.get_qform(), qform, atol=1e-6)
    img = nib.load(save_nifti(np.zeros((3, 4, 5)), qform, tmp_path / "b.nii.gz", codes=(0, 0)))
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 1)  # geometry always stored
    with pytest.raises(ValueError, match=r"qform must be a finite, invertible 4x4 matrix.*c\.nii\.gz"):
        save_nifti(np.zeros((3, 4, 5)), qform, tmp_path / "c.nii.gz", qform=np.zeros((4, 4)))


def test_save_nifti_rejects_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="invertible"):
        save_nifti(np.zeros((2, 2, 2)), np.zeros((4, 4)), tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        save_nifti(np.zeros((2, 2)), np.eye(4), tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match=".nii"):
        save_nifti(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


# --- previews ------------------------------------------------------------------------------------------------------


def test_mid_slices_are_oriented_by_the_affine():
    # a marker at the anterior-superior-right part of a RAS volume must show up top-right in the axial view
    # (anterior up, patient right on the right) whatever order the voxel axes are stored in
    vol = np.zeros((10, 12, 14))
    vol[8, 10, 7] = 1.0  # x=R side, y=anterior, z=middle
    axial_ras = mid_slices(vol, np.eye(4))[0]
    r, c = np.argwhere(axial_ras == 1)[0]
    assert r < axial_ras.shape[0] / 2 and c > axial_ras.shape[1] / 2
    # the same anatomy stored with axes flipped in x and y (LPS-like voxel order)
    flipped = vol[::-1, ::-1, :].copy()
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_array_equal(mid_slices(flipped, aff)[0], axial_ras)


def test_montage_layout_and_save(tmp_path):
    vols = torch.rand(3, 1, 8, 10, 12)
    img = montage(vols, value_range=(0, 1))
    # one row per volume, each as tall as the tallest mid-slice (12) plus a 1 px gap
    assert img.dtype == np.uint8 and img.shape[0] == 3 * (max(10, 12) + 1)
    path = save_montage(tmp_path / "m.png", vols)
    from PIL import Image

    png = Image.open(path)
    assert png.size[1] == img.shape[0] * (128 // 8)  # zoomed so the smallest edge is ~128 px


# --- datalists -----------------------------------------------------------------------------------------------------


def _datalist(tmp_path, entries, **meta):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({**meta, "training": entries}))
    return path


def test_load_datalist_resolves_paths_and_names_missing_files(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    path = _datalist(tmp_path, [{"case": "a", "t1n": "a.nii.gz"}, {"case": "b", "t1n": "b.nii.gz"}])
    with pytest.raises(FileNotFoundError, match=r"b\.nii\.gz"):
        load_datalist(path, "training", ["t1n"])
    items = load_datalist(path, "training", ["t1n"], check_files=False)
    assert items[0]["t1n"] == str(tmp_path / "a.nii.gz") and items[0]["case"] == "a"
    with pytest.raises(KeyError, match="t2w"):
        load_datalist(path, "training", ["t2w"], check_files=False)
    with pytest.raises(KeyError, match="validation"):
        load_datalist(path, "validation", ["t1n"])


def test_datalist_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_datalist(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_datalist(bad)
    empty = _datalist(tmp_path, [])
    with pytest.raises(ValueError, match="empty"):
        load_datalist(empty)


def test_intensity_range_from_datalist(tmp_path):
    assert intensity_range(_datalist(tmp_path, [], intensity_range=[-1000, 500])) == [-1000.0, 500.0]
    assert intensity_range(tmp_path / "none.json") == [0.0, 1.0]
    with pytest.raises(ValueError, match="low < high"):
        intensity_range(_datalist(tmp_path, [], intensity_range=[1, 0]))


def test_volume_transforms_map_the_range_and_track_the_affine(tmp_path):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [10, 20, 30]
    arr = np.linspace(-0.2, 1.2, 12 * 12 * 8, dtype=np.float32).reshape(12, 12, 8)  # beyond [0, 1] at both ends
    nib.save(nib.Nifti1Image(arr, aff), tmp_path / "v.nii.gz")
    out = volume_transforms("img", (8, 12, 10))({"img": str(tmp_path / "v.nii.gz")})["img"]
    assert tuple(out.shape) == (1, 8, 12, 10)
    expected = np.clip(2 * arr[2:10] - 1, -1, 1)  # [0, 1] -> [-1, 1], clipped; centre crop x 12 -> 8
    np.testing.assert_allclose(out[0, :, :, 1:9].numpy(), expected, atol=1e-6)
    assert (out[0, :, :, 0] == -1).all() and (out[0, :, :, 9] == -1).all()  # z padded with the background value
    # cropping 12 -> 8 along x removes 2 voxels (4 mm) at the start; padding 8 -> 10 along z adds 1 voxel before
    np.testing.assert_allclose(np.asarray(out.affine)[:3, 3], [10 + 4, 20, 30 - 2])
    with pytest.raises(ValueError, match="even"):
        volume_transforms("img", (7, 8, 8))


# --- checkpoints ---------------------------------------------------------------------------------------------------


def test_latest_checkpoint_is_the_newest_file(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None and latest_checkpoint(tmp_path) is None
    for i, name in enumerate(["checkpoint_epoch=10.pt", "checkpoint_epoch=2.pt", "checkpoint_final_iteration=7.pt"]):
        torch.save({"i": torch.tensor(i)}, tmp_path / name)
        t = time.time() - 100 + 10 * i
        os.utime(tmp_path / name, (t, t))
    (tmp_path / ".checkpoint_epoch=99.pt.tmp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "checkpoint_final_iteration=7.pt"


def test_latest_checkpoint_follows_the_save_log_then_files_added_after_it(tmp_path, caplog):
    for i, name in enumerate(["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "old.pt"]):
        torch.save({"i": torch.tensor(i)}, tmp_path / name)
        os.utime(tmp_path / name, (1e9 + 10 * (3 - i), 1e9 + 10 * (3 - i)))  # mtimes say epoch 1 is the newest
    log = tmp_path / "checkpoints.json"
    log.write_text(
        json.dumps(
            {"saved": [{"file": "checkpoint_epoch=1.pt"}, {"file": "gone.pt"}, {"file": "checkpoint_epoch=2.pt"}]}
        )
    )
    os.utime(log, (1e9 + 100, 1e9 + 100))
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=2.pt"  # the log's last existing entry
    torch.save({}, tmp_path / "dropped_in.pt")  # not in the log, and newer than it: someone put it there to resume
    assert latest_checkpoint(tmp_path).name == "dropped_in.pt"
    (tmp_path / "dropped_in.pt").unlink()
    log.write_text("{not json")
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=1.pt"  # unreadable log: modification time
    assert "checkpoints.json is unreadable" in caplog.text


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_checkpoint_refuses_pickled_code_and_names_the_file(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Evil()}, fh)
    with pytest.raises(RuntimeError, match=r"evil\.pt.*weights_only=True"):
        load_checkpoint(path)
    trunc = tmp_path / "trunc.pt"
    torch.save({"model": torch.zeros(1000)}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"trunc\.pt"):
        load_checkpoint(trunc)


def test_load_network_weights_prefers_ema_and_names_a_mismatch(tmp_path):
    net = WDMUNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)
    ema = {k: torch.full_like(v, 0.5) for k, v in net.state_dict().items()}
    torch.save({"model": net.state_dict(), "ema": ema}, tmp_path / "c.pt")
    fresh = WDMUNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)
    assert load_network_weights(fresh, tmp_path / "c.pt") == "ema"
    assert torch.equal(fresh.conv_in.weight, torch.full_like(fresh.conv_in.weight, 0.5))
    assert load_network_weights(fresh, tmp_path / "c.pt", keys=("model",)) == "model"
    assert torch.equal(fresh.conv_in.weight, net.conv_in.weight)
    wider = WDMUNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)
    with pytest.raises(RuntimeError, match=r"c\.pt.*does not fit.*network_def"):
        load_network_weights(wider, tmp_path / "c.pt")


def test_data_geometry_round_trips_through_a_state_dict():
    g = DataGeometry(image_size=(8, 8, 8), intensity_range=(-1000, 400))
    assert g.state_dict() == {}  # nothing known yet: nothing saved
    g.affine = np.diag([1.5, 2.0, 2.5, 1.0])
    h = DataGeometry()
    h.load_state_dict(torch.load(_roundtrip(g.state_dict()), weights_only=True))
    np.testing.assert_array_equal(h.affine, g.affine)
    assert h.shape == [8, 8, 8] and h.intensity_range == [-1000.0, 400.0]


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_sampling_with_other_diffusion_settings_than_trained_is_refused():
    from wdm3d.artifacts import check_diffusion_matches
    from wdm3d.diffusion import WaveletDiffusion

    trained = {"run_config": {"diffusion": WaveletDiffusion().config()}}
    check_diffusion_matches(trained, WaveletDiffusion(), "a.pt")  # the same process
    check_diffusion_matches(trained, WaveletDiffusion(ddpm_variance="fixed_small"), "a.pt")  # a sampling choice
    check_diffusion_matches({"model": {}}, WaveletDiffusion(process="rflow"), "old.pt")  # nothing recorded: no check
    with pytest.raises(
        ValueError, match=r"a\.pt .*'prediction_type': \('sample', 'epsilon'\).*--diffusion#prediction_type \"sample\""
    ):
        check_diffusion_matches(trained, WaveletDiffusion(prediction_type="epsilon"), "a.pt")
    with pytest.raises(ValueError, match=r"'lll_scale': \(3\.0, 1\.0\)"):
        check_diffusion_matches(trained, WaveletDiffusion(lll_scale=1.0), "a.pt")
    flow = {"run_config": {"diffusion": WaveletDiffusion(process="rflow").config()}}
    with pytest.raises(ValueError, match=r"--diffusion#process \"rflow\".*--sampler rflow"):
        check_diffusion_matches(flow, WaveletDiffusion(), "f.pt")
    # config() records a flow map only when there is one: a multi-step checkpoint sampled as a shortcut model is
    # refused too, since the missing key means the constructor's None; and the reverse
    shortcut = WaveletDiffusion(process="rflow", prediction_type="sample", flow_map="shortcut")
    multi_step_process = WaveletDiffusion(process="rflow", prediction_type="sample")
    multi_step = {"run_config": {"diffusion": multi_step_process.config()}}
    assert "flow_map" not in multi_step["run_config"]["diffusion"]
    with pytest.raises(ValueError, match=r"'flow_map': \(None, 'shortcut'\).*--diffusion#flow_map null"):
        check_diffusion_matches(multi_step, shortcut, "jit.pt")
    check_diffusion_matches({"run_config": {"diffusion": shortcut.config()}}, shortcut, "s.pt")
    with pytest.raises(ValueError, match=r"'flow_map': \('shortcut', None\).*--diffusion#flow_map \"shortcut\""):
        check_diffusion_matches({"run_config": {"diffusion": shortcut.config()}}, multi_step_process, "s.pt")


# --- seeds ---------------------------------------------------------------------------------------------------------


def test_derived_seeds_are_fixed_unrelated_for_nearby_inputs_and_in_range():
    from wdm3d.engine import derive_seed

    # manifests record these seeds and synthesis reproduces a sample from (seed, index): the rule must not drift
    assert derive_seed(0, 0) == 6375474604893067239 and derive_seed(7, 3) == 7443599362937997628
    streams = [{derive_seed(seed, i) for i in range(200)} for seed in range(4)]
    assert len(set().union(*streams)) == 4 * 200  # no two (seed, index) pairs share a seed, as seed + index would
    assert all(0 <= v < 2**63 for s in streams for v in s)
    assert derive_seed(-1, 5) == derive_seed(2**63 - 1, 5)  # the base seed is taken modulo 2**63
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(0, -1)
