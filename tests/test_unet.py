import pytest
import torch

from wdm3d.networks import PRESETS, WDMUNet, count_parameters, monai_unet, wdm_unet


def tiny(**kw):
    args = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2, norm_num_groups=4)
    args.update(kw)
    return WDMUNet(**args)


def randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


@pytest.mark.parametrize("preset,wdm_millions", [("wdm_128", 57.91), ("wdm_256", 83.16)])
def test_presets_match_wdm_parameter_counts(preset, wdm_millions):
    # WDM reports 57.91M (128^3) and 83.16M (256^3) for its U-Net with 8 in/out channels
    with torch.device("meta"):
        net = wdm_unet(preset)
    assert round(count_parameters(net) / 1e6, 2) == wdm_millions
    assert PRESETS[preset]["base_channels"] == 64 and PRESETS[preset]["num_res_blocks"] == 2


def test_concatenated_skips_cost_more_parameters():
    with torch.device("meta"):
        additive = count_parameters(wdm_unet("wdm_128"))
        concat = count_parameters(wdm_unet("wdm_128", additive_skips=False))
        monai_net = count_parameters(monai_unet("wdm_128"))
    assert concat > additive * 1.3
    assert monai_net > additive * 1.3


@pytest.mark.parametrize("additive", [True, False])
@pytest.mark.parametrize("mult", [(1,), (1, 2), (1, 2, 3)])
def test_shapes_and_zero_output_at_init(additive, mult):
    net = tiny(channel_mult=mult, additive_skips=additive, in_channels=16, out_channels=8)
    x = torch.randn(2, 16, 8, 8, 8)
    out = net(x, torch.tensor([3, 700]))
    assert out.shape == (2, 8, 8, 8, 8)
    assert out.abs().max().item() == 0.0  # zero-initialised output conv (guided-diffusion style)


def test_output_depends_on_input_and_timestep():
    net = randomise(tiny()).eval()
    x = torch.randn(1, 8, 8, 8, 8)
    a = net(x, torch.tensor([10]))
    b = net(x, torch.tensor([900]))
    c = net(x * 2, torch.tensor([10]))
    assert (a - b).abs().max() > 1e-4
    assert (a - c).abs().max() > 1e-4
    # a scalar timestep broadcasts over the batch; float timesteps work (rectified flow)
    x2 = torch.randn(3, 8, 8, 8, 8)
    assert torch.allclose(net(x2, torch.tensor(10)), net(x2, torch.tensor([10, 10, 10])))
    assert torch.isfinite(net(x2, torch.tensor([1.5, 2.5, 999.9]))).all()


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8, 8)
    t = torch.tensor([5, 500])
    grads = []
    for ckpt in (False, True):
        net = randomise(tiny(use_checkpoint=ckpt)).train()
        net(x, t).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_input_validation():
    net = tiny()
    with pytest.raises(ValueError, match="context"):
        net(torch.randn(1, 8, 8, 8, 8), torch.tensor([1]), context=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"\(B, 8, D, H, W\)"):
        net(torch.randn(1, 4, 8, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 8, 6, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="Unknown preset"):
        wdm_unet("wdm_512")
    with pytest.raises(ValueError, match="norm_num_groups"):
        WDMUNet(base_channels=10, channel_mult=(1,), norm_num_groups=4)


def test_monai_unet_has_the_same_call_signature():
    net = monai_unet("wdm_128", channels=(8, 8), attention_levels=(False, False), norm_num_groups=4)
    out = net(torch.randn(1, 8, 8, 8, 8), torch.tensor([3]), context=None)
    assert out.shape == (1, 8, 8, 8, 8)


# --- cross-attention conditioning ----------------------------------------------------------------------------------


def test_conditioning_off_keeps_the_network_as_it_was():
    plain, explicit = tiny(), tiny(context_dim=None, attention_levels=None, attention_middle=True)
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert not any("attn" in k for k in plain.state_dict())
    with torch.device("meta"):
        assert count_parameters(wdm_unet("wdm_128", context_dim=None)) == 57_914_824


def test_cross_attention_placement_and_zero_init():
    net = tiny(channel_mult=(1, 2, 2), context_dim=16, attention_levels=(False, True, False), head_dim=8)
    from wdm3d.networks.attention import CrossAttentionBlock

    blocks = [name for name, m in net.named_modules() if isinstance(m, CrossAttentionBlock)]
    # level 1: after each of its 2 encoder and 3 decoder residual blocks; and the middle
    assert blocks == ["down.4", "down.6", "middle.1", "up.3.1", "up.4.1", "up.5.1"]  # decoder: level 2 is up.0-2
    anchors = net.attention_anchors(levels=[1])
    assert [(a.path, a.attention) for a in anchors] == [
        ("down.3", "down.4"),
        ("down.5", "down.6"),
        ("middle.0", "middle.1"),
        ("up.3.0", "up.3.1"),
        ("up.4.0", "up.4.1"),
        ("up.5.0", "up.5.1"),
    ]
    assert all(a.attention is None for a in net.attention_anchors(levels=[0, 2], middle=False))
    out = net(torch.randn(2, 8, 8, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 3, 16))
    assert out.abs().max().item() == 0.0  # still zero at initialisation


def test_output_depends_on_context_and_broadcasts():
    net = randomise(tiny(channel_mult=(1, 2), context_dim=16, head_dim=4)).eval()
    x, t = torch.randn(2, 8, 8, 8, 8), torch.tensor([10, 20])
    c1, c2 = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    a = net(x, t, context=c1)
    assert (a - net(x, t, context=c2)).abs().max() > 1e-4
    assert torch.allclose(a, net(x, t, context=c1.expand(2, -1, -1)))


def test_context_validation():
    net = tiny(channel_mult=(1, 2), context_dim=16)
    x, t = torch.randn(2, 8, 8, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"context must have shape \(B, N, 16\) \(context_dim\), got \(2, 3, 12\)"):
        net(x, t, context=torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match="batch size 1 or 2"):
        net(x, t, context=torch.randn(3, 3, 16))
    with pytest.raises(ValueError, match="needs context tokens"):
        net(x, t)
    with pytest.raises(ValueError, match="attention_levels needs context_dim"):
        tiny(attention_levels=(True, False, False))
    with pytest.raises(ValueError, match="one entry per level"):
        tiny(context_dim=16, attention_levels=(True,))
    with pytest.raises(ValueError, match="no cross-attention block"):
        tiny(context_dim=16, attention_levels=(False, False, False), attention_middle=False)
    with pytest.raises(ValueError, match="num_heads=3 must be >= 1 and divide"):
        tiny(context_dim=16, num_heads=3)


def test_gradient_checkpointing_with_context_gives_identical_gradients():
    x, t, c = torch.randn(2, 8, 8, 8, 8), torch.tensor([5, 500]), torch.randn(2, 2, 16)
    grads = []
    for ckpt in (False, True):
        net = randomise(tiny(channel_mult=(1, 2), context_dim=16, head_dim=8, use_checkpoint=ckpt)).train()
        net(x, t, context=c).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_timesteps_must_match_the_batch_and_inputs_must_be_float():
    net = WDMUNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4).eval()
    x = torch.randn(2, 8, 8, 8, 8)
    with torch.no_grad():
        ref = net(x, torch.tensor([7, 7]))
        assert torch.equal(net(x, torch.tensor(7)), ref) and torch.equal(net(x, torch.tensor([7])), ref)
        # a batch-1 x with 3 timesteps broadcast into 3 outputs without an error
        with pytest.raises(ValueError, match=r"timesteps must be a scalar or have shape \(1,\).*got \(3,\)"):
            net(x[:1], torch.tensor([1, 500, 999]))
        with pytest.raises(ValueError, match=r"got \(2, 1\)"):
            net(x, torch.tensor([[1], [2]]))
        with pytest.raises(TypeError, match="floating-point"):
            net(torch.zeros(2, 8, 8, 8, 8, dtype=torch.int64), torch.tensor([1, 2]))
