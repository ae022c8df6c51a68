"""Issue 9's quality check: does a few-step sampler give up quality against DDPM-1000? Measured on the demo data.

Runs the ``wdm3d_brats`` bundle's own configs (``train.json`` / ``inference.json`` + ``demo.json``) end to end:

1. writes the embedded demo dataset (``data_prep.demo``) at ``--size`` (32: 8 mm voxels, 64: 4 mm, 128: 2 mm) with
   every case in the training split, which is also the real reference set of the metrics;
2. trains the demo U-Net for ``--iterations`` with WDM's process (``ddpm``, x0 prediction) and, unless
   ``--no-rflow``, the same network with rectified flow (``diffusion#process rflow``);
3. generates ``--num-samples`` volumes per sampler: from the ddpm model DDPM-1000 (the reference), DDPM-1000 again
   with another seed (the noise floor: how far the metrics move with the seed alone at this N), and DDIM at each
   of ``--ddim-steps``; from the rflow model RFlow at each of ``--rflow-steps``. The few-step sets start from the
   reference's seed (the same initial noise: common random numbers, which narrows the comparison to the sampler;
   the noise-floor row shows what an independent draw adds);
4. evaluates every set with ``wdm3d.evaluate`` against the real set: 3D FID (random conv3d features unless
   ``--weights`` gives MedicalNet's; either way compared only within this run), MS-SSIM diversity, the intensity
   Wasserstein distance and the RBF MMD on features and on voxels;
5. reports each metric beside DDPM-1000's as a ratio, and whether the set is within ``--tolerance`` (issue 9: 10%)
   of it: for the distances (FID, W1, MMD; lower is better) "not more than 10% above DDPM-1000's", for MS-SSIM
   (closer to the real set's value is better) "within 10% either way".

Writes ``OUT/results.json`` and ``OUT/results.md``; data, models and samples stay under ``OUT/work`` and are reused
by a re-run (delete a folder to redo that step).

    python benchmarks/sampler_quality.py /tmp/sq                       # 32^3, CPU: about 30 min on 2 cores
    python benchmarks/sampler_quality.py /tmp/sq128 --size 128 --iterations 20000 --device cuda --weights r50.pth
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

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # data_prep and wdm3d from this checkout when run as a script
    sys.path.insert(0, str(REPO))

RESOLUTION = {32: 4, 64: 2, 128: 1}  # data_prep.demo --resolution for a prepared size (pooled by 2)
METRICS = {  # key in the evaluation results -> (label, lower is better)
    "fid": ("FID", True),
    "ms_ssim": ("MS-SSIM", False),
    "wasserstein": ("intensity W1", True),
    "mmd_features": ("MMD features", True),
    "mmd_voxels": ("MMD voxels", True),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(work: Path, size: int, num_cases: int, seed: int) -> Path:
    """The demo dataset at ``size``^3 with every case in ``training`` (``datalist_all.json``)."""
    from data_prep.demo import make_demo_dataset

    dst = work / f"demo{size}"
    datalist = dst / "prepared" / "datalist.json"
    if not datalist.is_file():
        make_demo_dataset(dst, num_cases=num_cases, seed=seed, resolution=RESOLUTION[size], pool=2, progress=False)
    data = json.loads(datalist.read_text())
    cases = sorted(
        (e for split in ("training", "validation", "test") for e in data.get(split, [])), key=lambda e: e["case"]
    )
    everything = {k: v for k, v in data.items() if not isinstance(v, list) or k == "modalities"}
    everything.update(training=cases, validation=[], test=[])
    path = dst / "prepared" / "datalist_all.json"
    path.write_text(json.dumps(everything, indent=2))
    return path


def common(process: str, size: int, datalist: Path, work: Path, device: str) -> dict:
    # the two processes as issue 9 measured them (one Haar level, unweighted loss), not the bundle's current default
    extra = {
        "diffusion#process": process,
        "diffusion#levels": 1,
        "diffusion#loss_weighting": "none",
        "diffusion#prediction_type": "v_prediction" if process == "rflow" else "sample",
        "diffusion#rflow_sample_method": "uniform",
    }
    return {
        "dataset_dir": str(datalist.parent),
        "datalist": str(datalist),
        "output_dir": str(work / process),
        "image_size": [size] * 3,
        "mlflow": False,
        "device": f"$torch.device('{device}')",
        **extra,
    }


def checkpoint_of(work: Path, process: str) -> Path | None:
    found = sorted((work / process / "models").glob("*.pt"))
    return found[-1] if found else None


def train(process: str, args, datalist: Path, work: Path) -> dict:
    """Train (or reuse) the ``process`` model; returns iterations, epochs and seconds."""
    from wdm3d.bundle import run_bundle

    num_cases = len(json.loads(datalist.read_text())["training"])
    per_epoch = math.ceil(num_cases / args.batch_size)
    epochs = max(1, math.ceil(args.iterations / per_epoch))
    info = {"iterations": epochs * per_epoch, "epochs": epochs, "batch_size": args.batch_size}
    done = work / process / "trained.json"
    if done.is_file() and checkpoint_of(work, process) is not None:
        log(f"{process}: reusing {checkpoint_of(work, process)}")
        return json.loads(done.read_text())
    log(f"{process}: training {info['iterations']} iterations ({epochs} epochs of {per_epoch})")
    t0 = time.perf_counter()
    run_bundle(
        "wdm3d_brats",
        "training",
        ["train.json", "demo.json"],
        **common(process, args.size, datalist, work, args.device),
        seed=args.seed,
        max_epochs=epochs,
        batch_size=args.batch_size,
        resume=False,
        save_interval=epochs,
        val_interval=epochs,
        val_sampler="rflow" if process == "rflow" else "ddim",
        **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
    )
    info["seconds"] = round(time.perf_counter() - t0, 1)
    done.write_text(json.dumps(info))
    return info


def generate(name: str, process: str, sampler: str, steps: int, seed: int, args, datalist: Path, work: Path) -> dict:
    """``--num-samples`` volumes of one sampler into ``work/samples/<name>`` (reused when already complete)."""
    from wdm3d.bundle import run_bundle

    out = work / "samples" / name
    manifest, timing_file = out / "manifest.json", out / "timing.json"
    if (
        manifest.is_file()
        and timing_file.is_file()
        and len(json.loads(manifest.read_text())["samples"]) == args.num_samples
    ):
        log(f"{name}: reusing {out}")
        return json.loads(timing_file.read_text())
    log(f"{name}: {args.num_samples} volumes, {sampler}-{steps}, seed {seed}")
    t0 = time.perf_counter()
    run_bundle(
        "wdm3d_brats",
        "inference",
        ["inference.json", "demo.json"],
        **common(process, args.size, datalist, work, args.device),
        samples_dir=str(out),
        num_samples=args.num_samples,
        batch_size=args.sample_batch,
        sampler=sampler,
        num_steps=steps,
        seed=seed,
        eta=0.0,
    )
    seconds = time.perf_counter() - t0
    timing = {"seconds": round(seconds, 1), "seconds_per_volume": round(seconds / args.num_samples, 3)}
    timing_file.write_text(json.dumps(timing))
    return timing


def evaluate_set(name: str, args, datalist: Path, work: Path) -> dict:
    from wdm3d.evaluate import evaluate

    res = evaluate(
        datalist,
        work / "samples" / name,
        out_dir=work / "samples" / name / "evaluation",
        weights=args.weights,
        features="medicalnet" if args.weights else "random_conv3d",
        mlflow=False,
        progress=False,
        device=args.device,
        seed=0,
        pairs=args.pairs,
        image_key="t1n",
    )
    return {
        "fid": res["fid"]["fid"],
        "extractor": res["fid"]["extractor"],
        "ms_ssim": res["ms_ssim"]["fake"]["mean"],
        "ms_ssim_real": res["ms_ssim"]["real"]["mean"],
        "wasserstein": res["wasserstein"]["wasserstein"],
        "mmd_features": res["mmd_features"]["mmd"],
        "mmd_voxels": res["mmd_voxels"]["mmd"],
        "copy_fraction": res["memorization"]["copy_fraction"],
        "n_fake": res["n_fake"],
        "n_real": res["n_real"],
    }


def compare(values: dict, reference: dict, tolerance: float) -> dict:
    """Ratios to the reference and the verdict per metric (see the module docstring)."""
    out = {}
    for key, (_, lower_better) in METRICS.items():
        v, ref = values[key], reference[key]
        ratio = v / ref if ref else (1.0 if v == ref else math.inf)
        ok = ratio <= 1 + tolerance if lower_better else abs(ratio - 1) <= tolerance
        out[key] = {"ratio": ratio, "within": bool(ok)}
    out["all_within"] = all(out[k]["within"] for k in METRICS)
    return out


def sets(args) -> list[dict]:
    """The sample sets: name, model, sampler, steps, seed, role."""
    rows = [
        {
            "name": f"ddpm{args.ddpm_steps}",
            "process": "ddpm",
            "sampler": "ddpm",
            "steps": args.ddpm_steps,
            "seed": args.seed + 1,
            "role": "reference",
        },
        {
            "name": f"ddpm{args.ddpm_steps}_seed2",
            "process": "ddpm",
            "sampler": "ddpm",
            "steps": args.ddpm_steps,
            "seed": args.seed + 2,
            "role": "noise floor (same sampler, other seed)",
        },
    ]
    rows += [
        {
            "name": f"ddim{n}",
            "process": "ddpm",
            "sampler": "ddim",
            "steps": n,
            "seed": args.seed + 1,
            "role": "few-step",
        }
        for n in args.ddim_steps
    ]
    if not args.no_rflow:
        rows += [
            {
                "name": f"rflow{n}",
                "process": "rflow",
                "sampler": "rflow",
                "steps": n,
                "seed": args.seed + 1,
                "role": "few-step (rflow model)",
            }
            for n in args.rflow_steps
        ]
    return rows


def environment(device: str) -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["cpu"] = (
            next(
                (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor(),
            )
            if os.path.isfile("/proc/cpuinfo")
            else platform.processor()
        )
        env["cores"] = os.cpu_count()
    return env


def markdown(result: dict) -> str:
    a, env = result["settings"], result["environment"]
    machine = env.get("gpu") or f"{env.get('cpu')}, {env.get('cores')} cores"
    ref = result["sets"][0]
    lines = [
        f"Machine: {machine}; torch {env['torch']}; {env['date']}. Demo data at {a['size']}^3 ({a['num_cases']} cases, "
        f"all of them the real set), wdm3d_brats demo U-Net, {result['training']['ddpm']['iterations']} iterations "
        f"per model at batch {a['batch_size']}; {a['num_samples']} volumes per sampler; features: "
        f"{ref['metrics']['extractor']} ({'comparable with papers' if ref['metrics']['extractor'] == 'medicalnet' else 'NOT comparable with papers: relative use only'}); "
        f"tolerance {a['tolerance']:.0%} of {ref['name'].upper()}'s value.",
        "",
        "| set | model | role | s / volume | "
        + " | ".join(label for label, _ in METRICS.values())
        + " | ratios to the reference | within |",
        "|---|---|---|---|" + "---|" * len(METRICS) + "---|---|",
    ]
    for s in result["sets"]:
        m, c = s["metrics"], s["comparison"]
        vals = " | ".join(f"{m[k]:.4g}" for k in METRICS)
        ratios = ", ".join(f"{METRICS[k][0]} {c[k]['ratio']:.2f}" for k in METRICS)
        within = (
            "reference"
            if s["role"] == "reference"
            else (
                "yes" if c["all_within"] else "no: " + ", ".join(METRICS[k][0] for k in METRICS if not c[k]["within"])
            )
        )
        lines.append(
            f"| {s['sampler'].upper()}-{s['steps']} (seed {s['seed']}) | {s['process']} | {s['role']} "
            f"| {s['timing']['seconds_per_volume']:.2f} | {vals} | {ratios} | {within} |"
        )
    lines += [
        "",
        f"Real set's own MS-SSIM: {ref['metrics']['ms_ssim_real']:.4g}. Training: "
        + "; ".join(f"{p} {t['iterations']} its in {t.get('seconds', '?')} s" for p, t in result["training"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32, choices=sorted(RESOLUTION))
    parser.add_argument("--num-cases", type=int, default=32, help="demo cases (the real set)")
    parser.add_argument("--iterations", type=int, default=3000, help="training iterations per model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: demo.json's")
    parser.add_argument("--num-samples", type=int, default=32, help="volumes per sampler")
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--ddim-steps", type=int, nargs="*", default=[50, 20, 10])
    parser.add_argument("--rflow-steps", type=int, nargs="*", default=[30, 10])
    parser.add_argument("--no-rflow", action="store_true", help="skip the rectified-flow model")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--weights", default=None, help="MedicalNet resnet_50_23dataset.pth (else random conv3d)")
    parser.add_argument("--pairs", type=int, default=100, help="MS-SSIM pairs per set")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    datalist = make_data(work, args.size, args.num_cases, args.seed)
    plan = sets(args)
    training = {p: train(p, args, datalist, work) for p in dict.fromkeys(s["process"] for s in plan)}
    for s in plan:
        s["timing"] = generate(s["name"], s["process"], s["sampler"], s["steps"], s["seed"], args, datalist, work)
        s["metrics"] = evaluate_set(s["name"], args, datalist, work)
        log(f"{s['name']}: " + ", ".join(f"{METRICS[k][0]} {s['metrics'][k]:.4g}" for k in METRICS))
    for s in plan:
        s["comparison"] = compare(s["metrics"], plan[0]["metrics"], args.tolerance)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"settings": settings, "environment": environment(args.device), "training": training, "sets": plan}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
