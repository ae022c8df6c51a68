"""Learning-efficiency benchmark (issue 19): which diffusion recipe generates best at an equal training budget?

Every candidate trains the same number of optimizer steps (same batch size, AdamW settings, EMA, data and seeds;
parameter counts within about 15% of each other, reported with the wall-clock), then samples ``--num-samples``
volumes, which are scored against a reference set the model never saw:

- **known truth** (``shapes32`` / ``shapes64``, :mod:`data_prep.known_truth`): each generating parameter (organ
  radius: long-tailed, intensity: bimodal, position, lesion count, texture, thin-rod length) is re-measured from the
  samples the way the data were made and compared with the same measurement of 256 fresh draws of the law:
  Kolmogorov-Smirnov statistic and Wasserstein-1 distance in units of the reference's standard deviation
  (``param_w1``, the mean over parameters, is the headline figure); ``spread_*`` is the samples' standard deviation
  over the reference's (1.0 is right; below 1 the samples are less diverse than the data); ``valid`` the share of
  samples with one intact organ;
- **demo** (``demo32``: the embedded MNI152-based brain data at 32^3): the distribution metrics only;
- for both: FID on random-weight MedicalNet ResNet-50 features and on random conv3d features (comparable only within
  this benchmark), RBF MMD^2 on the conv3d features, |MS-SSIM diversity - real's|, the memorization audit's copy
  fraction (against the training set), and the per-subband energy error (mean |log| ratio of each Haar subband's
  energy, samples against reference).

Candidates are config switches of :class:`wdm3d.diffusion.WaveletDiffusion`, :class:`wdm3d.diffusion.WaveletMSELoss`
and the backbone (``CANDIDATES`` below). Results go to ``OUT/runs/<dataset>/<candidate>/seed<k>.json`` (a finished
run is skipped when re-run, so the study resumes); ``report`` aggregates them (mean and 95% t-interval over seeds),
picks a winner per dataset and writes ``benchmarks/results/quality.json`` and the table in BENCHMARKS.md.

    python benchmarks/quality.py run /tmp/quality --dataset shapes32 --seeds 0 1 2     # CPU, 2 threads
    python benchmarks/quality.py report /tmp/quality --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_prep.known_truth import PARAMETERS, make_volumes, measure_many  # noqa: E402
from wdm3d.diffusion import (  # noqa: E402
    WaveletDiffusion,
    WaveletDiffusionInferer,
    WaveletDiffusionPrepareBatch,
    WaveletMSELoss,
)
from wdm3d.networks import DiT3D, count_parameters, wdm_unet  # noqa: E402

RESULTS_JSON = REPO / "benchmarks" / "results" / "quality.json"
FEW_STEP_JSON = REPO / "benchmarks" / "results" / "few_step.json"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
MARK_BEGIN, MARK_END = "<!-- quality:begin -->", "<!-- quality:end -->"

UNET = {"kind": "unet", "base_channels": 16, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "norm_num_groups": 8}
UNET_2LEVEL = {"kind": "unet", "base_channels": 20, "channel_mult": (1, 2), "num_res_blocks": 1, "norm_num_groups": 4}
DIT = {"kind": "dit", "patch_size": 2, "hidden_size": 96, "depth": 3, "num_heads": 4}
WDM = {"process": "ddpm", "prediction_type": "sample"}
RFLOW = {"process": "rflow", "prediction_type": "v_prediction", "rflow_sample_method": "logit-normal"}
JIT = {**RFLOW, "prediction_type": "sample", "loss_weighting": "velocity"}
#: MeanFlow with the paper's ImageNet times (logit-normal(-0.4, 1), 25% of the pairs r != t)
MEANFLOW = {"process": "rflow", "prediction_type": "v_prediction", "flow_map": "meanflow"}
#: the same with x prediction (JiT's parameterisation: u = (x_hat - z_t) / t, the loss on u)
MEANFLOW_X = {**MEANFLOW, "prediction_type": "sample"}
#: shortcut models: the same average velocity from one jump of 2d = two of d (powers of two), x prediction
SHORTCUT_X = {**MEANFLOW_X, "flow_map": "shortcut"}
UNET_FLOW_MAP = {**UNET, "interval_embedding": True}


def _two_level_flow_map(flow_map: str, steps: int, sampler: str | None = None, time_mean: float | None = None) -> dict:
    """A flow map with x prediction on the two-level grid and U-Net of the 50-step winner (with the interval input),
    sampled with ``steps`` of its own jumps, or of ``sampler`` (``"rflow"``: its velocity at interval 0);
    ``time_mean``: the flow-matching times' logit-normal mean (None: MeanFlow's -0.4; the name gets ``_t0`` for 0)."""
    name = {"shortcut": "shortcut model", "meanflow": "MeanFlow"}[flow_map]
    how = f"{steps} jump{'s' if steps > 1 else ''}" if sampler is None else f"{steps} {sampler} steps at interval 0"
    times = {} if time_mean is None else {"flow_map_time_mean": time_mean}
    return dict(
        diffusion={**(SHORTCUT_X if flow_map == "shortcut" else MEANFLOW_X), "levels": 2, **times},
        net={**UNET_2LEVEL, "interval_embedding": True},
        loss={},
        sampler=sampler or flow_map,
        steps=steps,
        trained_as=f"{flow_map}_x_2level" + ("" if time_mean is None else f"_t{time_mean:g}"),
        note=f"{name} with x prediction on two Haar levels"
        + ("" if time_mean is None else f", flow-matching times logit-normal({time_mean:g}, 1)")
        + f", {how}",
    )


#: name -> (diffusion settings, network, loss settings, sampler, steps, what it is)
CANDIDATES: dict[str, dict] = {
    "wdm": dict(
        diffusion=WDM,
        net=UNET,
        loss={},
        sampler="ddpm",
        steps=1000,
        note="WDM's recipe: DDPM, x0 prediction, linear betas, 1000 ancestral steps",
    ),
    "wdm_ddim50": dict(
        diffusion=WDM,
        net=UNET,
        loss={},
        sampler="ddim",
        steps=50,
        note="WDM's training, DDIM-50 sampling (today's bundle default)",
    ),
    "eps_minsnr": dict(
        diffusion={"process": "ddpm", "prediction_type": "epsilon", "loss_weighting": "min_snr"},
        net=UNET,
        loss={},
        sampler="ddim",
        steps=50,
        note="DDPM, epsilon, min-SNR-5, DDIM-50",
    ),
    "v_minsnr": dict(
        diffusion={"process": "ddpm", "prediction_type": "v_prediction", "loss_weighting": "min_snr"},
        net=UNET,
        loss={},
        sampler="ddim",
        steps=50,
        note="DDPM, v, min-SNR-5, DDIM-50",
    ),
    "eps": dict(
        diffusion={"process": "ddpm", "prediction_type": "epsilon"},
        net=UNET,
        loss={},
        sampler="ddim",
        steps=50,
        note="control: DDPM, epsilon, unweighted (Ho et al.), DDIM-50",
    ),
    "v": dict(
        diffusion={"process": "ddpm", "prediction_type": "v_prediction"},
        net=UNET,
        loss={},
        sampler="ddim",
        steps=50,
        note="control: DDPM, v, unweighted, DDIM-50",
    ),
    "rflow_v_uniform": dict(
        diffusion={**RFLOW, "rflow_sample_method": "uniform"},
        net=UNET,
        loss={},
        sampler="rflow",
        steps=50,
        note="control: rflow_v with uniform t",
    ),
    "rflow_v": dict(
        diffusion=RFLOW,
        net=UNET,
        loss={},
        sampler="rflow",
        steps=50,
        note="rectified flow, velocity, logit-normal t (SD3), 50 Euler steps",
    ),
    "rflow_x_vloss": dict(
        diffusion=JIT,
        net=UNET,
        loss={},
        sampler="rflow",
        steps=50,
        note="rectified flow, x prediction, velocity loss (JiT), logit-normal t",
    ),
    # the second-stage switches on top of the x-prediction / velocity-loss base (the velocity-prediction base had not
    # converged at 600 steps, so its variants below were run for one seed only and say nothing about the switches)
    "rflow_x_vloss_fixedsub": dict(
        diffusion=JIT,
        net=UNET,
        loss={"subband_weights": "inverse_variance"},
        sampler="rflow",
        steps=50,
        note="JiT + fixed per-subband weights (inverse of each subband's data variance)",
    ),
    "rflow_x_vloss_learnedsub": dict(
        diffusion=JIT,
        net=UNET,
        loss={"learned": True},
        sampler="rflow",
        steps=50,
        note="JiT + learned heteroscedastic per-subband weights (WaveDiT)",
    ),
    "rflow_x_vloss_2level": dict(
        diffusion={**JIT, "levels": 2},
        net=UNET_2LEVEL,
        loss={},
        sampler="rflow",
        steps=50,
        note="JiT on two Haar levels (64 channels at 1/4 resolution)",
    ),
    "rflow_x_vloss_2level_shift3": dict(
        diffusion={**JIT, "levels": 2, "time_shift": 3.0},
        net=UNET_2LEVEL,
        loss={},
        sampler="rflow",
        steps=50,
        note="the two-level JiT with SD3's time shift 3 (training times and sampling grid moved towards noise)",
    ),
    "rflow_x_vloss_dit": dict(
        diffusion=JIT,
        net=DIT,
        loss={},
        sampler="rflow",
        steps=50,
        note="JiT with a DiT (AdaLN-Zero, 2^3 patches) instead of the U-Net",
    ),
    "rflow_v_fixedsub": dict(
        diffusion=RFLOW,
        net=UNET,
        loss={"subband_weights": "inverse_variance"},
        sampler="rflow",
        steps=50,
        note="rflow_v + fixed per-subband weights (one seed)",
    ),
    "rflow_v_learnedsub": dict(
        diffusion=RFLOW,
        net=UNET,
        loss={"learned": True},
        sampler="rflow",
        steps=50,
        note="rflow_v + learned per-subband weights (one seed)",
    ),
    # one MeanFlow training per seed ("trained_as"), sampled with 1, 2 and 4 flow-map jumps
    **{
        f"meanflow_{k}": dict(
            diffusion=MEANFLOW,
            net=UNET_FLOW_MAP,
            loss={},
            sampler="meanflow",
            steps=k,
            trained_as="meanflow",
            note=f"MeanFlow (average velocity, jvp target), {k} flow-map jump{'s' if k > 1 else ''}",
        )
        for k in (1, 2, 4)
    },
    **{
        f"meanflow_x_{k}": dict(
            diffusion=MEANFLOW_X,
            net=UNET_FLOW_MAP,
            loss={},
            sampler="meanflow",
            steps=k,
            trained_as="meanflow_x",
            note=f"MeanFlow with x prediction (JiT's parameterisation), {k} flow-map jump{'s' if k > 1 else ''}",
        )
        for k in (1, 2, 4)
    },
    # shortcut models (Frans et al. 2024): the same map learnt from its composition rule, x prediction
    **{
        f"shortcut_x_{k}": dict(
            diffusion=SHORTCUT_X,
            net=UNET_FLOW_MAP,
            loss={},
            sampler="shortcut",
            steps=k,
            trained_as="shortcut_x",
            note=f"shortcut model with x prediction, {k} jump{'s' if k > 1 else ''} (self-consistency, no jvp)",
        )
        for k in (1, 2, 4)
    },
    # the shortcut model on the winner's two Haar levels (the 50-step winner's grid and U-Net, with the interval input)
    **{f"shortcut_x_2level_{k}": _two_level_flow_map("shortcut", k) for k in (1, 2, 4)},
    # MeanFlow on the same two levels and network (issue 25: the two objectives compared on one grid)
    **{f"meanflow_x_2level_{k}": _two_level_flow_map("meanflow", k) for k in (1, 2, 4)},
    # the same shortcut training sampled as a velocity field (interval 0, 50 Euler steps)
    "shortcut_x_2level_rflow50": _two_level_flow_map("shortcut", 50, sampler="rflow"),
    # the shortcut model with the 50-step recipe's time law for its flow-matching pairs (logit-normal(0, 1) instead of
    # MeanFlow's (-0.4, 1)): the fix the demo-scale diagnostics pointed to
    **{f"shortcut_x_2level_t0_{k}": _two_level_flow_map("shortcut", k, time_mean=0.0) for k in (1, 2, 4)},
    "shortcut_x_2level_t0_rflow50": _two_level_flow_map("shortcut", 50, sampler="rflow", time_mean=0.0),
    # the same shortcut model distilled from the one-level JiT (rflow_x_vloss, same seed and budget; its weights are
    # kept under _trained/rflow_x_vloss): the teacher's velocity replaces x0 - noise in the target
    **{
        f"shortcut_x_distill_{k}": dict(
            diffusion=SHORTCUT_X,
            net=UNET_FLOW_MAP,
            loss={},
            sampler="shortcut",
            steps=k,
            trained_as="shortcut_x_distill",
            teacher="rflow_x_vloss",
            note=f"shortcut model distilled from rflow_x_vloss, {k} jump{'s' if k > 1 else ''} (teacher trained "
            "for the same steps first)",
        )
        for k in (1, 2, 4)
    },
    "rflow_v_2level": dict(
        diffusion={**RFLOW, "levels": 2},
        net=UNET_2LEVEL,
        loss={},
        sampler="rflow",
        steps=50,
        note="rflow_v on two Haar levels (one seed)",
    ),
}

#: metric -> lower is better
METRICS = {
    "param_w1": True,
    "param_w1_all": True,
    "param_ks": True,
    "valid": False,
    "fid_medicalnet_random": True,
    "fid_conv3d": True,
    "mmd2": True,
    "ms_ssim_gap": True,
    "copy_fraction": True,
    "subband_energy_error": True,
}
#: the headline metric per dataset; on the known-truth data it is ``param_w1_all``, which counts a sample without an
#: organ as radius 0 (``param_w1`` leaves such samples out and so favours models that make empty volumes)
PRIMARY = {"shapes32": "param_w1_all", "shapes64": "param_w1_all", "demo32": "fid_medicalnet_random"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ----------------------------------------------------------------------------------------------------------


def load_dataset(name: str, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(training volumes, reference volumes), ``(N, n, n, n)`` in [0, 1]; cached under ``work``."""
    cache = work / f"{name}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["train"], data["reference"]
    if name.startswith("shapes"):
        size = int(name[len("shapes") :])
        train, _ = make_volumes(256, size, seed=1000)
        reference, _ = make_volumes(256, size, seed=2000)
    elif name == "demo32":
        train, reference = _demo_volumes(work)
    else:
        raise ValueError(f"unknown dataset {name!r}: shapes32, shapes64 or demo32.")
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, train=train, reference=reference)
    return train, reference


def _demo_volumes(work: Path) -> tuple[np.ndarray, np.ndarray]:
    """The demo brain data at 32^3 (8 mm voxels): the training split trains, all cases are the reference."""
    import nibabel as nib

    from data_prep.demo import make_demo_dataset

    dst = work / "demo32_data"
    datalist = dst / "prepared" / "datalist.json"
    if not datalist.is_file():
        make_demo_dataset(dst, num_cases=48, seed=0, resolution=4, pool=2, progress=False)
    data = json.loads(datalist.read_text())

    def vols(entries):
        return np.stack([np.asarray(nib.load(datalist.parent / e["t1n"]).dataobj, np.float32) for e in entries])

    train = vols(data["training"])
    everything = vols([e for split in ("training", "validation", "test") for e in data.get(split, [])])
    return np.clip(train, 0, 1), np.clip(everything, 0, 1)


# -- one run ---------------------------------------------------------------------------------------------------------


def build_network(spec: dict, channels: int) -> torch.nn.Module:
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "unet":
        return wdm_unet("wdm_128", in_channels=channels, **spec)
    return DiT3D(in_channels=channels, **spec)


def subband_inverse_variance(diffusion: WaveletDiffusion, train: np.ndarray) -> list[float]:
    """Fixed per-subband weights: 1 / variance of each subband's coefficients over the training data."""
    y = diffusion.encode(torch.from_numpy(train[:64, None]) * 2 - 1)  # one channel: one subband per channel
    var = y.transpose(0, 1).reshape(diffusion.channel_factor, -1).var(dim=1).double()
    return (1 / var.clamp(min=1e-6)).tolist()


def train_and_sample(
    cand: dict,
    train: np.ndarray,
    seed: int,
    iterations: int,
    batch_size: int,
    num_samples: int,
    lr: float,
    ema_decay: float,
    trained: Path | None = None,
    teacher: Path | None = None,
) -> tuple[np.ndarray, dict]:
    """Train ``cand`` for ``iterations`` steps from ``seed`` and sample it; ``trained``: where candidates that share
    one training (``trained_as``) keep its EMA weights and training figures, so each is trained once per seed;
    ``teacher``: where the EMA weights of the candidate named by ``cand["teacher"]`` are kept (trained there first,
    with the same seed and budget, if missing), for a flow map distilled from it."""
    diffusion = WaveletDiffusion(**cand["diffusion"])
    size = train.shape[-1]
    if trained is not None and trained.with_suffix(".json").is_file():
        torch.manual_seed(seed)
        net = build_network(cand["net"], diffusion.channel_factor)
        net.load_state_dict(torch.load(trained, weights_only=True))
        done = json.loads(trained.with_suffix(".json").read_text())
        return _sample(cand, diffusion, net, size, num_samples, seed, {**done, "parameters": count_parameters(net)})
    distil: dict = {}
    if "teacher" in cand:
        spec = CANDIDATES[cand["teacher"]]
        if not teacher.with_suffix(".json").is_file():
            _train(spec, train, seed, iterations, batch_size, lr, ema_decay, save=teacher)
        teacher_diffusion = WaveletDiffusion(**spec["diffusion"])
        teacher_net = build_network(spec["net"], teacher_diffusion.channel_factor)
        teacher_net.load_state_dict(torch.load(teacher, weights_only=True))
        distil = {"teacher": teacher_net, "teacher_diffusion": teacher_diffusion}
    net, done = _train(cand, train, seed, iterations, batch_size, lr, ema_decay, save=trained, **distil)
    if distil:  # the distillation's extra cost, kept with a shared training too
        done["teacher_train_seconds"] = json.loads(teacher.with_suffix(".json").read_text())["train_seconds"]
        if trained is not None:
            trained.with_suffix(".json").write_text(json.dumps(done))
    return _sample(cand, diffusion, net, size, num_samples, seed, {**done, "parameters": count_parameters(net)})


def _train(
    cand: dict,
    train: np.ndarray,
    seed: int,
    iterations: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    save: Path | None = None,
    **inferer_args,
) -> tuple[torch.nn.Module, dict]:
    """The EMA network of ``cand`` after ``iterations`` AdamW steps from ``seed``, and its training figures; kept at
    ``save`` (weights, and the figures beside them as JSON) when given."""
    torch.manual_seed(seed)
    diffusion = WaveletDiffusion(**cand["diffusion"])
    net = build_network(cand["net"], diffusion.channel_factor)
    loss_args = dict(cand["loss"])
    if loss_args.get("subband_weights") == "inverse_variance":
        loss_args["subband_weights"] = subband_inverse_variance(diffusion, train)
    if loss_args.get("learned"):
        loss_args["num_subbands"] = diffusion.channel_factor
    loss_fn = WaveletMSELoss(**loss_args)
    params = list(net.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay))
    prepare = WaveletDiffusionPrepareBatch(diffusion)
    inferer = WaveletDiffusionInferer(diffusion, **inferer_args)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(train)[:, None] * 2 - 1  # [0, 1] -> [-1, 1], as the bundles' transforms
    t0 = time.time()
    losses = []
    for _ in range(iterations):
        idx = torch.from_numpy(rng.choice(len(data), batch_size, replace=False))
        x0, target, _, kw = prepare({"image": data[idx]})
        loss = loss_fn(inferer(x0, net, **kw), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(net)
        losses.append(loss.item())
    done = {"train_seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-50:]))}
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ema.module.state_dict(), save)
        save.with_suffix(".json").write_text(json.dumps(done))
    return ema.module, done


def _sample(
    cand: dict, diffusion: WaveletDiffusion, net: torch.nn.Module, size: int, num_samples: int, seed: int, done: dict
) -> tuple[np.ndarray, dict]:
    t0 = time.time()
    samples = diffusion.sample(
        net.eval(),
        (1, size, size, size),
        num_samples=num_samples,
        sampler=cand["sampler"],
        num_steps=cand["steps"],
        seed=10_000 + seed,
        progress=False,
    )
    info = {
        **done,
        "sample_seconds": round(time.time() - t0, 1),
        "nfe": diffusion.network_evaluations(cand["sampler"], cand["steps"]),
        "diffusion": diffusion.config(),
    }
    return ((samples[:, 0].clamp(-1, 1) + 1) / 2).numpy(), info


# -- metrics ---------------------------------------------------------------------------------------------------------


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).statistic)


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a, b))


def _w1_counting_empty(reference: dict, got: dict) -> float:
    """Mean normalised W1 over the parameters with a sample that has no organ measured as it was made: an organ of
    radius 0 with 0 lesions (``param_w1`` leaves such samples out, so a model that makes many empty volumes and
    good organs otherwise scores well there)."""
    got = {k: np.array(v, dtype=np.float64) for k, v in got.items()}
    empty = ~np.isfinite(got["radius"])
    got["radius"][empty], got["count"][empty] = 0.0, 0.0
    dists = []
    for p in PARAMETERS:
        b = got[p][np.isfinite(got[p])]
        dists.append(_w1(reference[p], b) / float(np.std(reference[p])) if len(b) >= 2 else math.inf)
    return float(np.mean(dists))


class Scorer:
    """Metrics of a sample set against one dataset's reference (reference-side features computed once)."""

    def __init__(self, train: np.ndarray, reference: np.ndarray, known_truth: bool) -> None:
        from wdm3d.metrics import ms_ssim_diversity
        from wdm3d.networks import MedicalNetResNet50, RandomConv3dFeatures

        self.train, self.reference, self.known_truth = train, reference, known_truth
        torch.manual_seed(0)
        self.extractors = {
            "medicalnet_random": MedicalNetResNet50().eval(),
            "conv3d": RandomConv3dFeatures(seed=0).eval(),
        }
        self.ref_features = {k: self._features(e, reference) for k, e in self.extractors.items()}
        self.ref_ms_ssim = ms_ssim_diversity(torch.from_numpy(reference[:64, None]), pairs=100, n_boot=0)["mean"]
        self.ref_energy = self._energy(reference)
        self.ref_params = measure_many(reference) if known_truth else None

    @staticmethod
    @torch.no_grad()
    def _features(extractor, vols: np.ndarray) -> np.ndarray:
        from wdm3d.metrics import extract_features

        return extract_features(extractor, vols, (0.0, 1.0), batch_size=16, device="cpu")

    @staticmethod
    def _energy(vols: np.ndarray) -> np.ndarray:
        from wdm3d.wavelets import dwt3d

        y = dwt3d(torch.from_numpy(np.ascontiguousarray(vols[:, None])).double())
        return y.pow(2).mean(dim=(0, 2, 3, 4)).numpy()

    def __call__(self, fake: np.ndarray) -> dict:
        from wdm3d.metrics import fid_from_features, memorization_audit, mmd_rbf, ms_ssim_diversity

        out: dict = {}
        for name, extractor in self.extractors.items():
            feats = self._features(extractor, fake)
            out[f"fid_{name}"] = fid_from_features(self.ref_features[name], feats)["fid"]
            if name == "conv3d":
                out["mmd2"] = mmd_rbf(self.ref_features[name], feats, permutations=0)["mmd2"]
        out["ms_ssim"] = ms_ssim_diversity(torch.from_numpy(fake[:, None]), pairs=100, n_boot=0)["mean"]
        out["ms_ssim_real"] = self.ref_ms_ssim
        out["ms_ssim_gap"] = abs(out["ms_ssim"] - self.ref_ms_ssim)
        audit = memorization_audit(fake, self.train, downsample=1)
        out["copy_fraction"] = audit["copy_fraction"]
        energy = self._energy(fake)
        out["subband_energy"] = (energy / self.ref_energy).tolist()
        out["subband_energy_error"] = float(np.mean(np.abs(np.log(energy / self.ref_energy))))
        out["background_mean"] = float(fake[:, :3, :3, -3:].mean())
        out["max_intensity"] = float(fake.reshape(len(fake), -1).max(1).mean())
        if self.known_truth:
            got = measure_many(fake)
            out["valid"] = float(got["valid"].mean())
            ks, w1 = [], []
            for p in PARAMETERS:
                a, b = self.ref_params[p], got[p][np.isfinite(got[p])]
                if len(b) < 2:
                    out[f"ks_{p}"], out[f"w1_{p}"] = 1.0, math.inf
                else:
                    out[f"ks_{p}"] = _ks(a, b)
                    out[f"w1_{p}"] = _w1(a, b) / float(np.std(a))
                    out[f"spread_{p}"] = float(np.std(b) / np.std(a))
                    out[f"mean_{p}"] = float(np.mean(b))
                    out[f"ref_mean_{p}"] = float(np.mean(a))
                ks.append(out[f"ks_{p}"])
                w1.append(out[f"w1_{p}"])
            out["param_ks"], out["param_w1"] = float(np.mean(ks)), float(np.mean(w1))
            out["param_w1_all"] = _w1_counting_empty(self.ref_params, got)
        return out


# -- study -----------------------------------------------------------------------------------------------------------


def machine() -> dict:
    import monai

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
    }


def _claimed_by_another(path: Path) -> bool:
    """True while another live process of this machine runs this study run (its ``.running`` marker names it)."""
    marker = path.with_suffix(".running")
    try:
        pid = int(marker.read_text())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _shared_training(out: Path, dataset: str, cand: dict, seed: int) -> Path | None:
    """Where the weights of a training that several candidates share are kept (None: the candidate trains alone)."""
    if "trained_as" not in cand:
        return None
    return out / "runs" / dataset / "_trained" / cand["trained_as"] / f"seed{seed}.pt"


def _teacher_weights(out: Path, dataset: str, cand: dict, seed: int) -> Path | None:
    """Where the EMA weights of a distilled candidate's teacher are kept (None: no teacher)."""
    if "teacher" not in cand:
        return None
    return out / "runs" / dataset / "_trained" / cand["teacher"] / f"seed{seed}.pt"


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    names = list(CANDIDATES) if args.candidates == ["all"] else args.candidates
    unknown = set(names) - set(CANDIDATES)
    if unknown:
        raise SystemExit(f"unknown candidates {sorted(unknown)}; choose from {list(CANDIDATES)}")
    for dataset in args.dataset:
        train, reference = load_dataset(dataset, out / "data")
        scorer = None
        for seed in args.seeds:
            for name in names:
                path = out / "runs" / dataset / name / f"seed{seed}.json"
                if path.is_file() or _claimed_by_another(path):
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".running").write_text(str(os.getpid()))  # lets parallel studies share the work
                scorer = scorer or Scorer(train, reference, dataset.startswith("shapes"))
                log(f"{dataset} {name} seed {seed}: training {args.iterations} iterations")
                fake, info = train_and_sample(
                    CANDIDATES[name],
                    train,
                    seed,
                    args.iterations,
                    args.batch_size,
                    args.num_samples,
                    args.lr,
                    args.ema_decay,
                    trained=_shared_training(out, dataset, CANDIDATES[name], seed),
                    teacher=_teacher_weights(out, dataset, CANDIDATES[name], seed),
                )
                metrics = scorer(fake)
                record = {
                    "candidate": name,
                    "dataset": dataset,
                    "seed": seed,
                    "iterations": args.iterations,
                    "batch_size": args.batch_size,
                    "num_samples": args.num_samples,
                    "lr": args.lr,
                    "ema_decay": args.ema_decay,
                    "sampler": CANDIDATES[name]["sampler"],
                    **info,
                    "metrics": metrics,
                    "machine": machine(),
                    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                }
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record, indent=1, default=float))
                os.replace(tmp, path)
                np.save(
                    path.with_suffix(".npy"), fake.astype(np.float16)
                )  # all samples: lets a new metric rescore old runs
                path.with_suffix(".running").unlink(missing_ok=True)
                log(
                    f"  {name} seed {seed}: "
                    + ", ".join(f"{k} {metrics[k]:.4g}" for k in METRICS if k in metrics)
                    + f" ({info['train_seconds']} s)"
                )


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval."""
    from scipy.stats import t as student_t

    v = np.asarray(values, np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    half = float(student_t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def study_key(record: dict) -> str:
    """Runs are compared within one dataset and one training budget: ``shapes32@600``."""
    return f"{record['dataset']}@{record['iterations']}"


#: the smallest mean share of valid samples (one intact organ) a candidate needs to win a known-truth dataset
MIN_VALID = 0.25

#: what the winner is measured against: WDM's training with the sampler the bundles defaulted to (DDIM-50)
BASELINE = "wdm_ddim50"


def paired_difference(rows: list[dict], name: str, baseline: str, metric: str) -> dict | None:
    """``name`` minus ``baseline`` on ``metric``, seed by seed (the runs of one seed share data order and noise
    draws), with a 95% t-interval of the mean difference and the ratio of means; None without 2 common seeds."""
    if name == baseline:
        return None

    def by_seed(n):
        return {r["seed"]: r["metrics"].get(metric) for r in rows if r["candidate"] == n}

    a, b = by_seed(name), by_seed(baseline)
    seeds = sorted(
        k
        for k in a.keys() & b.keys()
        if a[k] is not None and b[k] is not None and math.isfinite(a[k]) and math.isfinite(b[k])
    )
    if len(seeds) < 2:
        return None
    diff = dict(zip(("mean", "ci_low", "ci_high"), t_interval([a[k] - b[k] for k in seeds])))
    ratio = float(np.mean([a[k] for k in seeds]) / np.mean([b[k] for k in seeds]))
    return {
        "candidate": name,
        "baseline": baseline,
        "metric": metric,
        "seeds": seeds,
        "difference": diff,
        "ratio_of_means": ratio,
    }


def _challenger(scored: dict, winner: str, primary: str) -> str:
    """The candidate compared with the baseline: the winner, or the best other one when the baseline won."""
    others = [k for k in scored if k != BASELINE]
    return winner if winner != BASELINE or not others else min(others, key=lambda k: scored[k][primary]["mean"])


def summarize(records: list[dict]) -> dict:
    """Per dataset and budget (:func:`study_key`) and candidate: mean and CI of each metric; the winner of each."""
    out: dict = {}
    for key in sorted({study_key(r) for r in records}, key=lambda k: (k.split("@")[0], int(k.split("@")[1]))):
        rows = [r for r in records if study_key(r) == key]
        dataset = rows[0]["dataset"]
        table = {}
        for name in CANDIDATES:
            mine = [r for r in rows if r["candidate"] == name]
            if not mine:
                continue
            entry = {
                "seeds": sorted(r["seed"] for r in mine),
                "nfe": mine[0]["nfe"],
                "parameters": mine[0]["parameters"],
                "train_seconds": float(np.mean([r["train_seconds"] for r in mine])),
                **(
                    {"teacher_train_seconds": float(np.mean([r["teacher_train_seconds"] for r in mine]))}
                    if all("teacher_train_seconds" in r for r in mine)
                    else {}
                ),
                "sample_seconds": float(np.mean([r["sample_seconds"] for r in mine])),
            }
            for metric in {**METRICS, **{f"spread_{p}": True for p in PARAMETERS}}:
                vals = [r["metrics"][metric] for r in mine if metric in r["metrics"]]
                if vals and all(math.isfinite(v) for v in vals):
                    entry[metric] = dict(zip(("mean", "ci_low", "ci_high"), t_interval(vals)))
                elif vals:  # e.g. no sample with a measurable organ: the distance is undefined, the candidate lost
                    entry[metric] = {
                        "mean": None,
                        "ci_low": None,
                        "ci_high": None,
                        "non_finite_seeds": sum(not math.isfinite(v) for v in vals),
                    }
            table[name] = entry
        primary = PRIMARY[dataset]
        scored = {
            k: v for k, v in table.items() if primary in v and v[primary]["mean"] is not None and len(v["seeds"]) >= 3
        }
        # the parameter distances measure each sample's largest organ, so samples broken into pieces still score:
        # a candidate whose samples are mostly not valid shapes cannot win the known-truth data
        invalid = sorted(
            k
            for k, v in scored.items()
            if "valid" in v and v["valid"]["mean"] is not None and v["valid"]["mean"] < MIN_VALID
        )
        scored = {k: v for k, v in scored.items() if k not in invalid}
        winner = None
        if scored:
            best = min(scored, key=lambda k: scored[k][primary]["mean"])
            # candidates whose interval overlaps the best's are not distinguishable from it: the cheapest sampler wins
            tied = [k for k, v in scored.items() if v[primary]["ci_low"] <= scored[best][primary]["ci_high"]]
            winner = min(tied, key=lambda k: (scored[k]["nfe"], scored[k][primary]["mean"]))
            out[key] = {
                "primary": primary,
                "best_mean": best,
                "tied_with_best": sorted(tied),
                "scored": sorted(scored),
                "not_eligible_valid_below": {"threshold": MIN_VALID, "candidates": invalid},
                "winner": winner,
                "candidates": table,
                "versus_baseline": paired_difference(rows, _challenger(scored, winner, primary), BASELINE, primary),
            }
        else:
            out[key] = {"primary": primary, "winner": None, "candidates": table}
    return out


def _relative_to_best(res: dict, name: str) -> float:
    """``name``'s headline mean over the best mean's, in one dataset's summary (1 for the best; lower is better)."""
    primary = res["primary"]
    return res["candidates"][name][primary]["mean"] / res["candidates"][res["best_mean"]][primary]["mean"]


#: benchmarks/demo_compare.py's recipe -> the training (``trained_as``, else the candidate's name) it runs at the
#: demo's own scale (64^3 brains, the demo's U-Net and budget)
DEMO_RECIPES = {
    "wdm": "wdm_ddim50",
    "jit_2level": "rflow_x_vloss_2level",
    "shortcut_2level": "shortcut_x_2level",
    "shortcut_2level_t0": "shortcut_x_2level_t0",
}
DEMO_COMPARE_JSON = REPO / "benchmarks" / "results" / "demo_compare.json"


def _training_of(name: str) -> str:
    cand = CANDIDATES.get(name, {})
    return "wdm_ddim50" if name == "wdm" else cand.get("trained_as", name)


def demo_scale_check(path: Path = DEMO_COMPARE_JSON) -> dict:
    """The check a recipe passes before it becomes the bundles' default: the demo run at its own scale
    (``benchmarks/demo_compare.py``, one seed) must give samples with a brain's layout, i.e. a mean brain likeness
    (NCC with the mean training volume) at least the lowest of the training cases' own. Per training (``trained_as``):
    ``{"brain_likeness", "real_min", "passed"}``; empty without a demo_compare.json that has the figures."""
    if not path.is_file():
        return {}
    likeness = json.loads(path.read_text()).get("brain_likeness", {})
    if "real" not in likeness:
        return {}
    real_min = min(likeness["real"])
    return {
        DEMO_RECIPES[r]: {
            "brain_likeness": round(float(np.mean(v)), 4),
            "real_min": real_min,
            "passed": bool(np.mean(v) >= real_min),
        }
        for r, v in likeness.items()
        if r in DEMO_RECIPES
    }


def overall(summary: dict, allowed: set[str] | None = None) -> dict:
    """Per training budget, the recipe the rule picks: one that no dataset can tell from its best.

    The candidates in every dataset's tie with the best (:func:`summarize`'s ``tied_with_best``: 3+ seeds, enough
    valid samples, an interval overlapping the best mean's) are the contenders; a candidate not run on every dataset
    is not one. Among them the cheapest sampler wins, then the smallest mean over datasets of its headline relative
    to each dataset's best mean. When no candidate ties everywhere, the one whose worst ratio to a dataset's best
    mean is smallest wins (minimax), among those scored on every dataset (3+ seeds, enough valid samples).
    ``allowed``: only these candidates may be picked (the bundles' default: those that passed
    :func:`demo_scale_check`); the datasets' best means stay those of all candidates.
    """
    out: dict = {}
    for budget in sorted({int(k.split("@")[1]) for k in summary}):
        studies = {k: v for k, v in summary.items() if k.endswith(f"@{budget}") and v.get("winner")}
        if len(studies) < 2:
            continue
        keep = (lambda c: c in allowed) if allowed is not None else (lambda c: True)
        contenders = {c for c in set.intersection(*(set(v["tied_with_best"]) for v in studies.values())) if keep(c)}
        rule = "tied everywhere"
        if not contenders:
            rule = "minimax ratio to the best"
            contenders = {c for c in set.intersection(*(set(v["scored"]) for v in studies.values())) if keep(c)}
        ranked = {
            c: {
                "nfe": max(studies[k]["candidates"][c]["nfe"] for k in studies),
                "relative_to_best": {k: _relative_to_best(studies[k], c) for k in studies},
            }
            for c in contenders
        }
        if rule == "tied everywhere":
            winner = min(
                ranked, key=lambda c: (ranked[c]["nfe"], float(np.mean(list(ranked[c]["relative_to_best"].values()))))
            )
        else:
            winner = min(ranked, key=lambda c: max(ranked[c]["relative_to_best"].values())) if ranked else None
        out[str(budget)] = {
            "rule": rule,
            "datasets": sorted(studies),
            "contenders": ranked,
            "winner": winner,
            "not_run_everywhere": sorted(
                set().union(*(set(v["candidates"]) for v in studies.values()))
                - set.intersection(*(set(v["candidates"]) for v in studies.values()))
            ),
        }
    return out


def bundles_default(summary: dict, check: dict) -> dict:
    """:func:`overall` among the candidates whose training passed :func:`demo_scale_check` (``check``)."""
    return overall(summary, {c for c in CANDIDATES if check.get(_training_of(c), {}).get("passed")})


def markdown(summary: dict, check: dict | None = None) -> str:
    """The report: the rule's pick, the bundles' default (with ``check``, :func:`demo_scale_check`'s result), and a
    table per dataset."""
    lines = []
    default_by_budget = bundles_default(summary, check) if check else {}
    for budget, res in overall(summary).items():
        contenders = (
            ", ".join(
                f"`{c}` ("
                + ", ".join(f"{k.split('@')[0]} {r:.2f}" for k, r in sorted(v["relative_to_best"].items()))
                + ")"
                for c, v in sorted(res["contenders"].items())
            )
            or "none"
        )
        datasets = ", ".join(k.split("@")[0] for k in res["datasets"])
        if res["rule"] == "tied everywhere":
            why = (
                f"Candidates that no dataset ({datasets}) tells from its best, with their headline over each "
                f"dataset's best mean: {contenders}. The cheapest sampler among them wins, then the lowest mean of "
                "these ratios."
            )
        else:
            why = (
                f"No candidate ties with the best on every dataset ({datasets}); the smallest worst-case headline "
                f"over a dataset's best mean wins (minimax). Candidates scored everywhere: {contenders}."
            )
        lines.append(
            f"**Overall, {budget} steps: `{res['winner']}`** (the rule's pick). {why} Not "
            f"run on every dataset, so not a contender: {res['not_run_everywhere']}."
        )
        lines.append("")
        if check:
            default = default_by_budget.get(budget, {})
            checked = ", ".join(
                f"`{t}` {v['brain_likeness']:.3f} ({'passed' if v['passed'] else 'failed'})"
                for t, v in sorted(check.items())
            )
            real_min = next(iter(check.values()))["real_min"]
            lines.append(
                f"**Bundles' default, {budget} steps: `{default.get('winner')}`**: the rule among the trainings that "
                f"passed the demo-scale check (`benchmarks/demo_compare.py`, the demo's own 64^3 run, one seed: mean "
                f"brain likeness of its samples, NCC with the mean training volume, at least the training cases' "
                f"lowest, {real_min:.3f}): {checked}; a training not run there has not passed."
            )
            lines.append("")
    for key, res in summary.items():
        primary = res["primary"]
        dataset, iterations = key.split("@")
        lines.append(
            f"**{dataset}, {iterations} steps** (headline: `{primary}`, lower is better; winner: "
            f"`{res.get('winner')}`; indistinguishable from the best mean: {res.get('tied_with_best', [])})"
        )
        excluded = (res.get("not_eligible_valid_below") or {}).get("candidates")
        if excluded:
            lines.append(
                f"Not eligible to win (fewer than {MIN_VALID:.0%} valid samples on average; the parameter distances "
                f"still score broken samples): {excluded}"
            )
        vs = res.get("versus_baseline")
        if vs:
            lines.append("")
            d = vs["difference"]
            lines.append(
                f"`{vs['candidate']}` minus `{vs['baseline']}`, paired by seed ({len(vs['seeds'])} seeds): "
                f"{d['mean']:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}] `{vs['metric']}` (ratio of means "
                f"{vs['ratio_of_means']:.2f}; an interval that excludes 0 is a difference beyond seed noise)"
            )
        lines.append("")
        cols = [
            "param_w1",
            "param_w1_all",
            "valid",
            "spread_radius",
            "spread_intensity",
            "fid_medicalnet_random",
            "fid_conv3d",
            "mmd2",
            "ms_ssim_gap",
            "copy_fraction",
            "subband_energy_error",
        ]
        cols = [c for c in cols if any(c in v for v in res["candidates"].values())]
        lines.append("| candidate | params | NFE | train s | seeds | " + " | ".join(cols) + " |")
        lines.append("|---" * (5 + len(cols)) + "|")
        for name, v in res["candidates"].items():
            cells = []
            for c in cols:
                m = v.get(c)
                if m is None:
                    cells.append("")
                elif m["mean"] is None:
                    cells.append("undefined")
                elif len(v["seeds"]) < 2:
                    cells.append(f"{m['mean']:.3g}")
                else:
                    cells.append(f"{m['mean']:.3g} [{m['ci_low']:.3g}, {m['ci_high']:.3g}]")
            train = f"{v['train_seconds']:.0f}" + (
                f" + {v['teacher_train_seconds']:.0f} teacher" if "teacher_train_seconds" in v else ""
            )
            lines.append(
                f"| `{name}` | {v['parameters'] / 1e6:.2f}M | {v['nfe']} | {train} | "
                f"{len(v['seeds'])} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    # runs/<dataset>/<candidate>/seed<k>.json (shared trainings sit one level deeper, under runs/<dataset>/_trained)
    records = [
        json.loads(p.read_text()) for out in args.out for p in sorted((Path(out) / "runs").glob("*/*/seed*.json"))
    ]
    if not records:
        raise SystemExit(f"no finished runs under {[str(Path(o) / 'runs') for o in args.out]}")
    summary = summarize(records)
    check = demo_scale_check()
    table = markdown(summary, check)
    print(table)
    if not args.write:
        return
    doc = {
        "benchmark": "benchmarks/quality.py",
        "machine": records[-1]["machine"],
        "command": "python benchmarks/quality.py run OUT " + (args.command or ""),
        "candidates": {
            k: {**v, "net": {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v["net"].items()}}
            for k, v in CANDIDATES.items()
        },
        "summary": summary,
        "overall": overall(summary),
        "demo_scale_check": check,
        "default": bundles_default(summary, check) if check else None,
        "records": records,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    text = BENCHMARKS_MD.read_text()
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        _, tail = rest.split(MARK_END, 1)
        BENCHMARKS_MD.write_text(f"{head}{MARK_BEGIN}\n{table}\n{MARK_END}{tail}")
    print(f"wrote {RESULTS_JSON}" + (" and the table in BENCHMARKS.md" if MARK_BEGIN in text else ""))


def _eligible(entry: dict, primary: str) -> bool:
    """A candidate with a finite headline figure and, on known-truth data, at least MIN_VALID valid samples."""
    valid = entry.get("valid", {}).get("mean")
    return entry.get(primary, {}).get("mean") is not None and (valid is None or valid >= MIN_VALID)


def few_step(args: argparse.Namespace) -> None:
    """The few-step view of quality.json (issue 25): every flow-map run (1, 2, 4 steps) beside the best multi-step
    sampler at 30-50 steps of the same dataset and budget, each a record ``{candidate, steps, dataset, seed, ...}``,
    and per few-step candidate its headline metric relative to that best multi-step one (paired by seed), written to
    ``benchmarks/results/few_step.json``."""
    source = json.loads(RESULTS_JSON.read_text())
    records = source["records"]
    few = {k for k, v in CANDIDATES.items() if v["diffusion"].get("flow_map")}
    multi = {k for k, v in CANDIDATES.items() if k not in few and 30 <= v["steps"] <= 50}
    summary: dict = {}
    for key, res in source["summary"].items():
        table = res["candidates"]
        primary = res["primary"]

        ranked = sorted(
            (k for k in multi if _eligible(table.get(k, {}), primary)), key=lambda k: table[k][primary]["mean"]
        )
        rows = [r for r in records if study_key(r) == key]
        if not ranked or not any(r["candidate"] in few for r in rows):
            continue
        best = ranked[0]
        versus = {}
        for name in sorted(few & {r["candidate"] for r in rows}):
            diff = paired_difference(rows, name, best, primary)
            if diff is not None:
                entry = table[name]
                diff["within_10_percent"] = bool(diff["ratio_of_means"] <= 1.10)
                diff["valid"] = entry.get("valid", {}).get("mean")
                diff["nfe"] = entry["nfe"]
                versus[name] = diff
        summary[key] = {
            "primary": primary,
            "best_multi_step": best,
            "best_multi_step_nfe": table[best]["nfe"],
            "few_step": versus,
        }
    keep = {k for k in few | multi}
    doc = {
        "benchmark": "benchmarks/quality.py few-step",
        "source": "benchmarks/results/quality.json",
        "machine": source["machine"],
        "command": source["command"],
        "summary": summary,
        "records": [
            {
                "candidate": r["candidate"],
                "steps": CANDIDATES[r["candidate"]]["steps"],
                "dataset": r["dataset"],
                "seed": r["seed"],
                "iterations": r["iterations"],
                "nfe": r["nfe"],
                "train_seconds": r["train_seconds"],
                "sample_seconds": r["sample_seconds"],
                # a distilled flow map's extra cost: its teacher's training (and one teacher pass per student step)
                **(
                    {
                        "teacher": CANDIDATES[r["candidate"]]["teacher"],
                        "teacher_train_seconds": r["teacher_train_seconds"],
                    }
                    if "teacher_train_seconds" in r
                    else {}
                ),
                "metrics": r["metrics"],
            }
            for r in records
            if r["candidate"] in keep
        ],
    }
    FEW_STEP_JSON.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    for key, res in summary.items():
        for name, d in res["few_step"].items():
            print(
                f"{key} {name} vs {res['best_multi_step']}: {res['primary']} ratio {d['ratio_of_means']:.2f}, "
                f"difference {d['difference']['mean']:+.3g} [{d['difference']['ci_low']:+.3g}, "
                f"{d['difference']['ci_high']:+.3g}], valid {d['valid']}"
            )
    print(f"wrote {FEW_STEP_JSON}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train, sample and score (finished runs are skipped)")
    r.add_argument("out")
    r.add_argument("--dataset", nargs="+", default=["shapes32"], choices=["shapes32", "shapes64", "demo32"])
    r.add_argument("--candidates", nargs="+", default=["all"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--iterations", type=int, default=600)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--num-samples", type=int, default=32)
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--ema-decay", type=float, default=0.995)
    r.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("report", help="aggregate finished runs")
    p.add_argument("out", nargs="+", help="one or more study folders (e.g. one per training budget)")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/quality.json and BENCHMARKS.md")
    p.add_argument("--command", default="", help="the run arguments, recorded in the JSON")
    sub.add_parser("few-step", help="write benchmarks/results/few_step.json from quality.json (flow-map rows)")
    args = parser.parse_args(argv)
    {"run": run, "report": report, "few-step": few_step}[args.cmd](args)


if __name__ == "__main__":
    main()
