"""wdm3d.artifacts: the one home of checkpoint files, weight loading and unwrapping."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from wdm3d.artifacts import (
    build_network,
    check_state_fits,
    compare_state,
    load_frozen,
    resolve_checkpoint,
    save_checkpoint_file,
    state_mismatch,
    unwrap,
)


@pytest.fixture()
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unwrap_reaches_the_network_through_ddp_and_compile_in_either_order(one_rank_group):
    net = nn.Linear(3, 2)
    ddp = nn.parallel.DistributedDataParallel(net)
    assert unwrap(ddp) is net
    assert unwrap(torch.compile(net)) is net
    # MONAI's SupervisedTrainer(compile=True) compiles the DDP-wrapped network
    assert unwrap(torch.compile(ddp)) is net
    assert unwrap(nn.parallel.DistributedDataParallel(torch.compile(net))) is net
    assert unwrap(net) is net


def test_compare_state_orders_problems_as_the_reference():
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    state = {"c": torch.zeros(5), "a": torch.zeros(2), "z": torch.zeros(1)}
    found = compare_state(own, state)
    assert found.missing == ["b"] and found.unexpected == ["z"] and found.wrong_shape == ["c"]
    assert found.first == "b"  # the reference's order: a fits, b is missing before c's shape
    assert compare_state(own, {k: v.clone() for k, v in own.items()}).first is None
    assert compare_state(own, {**own, "z": torch.zeros(1)}).first == "z"
    assert compare_state(own, {**own, "a": [0.0, 0.0]}).wrong_shape == ["a"]  # not a tensor
    assert state_mismatch(own, state) == "missing ['b'], unexpected ['z'], wrong shapes ['c']"


def test_check_state_fits_names_the_first_mismatch_with_both_shapes():
    net = nn.Linear(3, 2)
    state = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    with pytest.raises(RuntimeError, match=r"'weight' has shape \(2, 4\) in the checkpoint but \(2, 3\)"):
        check_state_fits(net, state, "ckpt.pt")
    with pytest.raises(RuntimeError, match=r"it has no weight 'bias'"):
        check_state_fits(net, {"weight": torch.zeros(2, 3)}, "ckpt.pt")
    with pytest.raises(RuntimeError, match=r"has weight 'extra' \(\(1,\)\) that the network lacks \(1 such"):
        check_state_fits(net, {**net.state_dict(), "extra": torch.zeros(1)}, "ckpt.pt")


def _save(path, model, ema=None):
    ckpt = {"model": model.state_dict()}
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    return save_checkpoint_file(ckpt, path)


def test_resolve_checkpoint_takes_a_file_or_the_newest_of_a_folder(tmp_path):
    net = nn.Linear(2, 2)
    old = _save(tmp_path / "a.pt", net)
    new = _save(tmp_path / "b.pt", net)
    os.utime(old, (1, 1))
    assert resolve_checkpoint(tmp_path) == new
    assert resolve_checkpoint(old) == old
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No autoencoder checkpoint \(\*\.pt\) in .*; train it first"):
        resolve_checkpoint(tmp_path / "empty", "autoencoder", "train it first")
    with pytest.raises(FileNotFoundError, match=r"The base checkpoint .*nope\.pt does not exist; set base_checkpoint"):
        resolve_checkpoint(tmp_path / "nope.pt", "base", "set base_checkpoint")


def test_load_frozen_prefers_ema_freezes_and_reports_the_file(tmp_path):
    torch.manual_seed(0)
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    path = _save(tmp_path / "c.pt", model, ema)
    net, info = load_frozen(nn.Linear(2, 2), tmp_path)
    assert torch.equal(net.weight, ema.weight) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert info == {
        "checkpoint": str(path.resolve()),
        "weights": "ema",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    raw, info = load_frozen(nn.Linear(2, 2), path, use_ema=False)
    assert torch.equal(raw.weight, model.weight) and info["weights"] == "model"


def test_build_network_refuses_classes_outside_the_network_modules(tmp_path):
    net = nn.Linear(2, 2)
    ckpt = {"model": net.state_dict(), "run_config": {"network": {"class": "os.system", "command": "true"}}}
    save_checkpoint_file(ckpt, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="outside .*refusing to build it"):
        build_network(tmp_path / "evil.pt")
    ckpt["run_config"]["network"] = {"class": "monai.networks.utils.save_state", "src": {}, "path": "x"}
    save_checkpoint_file(ckpt, tmp_path / "func.pt")
    with pytest.raises(ValueError, match="not a network class"):
        build_network(tmp_path / "func.pt")
    ckpt["run_config"]["network"] = {
        "class": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [4, 8],
        "strides": [2],
    }
    save_checkpoint_file(ckpt, tmp_path / "ok.pt")
    assert type(build_network(tmp_path / "ok.pt")).__name__ == "UNet"
