"""``wdm3d import-wdm``: WDM-3D's U-Net state dicts (key names of pfriedri/wdm-3d's guided_diffusion/unet.py) into
checkpoints our bundles load.

No real WDM checkpoint is available offline: the WDM side is described here independently of the converter, from
their module tree (``UNetModel`` with resblock_updown, additive skips, no attention, no scale-shift norm), and filled
with random values.
"""

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from wdm3d.artifacts import (
    check_diffusion_matches,
    load_checkpoint,
    load_network_weights,
)
from wdm3d.cli import main
from wdm3d.diffusion import WaveletDiffusion
from wdm3d.engine.wdm_import import (
    WDMImportError,
    import_wdm,
    our_key,
    ours_to_wdm,
    read_wdm_state_dict,
    wdm_key,
    wdm_to_ours,
)
from wdm3d.networks import WDMUNet, count_parameters, wdm_unet

REPO = Path(__file__).resolve().parents[1]


def wdm_tree(base=64, mult=(1, 2, 2, 4, 4), nrb=2, cin=8, cout=8):
    """WDM's UNetModel as (key -> shape) in module order, plus the forward plan [(kind, prefix, resample)].

    Their BraTS/LIDC 128^3 flags: num_channels 64, channel_mult 1,2,2,4,4, num_res_blocks 2, in/out 8 channels,
    additive skips; residual blocks hold in_layers (GroupNorm, SiLU, conv), emb_layers (SiLU, Linear), out_layers
    (GroupNorm, SiLU, Dropout, conv) and a 1x1 skip_connection conv where the width changes.
    """
    emb = 4 * base
    shapes = {}

    def linear(name, i, o):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i), (o,)

    def conv(name, i, o, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i, k, k, k), (o,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def res(prefix, i, o, resample=None):
        norm(f"{prefix}.in_layers.0", i)
        conv(f"{prefix}.in_layers.2", i, o)
        linear(f"{prefix}.emb_layers.1", emb, o)
        norm(f"{prefix}.out_layers.0", o)
        conv(f"{prefix}.out_layers.3", o, o)
        if i != o:
            conv(f"{prefix}.skip_connection", i, o, k=1)
        return ("res", prefix, resample)

    linear("time_embed.0", base, emb)
    linear("time_embed.2", emb, emb)
    conv("input_blocks.0.0", cin, base)
    inputs = [[("conv", "input_blocks.0.0", None)]]
    chans, ch = [base], base
    for level, m in enumerate(mult):
        for _ in range(nrb):
            inputs.append([res(f"input_blocks.{len(inputs)}.0", ch, m * base)])
            ch = m * base
            chans.append(ch)
        if level < len(mult) - 1:
            inputs.append([res(f"input_blocks.{len(inputs)}.0", ch, ch, "down")])
            chans.append(ch)
    middle = [res("middle_block.0", ch, ch), res("middle_block.1", ch, ch)]
    outputs = []
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            chans.pop()
            nxt = chans[-1] if chans else base
            step = [res(f"output_blocks.{len(outputs)}.0", ch, nxt)]
            ch = nxt
            if level and i == nrb:
                step.append(res(f"output_blocks.{len(outputs)}.1", ch, ch, "up"))
            outputs.append(step)
    norm("out.0", ch)
    conv("out.2", base, cout)
    return shapes, (inputs, middle, outputs)


def random_state(shapes, seed=0):
    # N(0, 1), weight matrices scaled by 1/sqrt(fan-in) so that activations stay O(1) through the random network
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for v in state.values():
        if v.ndim > 1:
            v /= math.sqrt(v[0].numel())
    return state


def cheap_state(shapes):
    # right shapes, one stored value per tensor (an expanded scalar: tiny files for the error cases)
    return {k: torch.full((1,), float(i)).expand(s) for i, (k, s) in enumerate(shapes.items())}


def wdm_forward(sd, plan, x, t, base, groups):
    """WDM's UNetModel forward, written from their module semantics on their key names (functional)."""
    inputs, middle, outputs = plan
    half = base // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(
        F.silu(F.linear(temb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
        sd["time_embed.2.weight"],
        sd["time_embed.2.bias"],
    )

    def gn(h, p):
        return F.group_norm(h, groups, sd[f"{p}.weight"], sd[f"{p}.bias"])

    def res(p, h, resample):
        r = F.silu(gn(h, f"{p}.in_layers.0"))
        if resample == "down":
            r, h = F.avg_pool3d(r, 2), F.avg_pool3d(h, 2)
        elif resample == "up":
            r, h = F.interpolate(r, scale_factor=2, mode="nearest"), F.interpolate(h, scale_factor=2, mode="nearest")
        r = F.conv3d(r, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
        r = (
            r
            + F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[..., None, None, None]
        )
        r = F.conv3d(
            F.silu(gn(r, f"{p}.out_layers.0")), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1
        )
        if f"{p}.skip_connection.weight" in sd:
            h = F.conv3d(h, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
        return h + r

    def run(step, h):
        for kind, p, resample in step:
            h = F.conv3d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=1) if kind == "conv" else res(p, h, resample)
        return h

    hs, h = [], x
    for step in inputs:
        h = run(step, h)
        hs.append(h)
    h = run(middle, h)
    for step in outputs:
        h = run(step, (h + hs.pop()) / 2)
    return F.conv3d(F.silu(gn(h, "out.0")), sd["out.2.weight"], sd["out.2.bias"], padding=1)


@pytest.fixture(scope="module")
def brats128(tmp_path_factory):
    """A wdm_128 state dict with WDM's keys and shapes (their BraTS 128 config), random values, saved bare as WDM's
    TrainLoop.save does (brats_NNNNNN.pt)."""
    shapes, _ = wdm_tree()
    state = random_state(shapes)
    path = tmp_path_factory.mktemp("wdm") / "brats_1200000.pt"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def converted(brats128, tmp_path_factory):
    path, _ = brats128
    out = import_wdm(path, "wdm_128", tmp_path_factory.mktemp("models"))
    return out, load_checkpoint(out)


def test_the_key_mapping_is_a_bijection_onto_wdms_tree():
    shapes, _ = wdm_tree()
    with torch.device("meta"):
        net = wdm_unet("wdm_128")
    ours = net.state_dict()
    assert len(shapes) == len(ours) == 368
    assert sum(wdm_key(k) != k for k in ours) == 364  # only time_embed.* share names
    assert {wdm_key(k): tuple(v.shape) for k, v in ours.items()} == shapes
    assert all(our_key(wdm_key(k)) == k for k in ours)
    assert wdm_key("down.0.conv1.weight") == "input_blocks.1.0.in_layers.2.weight"
    assert our_key("out.2.bias") == "conv_out.bias"
    with pytest.raises(KeyError, match="no counterpart"):
        wdm_key("down.3.attn.to_q.weight")
    with pytest.raises(KeyError, match="not a key of WDM"):
        our_key("input_blocks.0.0.in_layers.0.weight")


def test_wdm_256_tree_maps_too():
    shapes, _ = wdm_tree(mult=(1, 2, 2, 4, 4, 4))
    with torch.device("meta"):
        net = wdm_unet("wdm_256")
    assert {wdm_key(k): tuple(v.shape) for k, v in net.state_dict().items()} == shapes
    assert sum(math.prod(s) for s in shapes.values()) == count_parameters(net) == 83_158_728


def test_converted_checkpoint_loads_strictly_and_maps_back_identically(brats128, converted):
    src_path, src = brats128
    out, ckpt = converted
    assert out.name == "brats_1200000_wdm3d.pt"
    net = wdm_unet("wdm_128", in_channels=8)
    net.load_state_dict(ckpt["model"], strict=True)
    assert count_parameters(net) == sum(t.numel() for t in src.values()) == 57_914_824
    loaded = net.state_dict()
    for k, v in loaded.items():
        assert torch.equal(v, src[wdm_key(k)]), k
    back = ours_to_wdm(ckpt["model"])
    assert back.keys() == src.keys()
    assert all(torch.equal(back[k], src[k]) for k in src)
    # the bundle's own loading path takes it (weights under "model": WDM kept no EMA)
    assert load_network_weights(wdm_unet("wdm_128"), out, ("ema", "model", "network")) == "model"

    record = ckpt["conversion"]
    assert record["source_file"] == src_path.name
    assert record["source_sha256"] == hashlib.sha256(src_path.read_bytes()).hexdigest()
    assert record["preset"] == "wdm_128" and record["num_tensors"] == 368
    assert datetime.fromisoformat(record["date"]).tzinfo is not None
    geometry = ckpt["geometry"]
    assert geometry["shape"].tolist() == [128] * 3 and torch.diag(geometry["affine"]).tolist() == [2.0, 2.0, 2.0, 1.0]
    assert geometry["intensity_range"].tolist() == [0.0, 1.0]


def test_converted_checkpoint_samples_only_with_wdms_diffusion(converted):
    out, ckpt = converted

    def parsed(*overlay):
        files = [str(REPO / "bundles/wdm3d_brats/configs" / f) for f in ["inference.json", *overlay]]
        return ConfigParser(ConfigParser.load_config_files(files))

    parser = parsed("wdm_paper.json")  # the bundle's inference with the WDM-recipe overlay
    check_diffusion_matches(ckpt, parser.get_parsed_content("diffusion"), out)  # no error
    assert parser.get_parsed_content("network_def#in_channels") == 8
    # the bundle's own default (the quality benchmark's winner) is another process: refused, naming the overlay
    with pytest.raises(ValueError, match="add configs/wdm_paper.json"):
        check_diffusion_matches(ckpt, parsed().get_parsed_content("diffusion"), out)
    eps = WaveletDiffusion(prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        check_diffusion_matches(ckpt, eps, out)


def test_tiny_forward_equals_wdms_forward_on_the_source_weights():
    # same mapping at a narrow width: catches two same-shaped weights swapped, which shape checks cannot
    base, mult, groups = 16, (1, 2, 2), 8
    shapes, plan = wdm_tree(base=base, mult=mult)
    src = random_state(shapes, seed=1)
    net = WDMUNet(base_channels=base, channel_mult=mult, norm_num_groups=groups).eval()
    net.load_state_dict(wdm_to_ours(src, net), strict=True)
    x, t = torch.randn(2, 8, 8, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        ours = net(x, t)
        ref = wdm_forward(src, plan, x, t, base, groups)
    assert ref.abs().mean() > 1e-2  # not trivially zero
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_the_bundle_inference_samples_the_converted_checkpoint(converted, tmp_path):
    # the brats bundle's inference with the WDM-recipe overlay, as docs/import_wdm.md runs it (32^3, one step)
    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigWorkflow

    out, _ = converted
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(ref))
    configs = REPO / "bundles/wdm3d_brats/configs"
    wf = ConfigWorkflow(
        config_file=[str(configs / "inference.json"), str(configs / "wdm_paper.json")],
        meta_file=str(configs / "metadata.json"),
        workflow_type="infer",
        run_id="inference",
        checkpoint=str(out),
        output_dir=str(tmp_path / "run"),
        reference_image=str(ref),
        image_size=[32, 32, 32],
        num_samples=1,
        num_steps=1,
        autocast=None,
        use_ema=False,
        mlflow=False,
        device="$torch.device('cpu')",
    )
    wf.initialize()
    wf.run()
    manifest = json.loads((tmp_path / "run/samples/manifest.json").read_text())
    assert manifest["checkpoint"] == str(out.resolve()) and manifest["weights"] == "model"
    assert manifest["sampler"] == "ddpm" and manifest["diffusion"]["prediction_type"] == "sample"
    vol = nib.load(str(tmp_path / "run/samples" / manifest["samples"][0]["nifti"]))
    assert vol.shape == (32, 32, 32) and np.isfinite(vol.get_fdata()).all()


def test_converting_twice_is_refused(converted, tmp_path):
    out, ckpt = converted
    with pytest.raises(WDMImportError, match="converting twice") as err:
        import_wdm(out, "wdm_128", tmp_path)
    assert str(out) in str(err.value)
    bare = tmp_path / "ours_bare.pt"  # a bare state dict in our key layout
    torch.save(cheap_state({k: tuple(v.shape) for k, v in ckpt["model"].items()}), bare)
    with pytest.raises(WDMImportError, match="already in wdm3d's key layout") as err:
        import_wdm(bare, "wdm_128", tmp_path / "o")
    assert str(bare) in str(err.value) and "conv_in.weight" in str(err.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change", ["missing", "renamed", "reshaped"])
def test_a_file_that_is_not_this_wdm_unet_names_the_key_and_the_file(tmp_path, change):
    shapes, _ = wdm_tree()
    state = cheap_state(shapes)
    key = "output_blocks.4.0.out_layers.3.weight"
    if change == "missing":
        del state[key]
    elif change == "renamed":
        state["output_blocks.4.0.out_layers.4.weight"] = state.pop(key)
    else:
        state[key] = torch.zeros(1).expand(4, 4, 3, 3, 3)
    path = tmp_path / f"brats_{change}.pt"
    torch.save(state, path)
    with pytest.raises(WDMImportError) as err:
        import_wdm(path, "wdm_128", tmp_path / "out")
    msg = str(err.value)
    assert str(path) in msg and repr(key) in msg
    if change == "renamed":
        assert "'output_blocks.4.0.out_layers.4.weight'" in msg
    if change == "reshaped":
        assert "(4, 4, 3, 3, 3)" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_preset_names_the_first_missing_key(tmp_path):
    shapes, _ = wdm_tree()
    path = tmp_path / "lidc-idri_1200000.pt"
    torch.save(cheap_state(shapes), path)
    with pytest.raises(WDMImportError, match=r"--preset") as err:
        import_wdm(path, "wdm_256", tmp_path)
    assert str(path) in str(err.value) and "has no 'input_blocks." in str(err.value)


@pytest.mark.parametrize("content", ["garbage", "list", "non_tensor", "empty"])
def test_a_file_that_is_no_state_dict_gets_a_clear_error_naming_it(tmp_path, content):
    path = tmp_path / f"{content}.pt"
    if content == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    else:
        obj = {"list": [1, 2, 3], "non_tensor": {"input_blocks.0.0.weight": "x"}, "empty": {}}[content]
        torch.save(obj, path)
    with pytest.raises(WDMImportError) as err:
        read_wdm_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg
    assert {
        "garbage": "not a readable PyTorch checkpoint",
        "list": "not a WDM-3D checkpoint",
        "non_tensor": "'input_blocks.0.0.weight' is a str",
        "empty": "empty dict",
    }[content] in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_wdm_state_dict(tmp_path / "absent.pt")


def test_wrapped_and_module_prefixed_files_are_unwrapped(tmp_path):
    shapes, _ = wdm_tree()
    state = cheap_state(shapes)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    read = read_wdm_state_dict(path)
    assert read.keys() == state.keys()
    out = import_wdm(path, "wdm_128", tmp_path / "out", name="x.pt", spacing=1.5)
    ckpt = load_checkpoint(out)
    assert torch.diag(ckpt["geometry"]["affine"]).tolist() == [1.5, 1.5, 1.5, 1.0]
    with pytest.raises(FileExistsError, match="overwrite"):
        import_wdm(path, "wdm_128", tmp_path / "out", name="x.pt")


def test_cli_converts_end_to_end_and_exits_2_on_bad_input(tmp_path, capsys):
    shapes, _ = wdm_tree()
    state = cheap_state(shapes)
    src = tmp_path / "brats_1200000.pt"
    torch.save(state, src)
    out = tmp_path / "models"
    assert main(["import-wdm", str(src), "--preset", "wdm_128", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    converted = out / "brats_1200000_wdm3d.pt"
    assert str(converted) in printed and "wdm3d_brats/configs/wdm_paper.json" in printed  # WDM's recipe pinned
    net = wdm_unet("wdm_128")
    net.load_state_dict(load_checkpoint(converted)["model"], strict=True)
    assert torch.equal(net.state_dict()["up.2.1.conv2.weight"], state[wdm_key("up.2.1.conv2.weight")])
    assert json.loads(json.dumps(load_checkpoint(converted)["conversion"]))["source_file"] == src.name

    assert main(["import-wdm", str(converted), "--preset", "wdm_128", "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wdm3d import-wdm:") and "converting twice" in err and str(converted) in err
    assert main(["import-wdm", str(src), "--preset", "wdm_128", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 nope")
    assert main(["import-wdm", str(garbage), "--preset", "wdm_128", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(garbage) in err and "not a readable PyTorch checkpoint" in err
