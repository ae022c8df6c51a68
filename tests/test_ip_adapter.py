import copy
import re

import pytest
import torch
from torch import nn

from wdm3d.diffusion import WaveletDiffusion
from wdm3d.diffusion.guidance import ClassifierFreeGuidance
from wdm3d.networks import RandomConv3dFeatures, WDMUNet
from wdm3d.networks.attention import Attention, AttnProcessor, ContextEmbedding, CrossAttentionBlock
from wdm3d.networks.ip_adapter import (
    ConditionDropout,
    GlobalGridProjection,
    GlobalSpatialProjection,
    ImageProjection,
    IPAdapter,
    PerceiverResampler,
    sincos_position_3d,
    weights_fingerprint,
)
from wdm3d.networks.positions import PLACE_DIM, place_features, volume_position_3d

VOCAB = {"modality": ["t1n", "t2w", "t2f", "t1c"], "dataset": ["brats", "lidc"]}
CTX = 16


def randomise(module: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_base(context_dim=CTX, seed=0, base_channels=8, **kw) -> WDMUNet:
    """A 'trained' base: random weights everywhere (zero-initialised layers included)."""
    args = dict(
        base_channels=base_channels,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_num_groups=4,
        context_dim=context_dim,
        head_dim=8,
    )
    args.update(kw)
    return randomise(WDMUNet(**args), seed)


def tiny_encoder() -> nn.Module:
    """A small random conv encoder: (B, 1, 16, 16, 16) -> (B, 8, 4, 4, 4)."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv3d(1, 8, 3, stride=2, padding=1), nn.SiLU(), nn.Conv3d(8, 8, 3, stride=2, padding=1))


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, 8, 8, 8, generator=g)
    t = torch.tensor([10, 700][:batch])
    ctx = torch.randn(batch, 2, CTX, generator=g)
    ref = torch.randn(batch, 1, 16, 16, 16, generator=g)
    return x, t, ctx, ref


# --- installation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context_dim", [CTX, None])
@pytest.mark.parametrize("projection", ["linear", "perceiver"])
def test_installation_leaves_the_base_unchanged(context_dim, projection):
    base = tiny_base(context_dim)
    x, t, ctx, ref = inputs()
    ctx = ctx if context_dim else None
    with torch.no_grad():
        expected = base(x, t, context=ctx)
        adapter = IPAdapter(base, tiny_encoder(), feature_dim=8, projection=projection, token_dim=CTX).eval()
        assert torch.equal(adapter(x, t, context=ctx, image=ref, scale=0.0), expected)
        assert torch.equal(adapter(x, t, context=ctx), expected)  # no image: the base
        zero_tokens = torch.zeros(2, adapter.num_tokens, CTX)  # a dropped image prompt is exactly the base too
        assert torch.equal(adapter(x, t, context=ctx, image_tokens=zero_tokens, scale=1.0), expected)
        at_one = adapter(x, t, context=ctx, image=ref, scale=1.0)
        assert torch.equal(base(x, t, context=ctx), expected)  # the prompt does not outlive the call
    if context_dim is None:
        # only added blocks, zero-initialised: unchanged at lambda = 1 too
        assert len(adapter.ip_layers) == 0 and len(adapter.added_blocks) > 0
        assert torch.equal(at_one, expected)
    else:
        # image attention through K' / V' (copies of K / V) at the base's sites changes the output at once
        assert len(adapter.ip_layers) == 4 and len(adapter.added_blocks) == 0  # down.3, middle.1, up.0.1, up.1.1
        assert (at_one - expected).abs().max() > 1e-4
    assert adapter.num_tokens == (4 if projection == "linear" else 16)


def test_base_output_does_not_depend_on_being_frozen():
    # torch.matmul folds a transposed (B, L, C) input into one mm only when the weight needs no gradient; the
    # attention tokens are contiguous so that the base, frozen by the adapter, computes bit for bit what it did
    base = tiny_base(CTX)
    x, t, ctx, _ = inputs()
    with torch.no_grad():
        trainable = base(x, t, context=ctx)
        frozen = base.requires_grad_(False)(x, t, context=ctx)
    assert torch.equal(trainable, frozen)


def test_perturbed_added_blocks_change_the_output_and_remove_restores_the_base():
    base = tiny_base(None)
    x, t, _, ref = inputs()
    with torch.no_grad():
        expected = base(x, t)
        adapter = IPAdapter(base, tiny_encoder(), feature_dim=8, token_dim=CTX, added_levels=[0, 1], added_middle=True)
        assert sorted(adapter.added_blocks) == sorted(
            k.replace(".", ":") for k in ["down.0", "down.2", "middle.0", "up.0.0", "up.1.0", "up.2.0", "up.3.0"]
        )
        randomise(adapter.added_blocks, seed=3)
        changed = adapter(x, t, image=ref)
        assert (changed - expected).abs().max() > 1e-4
        half = adapter(x, t, image=ref, scale=0.5)
        assert (half - expected).abs().max() < (changed - expected).abs().max()
        assert torch.equal(adapter(x, t, image=ref, scale=0.0), expected)
        # per-call scale does not change the default
        assert adapter.scale == 1.0 and torch.equal(adapter(x, t, image=ref), changed)
        restored = adapter.remove()
        assert restored is base and torch.equal(base(x, t), expected)


def test_processor_swap_is_outside_the_module_tree():
    base = tiny_base(CTX)
    keys = list(base.state_dict())
    n_params = sum(p.numel() for p in base.parameters())
    adapter = IPAdapter(base, tiny_encoder(), feature_dim=8)
    assert list(base.state_dict()) == keys and sum(p.numel() for p in base.parameters()) == n_params
    attn = base.get_submodule("down.3.attn")
    assert attn.processor is adapter.ip_layers["down:3:attn"]
    assert torch.equal(attn.processor.to_k_ip.weight, attn.to_k.weight)
    assert torch.equal(attn.processor.to_v_ip.weight, attn.to_v.weight)
    assert attn.processor.to_k_ip.bias is None and attn.processor.to_v_ip.bias is None
    with pytest.raises(ValueError, match="already has an IP-Adapter installed"):
        IPAdapter(base, tiny_encoder(), feature_dim=8)
    with pytest.raises(ValueError, match="level 1 already has cross-attention"):
        IPAdapter(tiny_base(CTX), tiny_encoder(), feature_dim=8, added_levels=[1])
    with pytest.raises(ValueError, match="token_dim=16"):
        IPAdapter(tiny_base(CTX), tiny_encoder(), feature_dim=8, token_dim=32)
    with pytest.raises(ValueError, match="feature_dim"):
        IPAdapter(tiny_base(CTX), lambda v: v.mean((2, 3, 4)))
    adapter.remove()
    assert isinstance(attn.processor, AttnProcessor)


# --- training -------------------------------------------------------------------------------------------------------


def mixed_adapter(seed=0, **kw):
    """Base with context at level 1 and the middle; the adapter adds blocks at level 0."""
    base = tiny_base(CTX, seed=seed, **kw)
    return base, IPAdapter(base, tiny_encoder(), feature_dim=8, added_levels=[0])


def test_training_changes_only_the_adapter():
    base, adapter = mixed_adapter()
    embedding = ContextEmbedding(VOCAB, CTX)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in adapter.image_encoder.state_dict().items()}
    trainable = adapter.trainable_parameters()
    assert {id(p) for p in trainable} == {
        id(p) for m in (adapter.image_proj, adapter.ip_layers, adapter.added_blocks) for p in m.parameters()
    } | {id(adapter.null_tokens)}
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    dropout = ConditionDropout(0.3, 0.3, 0.3)
    adapter.train()
    assert not adapter.image_encoder.encoder.training and base.training
    g = torch.Generator().manual_seed(0)
    adapter_before = copy.deepcopy(adapter.adapter_state_dict())
    for step in range(3):
        x, t, _, ref = inputs(seed=step)
        ctx = embedding({"modality": ["t2w", "t1c"], "dataset": "brats"}).detach()
        dropped = dropout(adapter.encode_image(ref), ctx, embedding.null(1).detach(), g, adapter.null_image_tokens(1))
        out = adapter(x, t, context=dropped.context, image_tokens=dropped.image_tokens)
        loss = (out - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            adapter_ids = {id(p) for p in trainable}
            for name, p in adapter.named_parameters():
                if id(p) in adapter_ids:  # (in a fresh added block only to_out's gradient is non-zero)
                    assert p.grad is not None, name
                else:
                    assert p.grad is None, name
            for part in adapter.adapter_modules().values():
                assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
            assert dropped.drop_image.any() and adapter.null_tokens.grad.abs().sum() > 0  # the null prompt learns
        opt.step()
    assert all(not p.requires_grad for p in base.parameters())
    assert all(not p.requires_grad for p in adapter.image_encoder.parameters())
    after = base.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(encoder_before[k], v) for k, v in adapter.image_encoder.state_dict().items())
    # ... while the adapter did learn
    changed = [
        k
        for k, v in adapter.adapter_state_dict()["ip_adapter"].items()
        if not torch.equal(v, adapter_before["ip_adapter"][k])
    ]
    assert changed


def test_interleaved_forwards_and_backwards_keep_their_own_prompts():
    # the prompt is an argument of the call (and of the checkpointed blocks), so a backward recomputes with its own
    # forward's prompt even after another forward ran, and nothing of a call is left behind in the base
    def flat_grads(adapter):
        out = torch.cat([p.grad.flatten() for p in adapter.trainable_parameters() if p.grad is not None])
        adapter.zero_grad(set_to_none=True)
        return out

    grads = {}
    for ckpt in (False, True):
        base, adapter = mixed_adapter(use_checkpoint=ckpt)
        randomise(adapter.added_blocks, seed=5)
        adapter.train()
        x, t, ctx, ref = inputs()
        with torch.no_grad():
            plain = base(x, t, context=ctx)
        first = adapter(x, t, context=ctx, image=ref, scale=0.7).pow(2).mean()
        second = adapter(x, t, context=ctx, image=ref.flip(-1), scale=0.3).pow(2).mean()
        with torch.no_grad():
            assert torch.equal(base(x, t, context=ctx), plain)  # between calls the installed base is the base
        first.backward()
        grads[ckpt, "first"] = flat_grads(adapter)
        second.backward()
        grads[ckpt, "second"] = flat_grads(adapter)
        adapter(x, t, context=ctx, image=ref, scale=0.7).pow(2).mean().backward()  # the first call on its own
        grads[ckpt, "alone"] = flat_grads(adapter)
    for ckpt in (False, True):
        assert torch.allclose(grads[ckpt, "first"], grads[ckpt, "alone"], rtol=1e-5, atol=1e-8)
        assert not torch.allclose(grads[ckpt, "first"], grads[ckpt, "second"], rtol=1e-3)
        assert torch.allclose(grads[ckpt, "first"], grads[False, "first"], rtol=1e-4, atol=1e-7)


def test_each_sample_of_a_batch_has_its_own_prompt_and_lambda():
    base, adapter = mixed_adapter()
    randomise(adapter.added_blocks, seed=5)
    for m in adapter.adapter_modules().values():
        randomise(m, seed=6, std=0.5)
    x, t, ctx, ref = inputs()
    with torch.no_grad():
        both = adapter(x, t, context=ctx, image=ref, scale=torch.tensor([0.7, 0.3]))
        for i, lam in enumerate((0.7, 0.3)):  # each sample alone, with its own prompt and lambda
            alone = adapter(x[i : i + 1], t[i : i + 1], context=ctx[i : i + 1], image=ref[i : i + 1], scale=lam)
            assert torch.allclose(both[i : i + 1], alone, atol=1e-5)
        swapped = adapter(x, t, context=ctx, image=ref.flip(0), scale=torch.tensor([0.7, 0.3]))
        assert (swapped - both).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4  # the prompts differ per sample
        # lambda 0 for one sample: that sample is exactly the base, the other one is conditioned
        mixed = adapter(x, t, context=ctx, image=ref, scale=torch.tensor([0.0, 0.7]))
        plain = base(x, t, context=ctx)
        assert torch.equal(mixed[0], plain[0]) and (mixed[1] - plain[1]).abs().max() > 1e-4
        with pytest.raises(ValueError, match="one per sample"):
            adapter(x, t, context=ctx, image=ref, scale=torch.ones(3))


def test_no_state_survives_a_call_and_threads_do_not_share_prompts():
    from concurrent.futures import ThreadPoolExecutor  # (only this test runs threads)

    base, adapter = mixed_adapter()
    randomise(adapter.added_blocks, seed=5)
    x, t, ctx, ref = inputs()
    before = set(vars(adapter))
    with torch.no_grad():
        expected = [adapter(x, t, context=ctx, image=r, scale=s) for r, s in ((ref, 0.7), (ref.flip(-1), 0.4))]
        # nothing of the calls is kept: no tensor in the plain attributes of the adapter, its processors or the base
        for obj in [adapter, *adapter.ip_layers.values(), *base.modules()]:
            loose = [k for k, v in vars(obj).items() if isinstance(v, torch.Tensor)]
            assert not loose, (type(obj).__name__, loose)
        assert set(vars(adapter)) == before
        with ThreadPoolExecutor(2) as pool:  # concurrent calls with different prompts: each gets its own output
            prompts = [(ref, 0.7), (ref.flip(-1), 0.4)] * 3
            jobs = [pool.submit(adapter, x, t, context=ctx, image=r, scale=s) for r, s in prompts]
            outs = [j.result() for j in jobs]
        for i, out in enumerate(outs):
            assert torch.allclose(out, expected[i % 2], atol=1e-6)
        twin = copy.deepcopy(adapter)  # a copy is installed on its own copy of the base
        assert twin.base is not base
        assert twin.base.get_submodule("down.3.attn").processor is twin.ip_layers["down:3:attn"]
        assert torch.equal(twin(x, t, context=ctx, image=ref, scale=0.7), expected[0])
        twin.remove()
        assert torch.equal(adapter(x, t, context=ctx, image=ref, scale=0.7), expected[0])  # the original stays


# --- saving and loading ---------------------------------------------------------------------------------------------


def test_saved_adapter_reproduces_outputs_on_a_fresh_base(tmp_path):
    base, adapter = mixed_adapter()
    for m in adapter.adapter_modules().values():
        randomise(m, seed=11, std=0.05)
    x, t, ctx, ref = inputs()
    with torch.no_grad():
        expected = adapter(x, t, context=ctx, image=ref, scale=0.8)
    path = adapter.save_adapter(tmp_path / "adapters" / "ip.pt")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["ip.pt"]  # no temporary file left
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"image_proj", "ip_adapter", "meta"}
    assert saved["meta"]["image_encoder"] == weights_fingerprint(tiny_encoder())  # what the weights only fit
    assert (
        saved["meta"]["base"]
        == weights_fingerprint(tiny_base(CTX, seed=0))
        != weights_fingerprint(tiny_base(CTX, seed=1))
    )
    assert {
        "down.3.attn.to_k_ip.weight",
        "middle.1.attn.to_v_ip.weight",
        "down.0.ip_block.attn.to_q.weight",
        "up.3.0.ip_block.norm.weight",
    } <= set(saved["ip_adapter"])
    assert all(v.device.type == "cpu" for v in saved["ip_adapter"].values())

    fresh_base = tiny_base(CTX, seed=0)  # the same base weights, a new object
    torch.manual_seed(123)  # a different random adapter initialisation
    fresh = IPAdapter(fresh_base, tiny_encoder(), feature_dim=8, added_levels=[0])
    with torch.no_grad():
        assert not torch.equal(fresh(x, t, context=ctx, image=ref, scale=0.8), expected)
        fresh.load_adapter(path)
        assert torch.equal(fresh(x, t, context=ctx, image=ref, scale=0.8), expected)


def test_wrong_base_gives_an_error_naming_the_key(tmp_path):
    _, adapter = mixed_adapter()
    path = adapter.save_adapter(tmp_path / "ip.pt")
    wider = tiny_base(CTX, base_channels=16)
    other = IPAdapter(wider, tiny_encoder(), feature_dim=8, added_levels=[0])
    msg = (
        re.escape("ip_adapter: 'down.3.attn.to_k_ip.weight' has shape (16, 16) in ")
        + ".*ip.pt"
        + re.escape(" but (32, 16) in this base")
    )
    with pytest.raises(ValueError, match=msg):
        other.load_adapter(path)
    # another adapter configuration on the same architecture: the first missing key is named
    base = tiny_base(CTX)
    no_added = IPAdapter(base, tiny_encoder(), feature_dim=8)
    with pytest.raises(
        ValueError,
        match=r"ip_adapter: .*ip\.pt has 'down.0.ip_block.norm.weight' \(shape \(8,\)\) that this base lacks",
    ):
        no_added.load_adapter(path)
    # ... and a key this adapter has but the file lacks
    path_without = no_added.save_adapter(tmp_path / "without_added.pt")
    _, with_added = mixed_adapter()
    with pytest.raises(
        ValueError, match=r"ip_adapter: 'down.0.ip_block.norm.weight' \(shape \(8,\)\) of this base is missing"
    ):
        with_added.load_adapter(path_without)
    with pytest.raises(ValueError, match="expected keys 'image_proj' and 'ip_adapter'"):
        no_added.load_adapter_state_dict({"ip_adapter": {}})
    broken = no_added.adapter_state_dict()
    broken["image_proj"]["proj.weight"] = [0.0]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"image_proj: 'proj.weight' in .*broken\.pt is a list, not a tensor"):
        no_added.load_adapter(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError):
        no_added.load_adapter(tmp_path / "missing.pt")


def test_weights_fingerprint_sees_every_value_and_takes_any_buffer():
    net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))  # 0-d int64 buffer num_batches_tracked
    fp = weights_fingerprint(net)
    assert fp == weights_fingerprint(copy.deepcopy(net)) and len(fp) == 64
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0, 0] += 1e-7
    assert weights_fingerprint(net) != fp
    assert weights_fingerprint(net.bfloat16()) != weights_fingerprint(net.float())
    assert weights_fingerprint(nn.SiLU()) is None and weights_fingerprint(None) is None


def test_an_adapter_file_is_refused_with_another_image_encoder(tmp_path):
    base, adapter = mixed_adapter()
    randomise(adapter.image_proj, seed=3)
    path = adapter.save_adapter(tmp_path / "ip.pt")
    other_encoder = randomise(tiny_encoder(), seed=9)  # same architecture, other weights
    other = IPAdapter(tiny_base(CTX, seed=0), other_encoder, feature_dim=8, added_levels=[0])
    before = copy.deepcopy(other.adapter_state_dict())
    with pytest.raises(ValueError, match=r"ip\.pt was trained with another image encoder \(Sequential with weights"):
        other.load_adapter(path)
    assert all(torch.equal(v, before["image_proj"][k]) for k, v in other.adapter_state_dict()["image_proj"].items())
    other.load_adapter(path, check_encoder=False)  # on purpose
    assert torch.equal(
        other.adapter_state_dict()["image_proj"]["proj.weight"],
        adapter.adapter_state_dict()["image_proj"]["proj.weight"],
    )
    # another base (e.g. fine-tuned): loads, with a warning
    on_other_base = IPAdapter(tiny_base(CTX, seed=1), tiny_encoder(), feature_dim=8, added_levels=[0])
    with pytest.warns(UserWarning, match="trained on a base with other weights"):
        on_other_base.load_adapter(path)
    # files written before the metadata existed still load
    legacy = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "meta"}
    torch.save(legacy, tmp_path / "legacy.pt")
    other.load_adapter(tmp_path / "legacy.pt")


# --- condition dropout and guidance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rates", [(0.05, 0.05, 0.05), (0.2, 0.1, 0.3)])
def test_condition_dropout_rates_are_honoured(rates):
    n = 200_000
    drop_image, drop_context = ConditionDropout(*rates).masks(n, generator=torch.Generator().manual_seed(0))
    image_only = (drop_image & ~drop_context).float().mean().item()
    context_only = (drop_context & ~drop_image).float().mean().item()
    both = (drop_image & drop_context).float().mean().item()
    for observed, expected in zip((image_only, context_only, both), rates):
        assert abs(observed - expected) < 5 * (expected * (1 - expected) / n) ** 0.5 + 1e-4, (observed, expected)


def test_condition_dropout_replaces_tokens_and_context():
    tokens, ctx = torch.randn(64, 4, CTX), torch.randn(64, 2, CTX)
    null = torch.randn(1, 2, CTX)
    out = ConditionDropout(0.25, 0.25, 0.25)(tokens, ctx, null, generator=torch.Generator().manual_seed(1))
    assert out.drop_image.any() and out.drop_context.any() and not (out.drop_image | out.drop_context).all()
    assert torch.equal(out.image_tokens[out.drop_image], torch.zeros_like(tokens[out.drop_image]))
    assert torch.equal(out.image_tokens[~out.drop_image], tokens[~out.drop_image])
    assert torch.equal(out.context[out.drop_context], null.expand(int(out.drop_context.sum()), -1, -1))
    assert torch.equal(out.context[~out.drop_context], ctx[~out.drop_context])
    with pytest.raises(ValueError, match="null_context"):
        ConditionDropout()(tokens, ctx)
    with pytest.raises(ValueError, match="<= 1"):
        ConditionDropout(0.5, 0.5, 0.5)


def test_guidance_wrapper():
    base, adapter = mixed_adapter()
    for m in adapter.adapter_modules().values():
        randomise(m, seed=4, std=0.05)
    adapter.eval()
    embedding = ContextEmbedding(VOCAB, CTX)
    x, t, _, ref = inputs()
    with torch.no_grad():
        ctx = embedding({"modality": ["t2w", "t2f"], "dataset": "brats"})
        null = embedding.null(1)
        guided = ClassifierFreeGuidance(adapter, guidance_scale=1.0, null_context=null)
        tokens = adapter.encode_image(ref[:1])
        prompt = {"image_tokens": tokens, "image_scale": 0.7}
        cond = adapter(x, t, context=ctx, image=ref[:1], scale=0.7)
        assert torch.equal(guided(x, t, context=ctx, **prompt), cond)
        assert torch.equal(guided(x, t, context=ctx), base(x, t, context=ctx))  # no prompt in the call: the base
        # g = 3: uncond + g (cond - uncond), both branches in one batch; the unconditional branch is the base
        # (the learned null prompt starts at zero: exactly the base)
        uncond = base(x, t, context=null)
        guided.guidance_scale = 3.0
        expected = uncond + 3.0 * (cond - uncond)
        assert torch.allclose(guided(x, t, context=ctx, **prompt), expected, atol=1e-5)
        guided.batched = False
        assert torch.allclose(guided(x, t, context=ctx, **prompt), expected, atol=1e-5)
        # guiding on the image only keeps the context in the unconditional branch
        image_only = ClassifierFreeGuidance(adapter, 2.0, drop=("image",))
        plain = base(x, t, context=ctx)
        assert torch.allclose(image_only(x, t, context=ctx, **prompt), plain + 2.0 * (cond - plain), atol=1e-5)
        # a trained null prompt is what the unconditional branch uses (one lambda per sample works too)
        adapter.null_tokens.copy_(torch.randn_like(adapter.null_tokens))
        null_out = adapter(x, t, context=ctx, image_tokens=adapter.null_image_tokens(2), scale=0.7)
        assert (null_out - plain).abs().max() > 1e-4
        per_sample = {"image_tokens": tokens, "image_scale": torch.tensor([0.7, 0.7])}
        guided_out = image_only(x, t, context=ctx, **per_sample)
        assert torch.allclose(guided_out, null_out + 2.0 * (cond - null_out), atol=1e-5)
        adapter.null_tokens.zero_()
        # a context-only base works too
        on_base = ClassifierFreeGuidance(base, 2.0, null_context=null)
        assert torch.allclose(on_base(x, t, context=ctx), uncond + 2.0 * (plain - uncond), atol=1e-5)

    # as the model of WaveletDiffusion.sample: g = 1 samples exactly what the adapter samples
    diffusion = WaveletDiffusion()
    kw = dict(
        image_shape=(1, 16, 16, 16), num_samples=2, sampler="ddim", num_steps=2, seed=0, progress=False, context=ctx
    )
    guided.guidance_scale = 1.0
    a = diffusion.sample(guided, **kw, model_kwargs=prompt)
    b = diffusion.sample(lambda x_, t_, context: adapter(x_, t_, context=context, image=ref[:1], scale=0.7), **kw)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="null_context"):
        ClassifierFreeGuidance(adapter, 2.0)(x, t, context=ctx)


# --- projections, encoders, context embedding -----------------------------------------------------------------------


def test_projections_from_feature_maps_and_vectors():
    fmap, vec = torch.randn(3, 8, 2, 4, 4), torch.randn(3, 8)
    linear = ImageProjection(8, CTX)
    perceiver = PerceiverResampler(8, CTX, depth=2, head_dim=8)
    for proj, n in ((linear, 4), (perceiver, 16)):
        for feats in (fmap, vec, fmap.flatten(2).transpose(1, 2)):
            assert proj(feats).shape == (3, n, CTX)
    # the linear projection sees only the global mean; the resampler sees where features are
    shuffled = fmap.flip(2)
    assert torch.allclose(linear(fmap), linear(shuffled), atol=1e-6)
    assert not torch.allclose(perceiver(fmap), perceiver(shuffled), atol=1e-4)
    pos = sincos_position_3d((2, 3, 4), 13)
    assert pos.shape == (24, 13) and torch.equal(pos[:, 12], torch.zeros(24)) and len(pos.unique(dim=0)) == 24
    with pytest.raises(ValueError, match="feature_dim=8"):
        linear(torch.randn(3, 5))


def test_vector_encoder_and_perceiver_adapter_train():
    base = tiny_base(None)
    encoder = RandomConv3dFeatures(seed=0)  # (B, 1, D, H, W) -> (B, 480), feature_dim read from the module
    adapter = IPAdapter(
        base, encoder, projection="perceiver", num_tokens=8, perceiver_depth=1, token_dim=CTX, added_levels=[1]
    )
    assert adapter.feature_dim == 480 and adapter.num_tokens == 8
    for m in adapter.added_blocks.values():
        randomise(m, seed=2)
    x, t, _, ref = inputs()
    adapter(x, t, image=ref).pow(2).mean().backward()
    assert adapter.image_proj.latents.grad is not None and adapter.image_proj.latents.grad.abs().sum() > 0


def test_autoencoder_as_image_encoder_uses_the_posterior_mode():
    from wdm3d.networks.vae_base import LatentDistribution

    class ToyVAE(nn.Module):
        latent_channels = 4

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 8, 4, stride=4)

        def encode(self, v):
            mean, logvar = self.conv(v).chunk(2, dim=1)
            return LatentDistribution(mean, logvar)

    vae = ToyVAE()
    adapter = IPAdapter(tiny_base(CTX), vae)
    ref = torch.randn(2, 1, 16, 16, 16)
    assert adapter.feature_dim == 4 and not vae.conv.weight.requires_grad
    expected = adapter.image_proj(vae.conv(ref)[:, :4])
    assert torch.allclose(adapter.encode_image(ref), expected)


def test_context_embedding():
    emb = ContextEmbedding(VOCAB, CTX)
    by_name = emb({"modality": ["t2w", "t1c"], "dataset": "lidc"})
    by_index = emb({"modality": torch.tensor([1, 3]), "dataset": [1, 1]})
    assert by_name.shape == (2, 2, CTX) and torch.equal(by_name, by_index)
    null = emb.null(2)
    assert torch.equal(emb({"modality": [None, None]}), null)
    partial = emb({"modality": "t2f"}, batch_size=2)  # a missing field gets its null token
    assert torch.equal(partial[:, 1], null[:, 1]) and not torch.equal(partial[:, 0], null[:, 0])
    dropped = emb({"modality": ["t2w", "t1c"], "dataset": "lidc"}, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0], null[0]) and torch.equal(dropped[1], by_name[1])
    with pytest.raises(ValueError, match=r"unknown modality 'T2W'; known: \['t1n', 't2w', 't2f', 't1c'\]"):
        emb({"modality": "T2W"})
    with pytest.raises(ValueError, match="unknown condition field 'contrast'"):
        emb({"contrast": "t2w"})
    with pytest.raises(ValueError, match=r"out of range \[0, 2\)"):
        emb({"dataset": 2})
    with pytest.raises(ValueError, match="different batch sizes"):
        emb({"modality": ["t1n", "t2w"], "dataset": ["brats", "lidc", "lidc"]})


def test_attention_block_is_identity_when_fresh_and_processor_is_swappable():
    block = CrossAttentionBlock(16, CTX, head_dim=8, norm_num_groups=4)
    x, c = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 3, CTX)
    assert torch.equal(block(x, c), x)
    randomise(block, seed=1)
    calls = []

    def spy(attn: Attention, hidden, context):
        calls.append(tuple(hidden.shape))
        return AttnProcessor()(attn, hidden, context)

    expected = block(x, c)
    block.attn.processor = spy  # assignment goes through set_processor
    assert torch.equal(block(x, c), expected) and calls == [(2, 32, 16)]
    assert "processor" not in dict(block.attn.named_children())
    # the default processor is plain softmax attention
    attn = block.attn
    attn.set_processor(AttnProcessor())
    h = torch.randn(2, 5, 16)
    q, k, v = attn.to_q(h), attn.to_k(c), attn.to_v(c)
    heads = [
        torch.softmax(q[..., i : i + 8] @ k[..., i : i + 8].transpose(1, 2) / 8**0.5, -1) @ v[..., i : i + 8]
        for i in (0, 8)
    ]
    assert torch.allclose(attn(h, c), attn.to_out(torch.cat(heads, -1)), atol=1e-5)


def test_global_spatial_projection_keeps_both_kinds_of_tokens():
    fmap = torch.randn(3, 8, 2, 4, 4)
    torch.manual_seed(0)
    both = GlobalSpatialProjection(8, CTX, num_global=4, num_spatial=6, depth=1)
    out = both(fmap)
    assert out.shape == (3, 10, CTX) and both.num_tokens == 10
    assert torch.equal(out[:, :4], both.global_tokens(fmap)) and torch.equal(out[:, 4:], both.spatial_tokens(fmap))
    moved = both(fmap.flip(2))  # the same features elsewhere: the global tokens stay, the spatial ones move
    assert torch.allclose(moved[:, :4], out[:, :4], atol=1e-6)
    assert not torch.allclose(moved[:, 4:], out[:, 4:], atol=1e-4)
    adapter = IPAdapter(tiny_base(CTX), tiny_encoder(), feature_dim=8, projection="global+spatial", perceiver_depth=1)
    assert adapter.num_tokens == 20 and adapter.null_image_tokens(2).shape == (2, 20, CTX)
    with pytest.raises(ValueError, match="num_tokens - 4"):
        IPAdapter(tiny_base(CTX), tiny_encoder(), feature_dim=8, projection="global+spatial", num_tokens=4)


def test_learned_null_prompt_is_saved_loaded_and_checked(tmp_path):
    base, adapter = mixed_adapter()
    with torch.no_grad():
        adapter.null_tokens.copy_(torch.randn_like(adapter.null_tokens))
    path = adapter.save_adapter(tmp_path / "ip.pt")
    assert torch.equal(torch.load(path, weights_only=True)["image_proj"]["null_tokens"], adapter.null_tokens)
    torch.manual_seed(5)
    fresh = IPAdapter(tiny_base(CTX, seed=0), tiny_encoder(), feature_dim=8, added_levels=[0])
    assert torch.equal(fresh.null_tokens, torch.zeros_like(fresh.null_tokens))  # starts as "no prompt": the base
    fresh.load_adapter(path)
    assert torch.equal(fresh.null_tokens, adapter.null_tokens)
    zeros = IPAdapter(tiny_base(CTX, seed=0), tiny_encoder(), feature_dim=8, added_levels=[0], null_tokens="zeros")
    assert zeros.null_tokens is None and torch.equal(zeros.null_image_tokens(2), torch.zeros(2, 4, CTX))
    with pytest.raises(ValueError, match="null_tokens"):  # a file with a learned null prompt needs one to load into
        zeros.load_adapter(path)
    with pytest.raises(ValueError, match="null_tokens must be one of"):
        IPAdapter(tiny_base(CTX), tiny_encoder(), feature_dim=8, null_tokens="random")


def test_a_prompt_that_nothing_reads_is_refused():
    from wdm3d.networks.attention import ImagePrompt

    x, t, ctx, _ = inputs()
    prompt = ImagePrompt(torch.randn(2, 4, CTX), torch.ones(2))
    plain = tiny_base(None)
    with pytest.raises(ValueError, match="nothing reads it"):
        plain(x, t, image_prompt=prompt)
    with pytest.raises(ValueError, match="without an image-prompt processor"):
        tiny_base(CTX)(x, t, context=ctx, image_prompt=prompt)
    with pytest.raises(ValueError, match="one lambda per sample"):
        tiny_base(CTX)(x, t, context=ctx, image_prompt=ImagePrompt(prompt.tokens, torch.ones(())))
    with pytest.raises(ValueError, match="not an anchor"):
        plain.set_anchor_processor("down.1", lambda h, p: h)  # down.1 resamples: not an anchor
    adapter = IPAdapter(plain, tiny_encoder(), feature_dim=8, token_dim=CTX)
    with pytest.raises(RuntimeError, match="anchor processors"):
        torch.jit.script(plain)
    adapter.remove()
    assert plain.anchor_processors == {}
    torch.jit.script(plain)  # uninstalled: scriptable again


def test_volume_positions_find_the_same_place_on_grids_of_different_sizes():
    for fine, coarse in (((8, 8, 8), (4, 4, 4)), ((16, 8, 8), (8, 4, 4))):
        q, k = volume_position_3d(fine, 64), volume_position_3d(coarse, 64)
        nearest = (q @ k.T).argmax(dim=1)  # the key with the largest dot product, for every query voxel
        idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in fine], indexing="ij")).reshape(3, -1).T
        parent = idx * torch.tensor(coarse) // torch.tensor(fine)  # the coarse cell the fine voxel lies in
        flat = (parent[:, 0] * coarse[1] + parent[:, 1]) * coarse[2] + parent[:, 2]
        assert torch.equal(nearest, flat)
    with pytest.raises(ValueError, match="size must be"):
        volume_position_3d((4, 4), 12)


def test_grid_tokens_carry_their_place_and_the_adapter_attends_by_place():
    torch.manual_seed(0)
    proj = GlobalGridProjection(8, CTX, grid=(2, 4, 4), num_global=4)
    fmap = torch.randn(3, 8, 2, 4, 4)
    tokens = proj(fmap)
    assert tokens.shape == (3, 4 + 32, CTX) and proj.num_tokens == 36
    assert torch.equal(tokens[:, :4], proj.global_tokens(fmap))
    flat = torch.ones(1, 8, 2, 4, 4)  # the same features everywhere: the cell tokens differ by their place only
    cells = proj(flat)[0, 4:]
    pos = volume_position_3d((2, 4, 4), CTX)
    torch.testing.assert_close(cells - cells[0], pos - pos[0])
    places = proj.token_places()
    assert places.shape == (36, PLACE_DIM) and torch.equal(places[:4], torch.zeros(4, PLACE_DIM))
    with pytest.raises(ValueError, match="feature_grid"):
        proj(torch.randn(3, 8, 4, 4, 4))
    base = tiny_base(None)
    x, t, _, ref = inputs()
    adapter = IPAdapter(
        base, tiny_encoder(), feature_dim=8, token_dim=CTX, projection="global+grid", feature_grid=(4, 4, 4)
    )
    assert adapter.num_tokens == 4 + 64 and all(b.place_attention for b in adapter.added_blocks.values())
    with torch.no_grad():
        assert torch.equal(adapter(x, t, image=ref), base(x, t))  # zero-initialised blocks: the base at first
        randomise(adapter.added_blocks, seed=2, std=0.5)
        for block in adapter.added_blocks.values():
            block.place_gain.fill_(8.0)
        by_place = adapter(x, t, image=ref)
        for block in adapter.added_blocks.values():
            block.place_gain.zero_()
        assert (adapter(x, t, image=ref) - by_place).abs().max() > 1e-5  # the places reach the attention
    with pytest.raises(ValueError, match="needs feature_grid"):
        IPAdapter(tiny_base(None), tiny_encoder(), feature_dim=8, token_dim=CTX, projection="global+grid")
    with pytest.raises(ValueError, match="token_places"):  # a place bias without places would silently do nothing
        IPAdapter(tiny_base(None), tiny_encoder(), feature_dim=8, token_dim=CTX, place_attention=True)


def test_place_attention_reads_the_token_of_its_own_place():
    # no content in the logits (zero queries and keys), identity values and output: each voxel of an 8^3 grid gets
    # the token of the 4^3 cell it lies in, from the place bias alone
    block = CrossAttentionBlock(8, 8, num_heads=1, norm_num_groups=4, out_bias=False, place_attention=True)
    with torch.no_grad():
        block.attn.to_q.weight.zero_()
        block.attn.to_k.weight.zero_()
        block.attn.to_v.weight.copy_(torch.eye(8))
        block.attn.to_out.weight.copy_(torch.eye(8))
        block.place_gain.fill_(60.0)
    tokens = torch.randn(1, 64, 8)
    out = block.branch(torch.randn(1, 8, 8, 8, 8), tokens, places=place_features((4, 4, 4)))
    idx = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij")).reshape(3, -1).T // 2
    parent = (idx[:, 0] * 4 + idx[:, 1]) * 4 + idx[:, 2]
    torch.testing.assert_close(out.flatten(2)[0].T, tokens[0, parent], atol=2e-2, rtol=0)
    plain = block.branch(torch.randn(1, 8, 8, 8, 8), tokens)  # without places: uniform weights, the tokens' mean
    torch.testing.assert_close(plain.flatten(2)[0].T, tokens[0].mean(0).expand(512, 8), atol=1e-5, rtol=0)
