"""Issue 7's measurement on the embedded demo data: IP-Adapter vs concatenation vs unconditional, on CPU.

Runs the ip_adapter_brats bundle's own configs (with demo.json) end to end:

1. writes the demo dataset (``data_prep.demo``: T1n + a synthetic T2w per case, same geometry) and a split with
   ``--eval-cases`` held-out cases;
2. times one training iteration at 64^3 and, unless ``--size`` is given, keeps 64^3 only if the whole run fits the
   ``--budget-minutes`` (else 32^3), and picks the iteration count from the measured speed (or ``--iterations``);
3. trains the context-conditioned base (all modalities), the IP-Adapter on the frozen base (random frozen conv
   encoder: no trained WF-VAE here) and the cWDM-style concat baseline, each for the same number of iterations;
4. paired synthesis T1n -> T2w on the held-out cases: PSNR / SSIM / MAE against the true T2w for the IP-Adapter
   (lambda 1, guidance 1 and 3), concat, and the base conditioned on the modality only ("unconditional");
5. reference-guided generation (T1n from a T1n reference) at lambda 0 (= the base, unconditional), 0.5 and 1:
   SSIM / PSNR of the samples to their reference and to the other held-out cases.

Writes ``OUT/results.json`` and ``OUT/results.md`` (the tables, machine, settings); everything else (data, models,
volumes, montages) stays under ``OUT/work``.

    python benchmarks/ip_adapter_demo.py /tmp/ipa_bench                   # chooses size and iterations (~25 min)
    python benchmarks/ip_adapter_demo.py /tmp/ipa_bench --size 32 --iterations 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "ip_adapter_brats" / "configs"
RESOLUTION = {64: 2, 32: 4}  # data_prep.demo --resolution for a prepared size


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def workflow(files: list[str], run_id: str, **overrides):
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


def make_data(work: Path, size: int, num_cases: int, eval_cases: int) -> Path:
    """Demo dataset at ``size``^3 with the last ``eval_cases`` cases held out (``test``)."""
    from data_prep.demo import make_demo_dataset

    dst = work / f"demo{size}"
    datalist = dst / "prepared" / "datalist.json"
    if not datalist.is_file():
        make_demo_dataset(dst, num_cases=num_cases, resolution=RESOLUTION[size], progress=False)
    data = json.loads(datalist.read_text())
    cases = [e for split in ("training", "validation", "test") for e in data.get(split, [])]
    cases.sort(key=lambda e: e["case"])
    bench = {k: v for k, v in data.items() if not isinstance(v, list) or k == "modalities"}
    bench.update(training=cases[:-eval_cases], validation=cases[-eval_cases:], test=cases[-eval_cases:])
    path = dst / "prepared" / "datalist_bench.json"
    path.write_text(json.dumps(bench, indent=2))
    return path


def common(size: int, datalist: Path, out: Path, seed: int) -> dict:
    return {
        "dataset_dir": str(datalist.parent),
        "datalist": str(datalist),
        "output_dir": str(out),
        "mlflow": False,
        "seed": seed,
        **({"image_size": [32, 32, 32]} if size == 32 else {}),
    }


def train(files: list[str], iterations: int, size: int, datalist: Path, out: Path, seed: int, **extra) -> float:
    """Train ``iterations`` iterations (one epoch of that length); returns seconds per iteration (the epoch's own
    time, without data caching, start-up and end-of-run handlers; the first iteration after a warm-up one)."""
    wf = workflow(
        files,
        "training",
        **common(size, datalist, out, seed),
        max_epochs=1,
        epoch_length=iterations,
        save_interval=1,
        save_every_iterations=0,
        resume=False,
        val_num_steps=10,
        **extra,
    )
    wf.run()
    state = wf.parser.get_parsed_content("train#trainer").state
    return float(state.times["EPOCH_COMPLETED"]) / iterations


def synthesize(size: int, datalist: Path, out: Path, seed: int, steps: int, **extra) -> dict:
    files = ["inference.json", "demo.json"] + (["concat.json"] if extra.get("method") == "concat" else [])
    wf = workflow(
        files,
        "inference",
        **common(size, datalist, out, seed),
        sampler="ddim",
        num_steps=steps,
        max_cases=None,
        progress=False,
        **extra,
    )
    t0 = time.perf_counter()
    manifest = wf.parser.get_parsed_content("evaluator").run()
    folder = Path(wf.parser.get_parsed_content("synthesis_dir"))
    metrics = json.loads((folder / "metrics.json").read_text())
    return {
        "metrics": metrics,
        "seconds": time.perf_counter() - t0,
        "folder": str(folder),
        "failures": manifest["failures"],
    }


def probe(work: Path, size: int, args) -> dict:
    """Seconds per training iteration (base, adapter) and per network forward at ``size``^3."""
    datalist = make_data(work, size, args.num_cases, args.eval_cases)
    out = work / f"probe{size}"
    t_base = train(
        ["train_base.json", "demo.json"], 4, size, datalist, out, args.seed, **{"train#validator#enabled": False}
    )
    t_adapter = train(["train.json", "demo.json"], 4, size, datalist, out, args.seed)
    wf = workflow(["train_base.json", "demo.json"], "training", **common(size, datalist, out, args.seed))
    net = wf.parser.get_parsed_content("network").eval()
    x = torch.randn(1, 8, size // 2, size // 2, size // 2)
    times = []
    with torch.no_grad():
        for _ in range(6):  # the first is a warm-up; the fastest of the rest is the least disturbed by other jobs
            t0 = time.perf_counter()
            net(x, torch.tensor([500]))
            times.append(time.perf_counter() - t0)
    t_fwd = min(times[1:])
    return {"size": size, "train_base_s": t_base, "train_adapter_s": t_adapter, "forward_s": t_fwd}


def sampling_forwards(args) -> int:
    """Network forwards of the evaluation (paired: 3 methods + guided IP-Adapter; reference-guided)."""
    k, s, n = args.eval_cases, args.num_steps, args.num_samples
    paired = k * s * (1 + 1 + 1 + 2)  # ip_adapter g=1, concat, base, ip_adapter g=3 (two branches)
    guided = (k * 2 * n + n) * s  # lambda 0.5 and 1 per reference; lambda 0 once (same seeds for every reference)
    return paired + guided


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Machine: {result['machine']}. Demo data (`data_prep.demo`, {s['num_cases']} cases: "
        f"{s['train_cases']} for training, {s['eval_cases']} held out), {s['size']}^3 ({s['voxel_mm']} mm), "
        f"{s['iterations']} training iterations each (batch {s['batch_size']}), DDIM-{s['num_steps']} sampling, "
        f"image encoder: {s['image_encoder']}. Seconds per iteration: base {s['seconds_per_iteration']['base']:.2f}, "
        f"adapter {s['seconds_per_iteration']['ip_adapter']:.2f}, concat {s['seconds_per_iteration']['concat']:.2f}. "
        f"Total {result['minutes_total']:.1f} min.",
        "",
        f"Paired synthesis T1n -> T2w on the {s['eval_cases']} held-out cases (whole volume in [-1, 1]; mean +- sd):",
        "",
        "| method | PSNR (dB) | SSIM | MAE |",
        "|---|---|---|---|",
    ]
    for row in result["paired"]:
        m = row["summary"]
        lines.append(
            f"| {row['label']} | {m['psnr_mean']:.2f} +- {m['psnr_std']:.2f} | {m['ssim_mean']:.4f} +- "
            f"{m['ssim_std']:.4f} | {m['mae_mean']:.4f} +- {m['mae_std']:.4f} |"
        )
    lines += [
        "",
        f"Reference-guided generation (T1n from a T1n reference; {s['num_samples']} samples per reference and lambda, "
        "the same seeds at every lambda; lambda 0 = the base alone = unconditional samples):",
        "",
        "| lambda | SSIM to reference | SSIM to other cases | margin | PSNR to reference (dB) | PSNR to others (dB) "
        "| SSIM between samples |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(v, d=4):
        return "n/a" if v is None else f"{v:.{d}f}"

    for lam, m in result["reference_guided"].items():
        lines.append(
            f"| {lam} | {f(m['ssim_to_reference'])} | {f(m['ssim_to_others'])} | {f(m['ssim_margin'])} | "
            f"{f(m['psnr_to_reference'], 2)} | {f(m['psnr_to_others'], 2)} | {f(m['ssim_between_samples'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="results folder (results.json, results.md, work/)")
    parser.add_argument("--size", type=int, choices=(32, 64), default=None, help="volume size (default: measured)")
    parser.add_argument(
        "--iterations", type=int, default=None, help="training iterations per model (default: what fits the budget)"
    )
    parser.add_argument("--budget-minutes", type=float, default=25.0)
    parser.add_argument("--num-cases", type=int, default=16)
    parser.add_argument("--eval-cases", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--num-samples", type=int, default=2, help="reference-guided samples per reference and lambda")
    parser.add_argument("--guidance", type=float, default=3.0, help="the second IP-Adapter guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a 2-core machine shared "
        "with another job, 2 threads ran a 32^3 step 10x slower than 1; use 2 on an idle machine)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_minutes * 60

    # 1-2: size and iterations from measured speed
    probes = {}
    size = args.size
    forwards = sampling_forwards(args)
    if size is None:
        probes[64] = p = probe(work, 64, args)
        log(
            f"64^3: {p['train_base_s']:.2f} s/iteration (base), {p['train_adapter_s']:.2f} (adapter), "
            f"{p['forward_s']:.3f} s/forward"
        )
        need = forwards * p["forward_s"] + 100 * (2 * p["train_base_s"] + p["train_adapter_s"])
        # a shared machine can be several times slower than a quiet probe: keep a wide margin
        size = 64 if need < 0.4 * budget - (time.perf_counter() - t_start) else 32
        log(
            f"{forwards} sampling forwards + 100 iterations per model at 64^3 would take ~{need / 60:.1f} min: "
            f"using {size}^3"
        )
    if size not in probes:
        probes[size] = p = probe(work, size, args)
        log(
            f"{size}^3: {p['train_base_s']:.2f} s/iteration (base), {p['train_adapter_s']:.2f} (adapter), "
            f"{p['forward_s']:.3f} s/forward"
        )
    p = probes[size]
    iterations = args.iterations
    if iterations is None:
        left = budget - (time.perf_counter() - t_start) - 1.3 * forwards * p["forward_s"] - 60
        iterations = int(max(20, min(2000, 0.7 * left / (2 * p["train_base_s"] + p["train_adapter_s"]))))
        log(f"{iterations} training iterations per model fit the budget")
    datalist = make_data(work, size, args.num_cases, args.eval_cases)
    data = json.loads(datalist.read_text())
    out = work / "bundle"

    # 3: training, the same number of iterations each
    seconds = {}
    log(f"training the base ({iterations} iterations, {size}^3)")
    seconds["base"] = train(
        ["train_base.json", "demo.json"],
        iterations,
        size,
        datalist,
        out,
        args.seed,
        **{"train#validator#enabled": False},
    )
    log(f"training the IP-Adapter on the frozen base ({iterations} iterations)")
    seconds["ip_adapter"] = train(["train.json", "demo.json"], iterations, size, datalist, out, args.seed)
    log(f"training the concat baseline from scratch ({iterations} iterations)")
    seconds["concat"] = train(
        ["train_base.json", "concat.json", "demo.json"], iterations, size, datalist, out, args.seed
    )
    log(f"seconds per iteration: {seconds}")

    # 4: paired synthesis
    runs = [
        ("IP-Adapter (lambda 1, guidance 1)", {"method": "ip_adapter", "ip_scale": 1.0, "guidance_scale": 1.0}),
        (
            f"IP-Adapter (lambda 1, guidance {args.guidance:g} on the image)",
            {
                "method": "ip_adapter",
                "ip_scale": 1.0,
                "guidance_scale": args.guidance,
                "synthesis_dir": str(out / "synthesis" / f"paired_ip_adapter_g{args.guidance:g}"),
            },
        ),
        ("concat (cWDM-style)", {"method": "concat"}),
        ("unconditional (base, target modality only)", {"method": "base"}),
    ]
    paired = []
    for label, extra in runs:
        log(f"paired synthesis: {label}")
        r = synthesize(size, datalist, out, args.seed, args.num_steps, mode="paired", **extra)
        paired.append(
            {
                "label": label,
                "summary": r["metrics"]["summary"],
                "cases": r["metrics"]["cases"],
                "seconds": round(r["seconds"], 1),
                "folder": r["folder"],
                "failures": r["failures"],
            }
        )
        m = r["metrics"]["summary"]
        log(
            f"  PSNR {m['psnr_mean']:.2f} dB, SSIM {m['ssim_mean']:.4f}, MAE {m['mae_mean']:.4f} ({r['seconds']:.0f} s)"
        )

    # 5: reference-guided generation
    log("reference-guided generation, lambda 0 / 0.5 / 1")
    r = synthesize(
        size,
        datalist,
        out,
        args.seed,
        args.num_steps,
        mode="reference_guided",
        method="ip_adapter",
        ip_scales=[0.0, 0.5, 1.0],
        num_samples=args.num_samples,
    )
    guided = r["metrics"]["summary"]

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "settings": {
            "size": size,
            "voxel_mm": 256 // size,
            "num_cases": args.num_cases,
            "train_cases": len(data["training"]),
            "eval_cases": len(data["test"]),
            "iterations": iterations,
            "batch_size": 4,
            "num_steps": args.num_steps,
            "num_samples": args.num_samples,
            "image_encoder": "random frozen conv net (RandomConv3dFeatures, 480 global features; no trained WF-VAE)",
            "configs": "train_base.json / train.json / train_base.json+concat.json, each + demo.json",
            "seconds_per_iteration": seconds,
            "probes": probes,
            "seed": args.seed,
            "learning_rate": 2e-4,
        },
        "paired": paired,
        "reference_guided": guided,
        "reference_guided_folder": r["folder"],
        "minutes_total": (time.perf_counter() - t_start) / 60,
        "command": " ".join(sys.argv),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(markdown(result))
    print(markdown(result))
    log(f"results in {args.out / 'results.json'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
