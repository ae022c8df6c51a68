"""Every bundle's network through MONAI's ``ckpt_export`` (it scripts ``network_def`` from ``configs/inference.json``)
and ``verify_net_in_out`` (the model zoo's data-shape check), built from the bundle's own configs with tiny widths.

The scripted network must give the eager network's output: the checkpoint holds random (non-zero-initialised)
weights, and the TorchScript file is loaded back with ``torch.jit.load``.
"""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

REPO = Path(__file__).resolve().parents[1]

# config overrides (ids as on the command line) that make each bundle's network_def tiny; the metadata's input shape is
# replaced by a small valid one for verify_net_in_out
TINY_UNET = {
    "network_def#base_channels": 8,
    "network_def#channel_mult": [1, 2],
    "network_def#num_res_blocks": 1,
    "network_def#norm_num_groups": 4,
}
TINY_VAE = {"network_def#base_channels": 8, "network_def#num_res_blocks": 1}
BUNDLES = {
    "wdm3d_brats": dict(TINY_UNET),
    "wdm3d_lidc": dict(TINY_UNET),
    "ip_adapter_brats": {  # network_def is the context-conditioned base; its U-Net is network_def#unet
        "context_dim": 16,
        **{k.replace("network_def#", "network_def#unet#"): v for k, v in TINY_UNET.items()},
    },
    "wavelet_vae": dict(TINY_VAE),
    "wfvae": {**TINY_VAE, "network_def#num_mid_blocks": 1},
    # the transformer variant: configs/dit.json on top of inference.json makes network_def a DiT3D
    "wdm3d_brats:dit": {"network_def#hidden_size": 48, "network_def#depth": 2, "network_def#num_heads": 2},
}
UNETS = ("wdm3d_brats", "wdm3d_lidc", "ip_adapter_brats", "wdm3d_brats:dit")  # called as net(x, timesteps, ...)
SHAPE_KEY = "_meta_#network_data_format#inputs#image#spatial_shape"


def _files(bundle: str) -> tuple[list[str], str]:
    """(config files, metadata file) of a bundle, ``"name:variant"`` adding ``configs/variant.json``."""
    name, _, variant = bundle.partition(":")
    configs = REPO / "bundles" / name / "configs"
    files = [str(configs / "inference.json")] + ([str(configs / f"{variant}.json")] if variant else [])
    return files, str(configs / "metadata.json")


def _network(bundle: str, overrides: dict) -> torch.nn.Module:
    """network_def as ckpt_export builds it (inference.json, metadata, the overrides)."""
    config, meta = _files(bundle)
    parser = ConfigParser()
    parser.read_config(config)
    parser.read_meta(meta)
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("network_def")


def _inputs(bundle: str, net: torch.nn.Module) -> list[tuple]:
    """Argument tuples for the network (the scripted one takes the same positional arguments)."""
    if bundle in UNETS:
        x = torch.randn(2, net.in_channels, 8, 8, 8)
        t = torch.tensor([3, 700])
        if bundle == "ip_adapter_brats":  # context: field indices (modality, dataset; the last index is null), tokens
            return [(x, t, None), (x, t, torch.tensor([[2, 0], [4, 1]])), (x, t, torch.randn(1, 2, net.context_dim))]
        return [(x, t), (x, torch.tensor(5))]
    x = torch.randn(1, net.in_channels, 16, 16, 16)
    return [(x, False), (x, True)]


def _assert_same(got, want) -> None:
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want)
        return
    # a VAEOutput: the scripted network returns a plain namedtuple of the same fields
    torch.testing.assert_close(got.reconstruction, want.reconstruction)
    torch.testing.assert_close(got.latent, want.latent)
    torch.testing.assert_close(got.posterior.mean, want.posterior.mean)
    for name in ("logvar", "std"):
        assert (getattr(got.posterior, name) is None) == (getattr(want.posterior, name) is None)
        if getattr(want.posterior, name) is not None:
            torch.testing.assert_close(getattr(got.posterior, name), getattr(want.posterior, name))
    for field in ("enc_coeffs", "dec_coeffs"):
        assert len(getattr(got, field)) == len(getattr(want, field))
        for g, w in zip(getattr(got, field), getattr(want, field)):
            torch.testing.assert_close(g, w)
    assert sorted(got.extra_losses) == sorted(want.extra_losses)
    for name, value in want.extra_losses.items():
        torch.testing.assert_close(got.extra_losses[name], value)


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_ckpt_export_gives_the_eager_output(bundle, tmp_path):
    overrides = BUNDLES[bundle]
    net = _network(bundle, overrides).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every weight off its initialisation (zero-initialised output layers included)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    # as training writes it: {"model", "ema", "optimizer", ...}; inference and the export take the EMA weights
    raw = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"model": raw, "ema": net.state_dict(), "optimizer": {"state": {}}}, tmp_path / "model.pt")

    config, meta = _files(bundle)
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        key_in_ckpt="ema",
        meta_file=meta,
        config_file=config,
        **overrides,
    )
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(tmp_path / "model.ts", _extra_files=extra)
    assert b'"name"' in extra["metadata.json"] and b"network_def" in extra["inference.json"]  # ckpt_export's extras

    # with autograd on, as a user calls it (the scripted Haar transform must be differentiable, not in place)
    for args in _inputs(bundle, net):
        torch.manual_seed(7)  # (a VAE with sample=True draws its noise: the same draws in both)
        want = net(*args)
        torch.manual_seed(7)
        _assert_same(scripted(*args), want)
    if bundle not in UNETS:  # the VAEs' encode and decode are part of the export
        x = _inputs(bundle, net)[0][0]
        posterior = net.encode(x)
        torch.testing.assert_close(scripted.encode(x).mean, posterior.mean)
        torch.testing.assert_close(scripted.decode(posterior.mean), net.decode(posterior.mean))


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_verify_net_in_out_passes(bundle):
    config, meta = _files(bundle)
    parser = ConfigParser()
    parser.read_meta(meta)
    fmt = parser.get_parsed_content("_meta_#network_data_format")
    # the metadata's shape suits the full-size network: divisible by its downsampling, one output per input channel
    full = _network(bundle, {})
    if bundle not in UNETS:
        factor = full.downsample_factor
    else:
        factor = full.patch_size if bundle.endswith(":dit") else 2 ** (len(full.channel_mult) - 1)
    assert all(s % factor == 0 for s in fmt["inputs"]["image"]["spatial_shape"])
    assert fmt["inputs"]["image"]["num_channels"] == full.in_channels
    assert fmt["outputs"]["pred"]["num_channels"] == (full.out_channels if bundle in UNETS else full.in_channels)

    # the U-Nets need timesteps (the command line: --extra_forward_args "{'timesteps': 0}")
    extra = {"timesteps": 0} if bundle in UNETS else {}
    shape = [8, 8, 8] if bundle in UNETS else [16, 16, 16]
    verify_net_in_out(
        net_id="network_def",
        meta_file=meta,
        config_file=config,
        device="cpu",
        extra_forward_args=extra,
        **{SHAPE_KEY: shape},
        **BUNDLES[bundle],
    )


def test_a_wrong_output_channel_count_fails_the_check():
    # the check can fail: a VAE output reads as its reconstruction (shape, dtype), so a wrong metadata count shows
    config, meta = _files("wfvae")
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=meta,
            config_file=config,
            device="cpu",
            **{SHAPE_KEY: [16, 16, 16], "_meta_#network_data_format#outputs#pred#num_channels": 2},
            **BUNDLES["wfvae"],
        )


def test_an_installed_ip_adapter_is_not_scripted_silently():
    from wdm3d.networks import IPAdapter

    net = _network("ip_adapter_brats", BUNDLES["ip_adapter_brats"])
    adapter = IPAdapter(net, image_encoder=None, feature_dim=4)
    with pytest.raises(RuntimeError, match="cannot be compiled with TorchScript"):
        torch.jit.script(adapter)
    with pytest.raises(RuntimeError, match="cannot script an Attention with the processor"):
        torch.jit.script(net)  # the base with the adapter's processors installed
    adapter.remove()
    torch.jit.script(net)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_scripted_haar_transform_is_wdm3d_wavelets(dtype):
    from wdm3d.networks.scripting import haar_dwt3d, haar_idwt3d
    from wdm3d.wavelets import dwt3d, idwt3d

    dwt, idwt = torch.jit.script(haar_dwt3d), torch.jit.script(haar_idwt3d)
    x = torch.randn(2, 3, 8, 6, 4).to(dtype)
    assert torch.equal(dwt(x), dwt3d(x))
    assert torch.equal(idwt(dwt3d(x)), idwt3d(dwt3d(x)))
    if dtype == torch.float64:  # differentiable (the in-place torch path is not, outside its autograd.Function)
        y = torch.randn(1, 16, 2, 2, 2, dtype=dtype, requires_grad=True)
        assert torch.autograd.gradcheck(idwt, (y,))
        assert torch.autograd.gradcheck(dwt, (x[:1, :2, :4, :4, :4].detach().requires_grad_(),))
