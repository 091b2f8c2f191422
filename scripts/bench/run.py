#!/usr/bin/env python
"""align_runner vs TRL, side by side on one machine in one invocation, reported as ratios.

    python scripts/bench/run.py all             # every case: sft, sft_packed, reward, reward_packed, dpo, dpo_packed, grpo
    python scripts/bench/run.py sft             # one case; SmolLM2-135M architecture, random init, fp32
    python scripts/bench/run.py all --quick     # a 2-layer Llama and a few rows: smoke test
    python scripts/bench/run.py dpo --repeats 3 --only align_runner --threads 1

A *case* (``CASES``, one module each in ``cases/``) is one training algorithm measured on both sides.
One first worker measures this machine's fp32 matmul peak (while it is fresh, with the benchmark's
thread count), then builds the random-init model every case loads and each case's data (its
``prepare``); then one worker per side and repeat trains in a fresh Python process (``run.py _worker
<case> <side> <spec> <result>``), timing the training part only and reporting its peak RSS. Runs alternate TRL, align_runner, TRL, align_runner ...; the
medians go to ``results/<case>.json`` / ``.md`` (``<case>-quick`` with ``--quick``), and with ``all``
one table of every case to ``results/suite.json`` / ``.md``.

TRL is only the peer we measure against (``pip install --no-deps trl`` or the ``bench`` extra); when it
is not importable the align_runner side still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cases import dpo, grpo, reward, sft
from common import (
    MODELS,
    RESULTS,
    SIDES,
    Case,
    build_model,
    code_fingerprint,
    machine,
    peak_memory,
    trl_available,
    worker_env,
)
from report import case_markdown, suite_markdown, suite_rows

CASES: dict[str, Case] = {
    "sft": sft.SFT,
    "sft_packed": sft.SFT_PACKED,
    "reward": reward.CASE,
    "reward_packed": reward.PACKED,
    "dpo": dpo.CASE,
    "dpo_packed": dpo.PACKED,
    "grpo": grpo.CASE,
}
# the worker (no case) that measures the matmul peak, then builds the model and every case's data
PREPARE = "_prepare"
# the model's random init
MODEL_SEED = 0
# the matmul peak's square sizes: device -> (full, --quick); a GPU needs large products to reach its peak
PEAK_SIZES = {"cpu": ([2048, 4096], [512, 1024]), "cuda": ([4096, 8192], [1024, 2048])}


def spawn(case: str, role: str, spec_path: Path, result_path: Path, log: Path, threads: int) -> dict:
    """Run one worker in a fresh process; its result dict (raises with the log's tail on failure)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", case, role, str(spec_path), str(result_path)]
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=worker_env(threads), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"bench worker {case}/{role} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return json.loads(result_path.read_text())


def worker_main(case: str, role: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    code = code_fingerprint()  # before importing: the align_runner this process is about to run
    import torch

    torch.set_num_threads(int(spec["threads"]))
    if case == PREPARE:
        out = prepare_worker(spec)
    else:
        c = CASES[case]
        out = (c.prepare if role == "prepare" else c.workers[role])(spec)
        if role != "prepare":
            # a worker that builds more after training (the overhead replay) reports training's peak itself
            for key, value in peak_memory().items():
                out.setdefault(key, value)
            out.update(threads=torch.get_num_threads(), code=code)
    Path(result_path).write_text(json.dumps(out, indent=2))


def prepare_worker(spec: dict) -> dict:
    """The matmul peak (first, while this process is fresh), the model, and each case's data."""
    from measure import matmul_peak

    peak = matmul_peak(tuple(spec["peak_sizes"]), int(spec["peak_repeats"]), spec["device"])
    out = {"matmul_peak": peak, **build_model(spec)}
    out["cases"] = {}
    for name, case_spec in spec["cases"].items():
        Path(case_spec["workdir"]).mkdir(parents=True)
        out["cases"][name] = CASES[name].prepare({**case_spec, "model": out["model"]})
    return out


def prepare(args: argparse.Namespace, names: list[str], workdir: Path) -> tuple[dict, dict[str, dict]]:
    """One worker, with the benchmark's thread count: this machine's fp32 matmul FLOP/s, the random-init
    model every case loads, and every case's data. Returns (peak, {case: its spec})."""
    model_dir = str(workdir / "model")
    cases = {
        name: {
            "case": name,
            "quick": bool(args.quick),
            "threads": args.threads,
            "device": args.device,
            "settings": CASES[name].settings(args),
            "align_runner_overrides": list(args.set),
            "workdir": str(workdir / name),
            "model_dir": model_dir,
        }
        for name in names
    }
    spec = {
        "quick": bool(args.quick),
        "threads": args.threads,
        "device": args.device,
        "settings": {"seed": MODEL_SEED},
        "model_name": args.model,
        "tokenizer_dir": str(args.tokenizer) if args.tokenizer else None,
        "model_dir": model_dir,
        "peak_sizes": PEAK_SIZES[args.device][bool(args.quick)],
        "peak_repeats": 3 if args.quick else 5,
        "cases": cases,
    }
    (workdir / "prepare.json").write_text(json.dumps(spec))
    print(f"bench: measuring the matmul peak, building the model and data in {workdir} ...", flush=True)
    out = spawn(PREPARE, "prepare", workdir / "prepare.json", workdir / "prepared.json", workdir / "prepare.log", args.threads)
    peak = out["matmul_peak"]
    print(
        f"bench: {peak['dtype']} matmul peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s on {peak['device']}; model: {out['model']['parameters'] / 1e6:.1f}M "
        f"parameters, tokenizer: {out['model']['tokenizer']}",
        flush=True,
    )
    return peak, {name: {**spec, "model": out["model"], **out["cases"][name]} for name, spec in cases.items()}


def run_case(name: str, args: argparse.Namespace, peak: dict, spec: dict) -> dict:
    case = CASES[name]
    started = time.perf_counter()
    sides = list(SIDES if args.only is None else [args.only])
    notes = []
    if "trl" in sides and not trl_available():
        print("bench: TRL is not installed (pip install --no-deps trl, or the `bench` extra): running the align_runner side only")
        notes.append("TRL is not installed here: align_runner side only, no ratios.")
        sides.remove("trl")
        if not sides:
            raise SystemExit("bench: nothing to run")
    info = machine()
    workdir = Path(spec["workdir"])
    print(f"bench {name}: data: {spec['data']}")
    runs = []
    for r in range(args.repeats):
        for side in sides:
            run_dir = workdir / f"run-{r}-{side}"
            run_dir.mkdir()
            # the overhead replay costs minutes at full size: once, in the last repeat
            run_spec = {**spec, "run_dir": str(run_dir), "measure_overhead": r == args.repeats - 1}
            (run_dir / "spec.json").write_text(json.dumps(run_spec))
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            print(f"bench {name}: repeat {r + 1}/{args.repeats} {side} ...", end=" ", flush=True)
            out = spawn(name, side, run_dir / "spec.json", run_dir / "result.json", workdir / f"run-{r}-{side}.log", args.threads)
            out.update(side=side, repeat=r, loadavg_before=load, per_s=out["units"] / out["seconds"])
            gpu = f", peak GPU memory {out['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in out else ""
            print(f"{out['per_s']:.2f} {case.unit}/s, {out['seconds']:.1f} s, peak RSS {out['peak_rss_mib']:.0f} MiB{gpu}", flush=True)
            runs.append(out)
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)  # a 135M run's saved model: ~0.5 GB
    result = summarise(name, case, spec, info, runs, sides, peak)
    result["notes"] = notes
    result["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["total_seconds"] = time.perf_counter() - started
    return result


def summarise(name: str, case: Case, spec: dict, info: dict, runs: list[dict], sides: list[str], peak: dict) -> dict:
    summary: dict[str, Any] = {}
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        summary[side] = {
            "per_s": statistics.median(r["per_s"] for r in mine),
            "seconds": statistics.median(r["seconds"] for r in mine),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
            # the fastest run: the least disturbed by other jobs on a shared machine
            "best_per_s": max(r["per_s"] for r in mine),
            # fastest / slowest run: above ~1.2 the machine was busy and the medians are noisy
            "spread": max(r["per_s"] for r in mine) / min(r["per_s"] for r in mine),
            "runs": len(mine),
        }
        if all("peak_gpu_mib" in r for r in mine):
            summary[side]["peak_gpu_mib"] = statistics.median(r["peak_gpu_mib"] for r in mine)
    if "align_runner" in summary:
        a = summary["align_runner"]
        mine = [r for r in runs if r["side"] == "align_runner"]
        a["flops"] = statistics.median(r["flops"] for r in mine)
        a["flops_per_s"] = statistics.median(r["flops"] / r["seconds"] for r in mine)
        a["peak_flops"] = peak["peak_flops"]
        a["peak_share"] = a["flops_per_s"] / peak["peak_flops"]
        a["flop_formula"] = mine[0]["flop_formula"]
        a["overhead"] = next((r["overhead"] for r in reversed(mine) if r.get("overhead")), None)
        a["stage_seconds"] = {k: statistics.median(r["stage_seconds"][k] for r in mine) for k in mine[0]["stage_seconds"]}
        if "reference_seconds" in mine[0]:  # dpo: the reference pass, part of the timed seconds
            a["reference_seconds"] = statistics.median(r["reference_seconds"] for r in mine)
    if "trl" in summary and "align_runner" in summary:
        a, t = summary["align_runner"], summary["trl"]
        summary["ratio"] = {
            "per_s": a["per_s"] / t["per_s"],
            "peak_rss_mib": a["peak_rss_mib"] / t["peak_rss_mib"],
            "best_per_s": a["best_per_s"] / t["best_per_s"],
            **({"peak_gpu_mib": a["peak_gpu_mib"] / t["peak_gpu_mib"]} if "peak_gpu_mib" in a and "peak_gpu_mib" in t else {}),
            # each align_runner run over the TRL run just before it (same repeat, similar machine load)
            "pairs": [
                next(r["per_s"] for r in runs if r["side"] == "align_runner" and r["repeat"] == i)
                / next(r["per_s"] for r in runs if r["side"] == "trl" and r["repeat"] == i)
                for i in sorted({r["repeat"] for r in runs})
            ],
        }
    return {
        "case": name,
        "unit": case.unit,
        "quick": spec["quick"],
        "threads": spec["threads"],
        "device": spec["device"],
        "command": "python scripts/bench/run.py " + " ".join(sys.argv[1:]),
        "settings": spec["settings"],
        "align_runner_overrides": spec.get("align_runner_overrides", []),
        "data": spec.get("data"),
        "model": spec["model"],
        "machine": info,
        "matmul_peak": peak,
        "summary": summary,
        "runs": runs,
    }


def write(out: Path, stem: str, res: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(md)
    print()
    print(md)
    print(f"bench: wrote {out / (stem + '.json')} and .md")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        worker_main(*argv[1:5])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", nargs="+", choices=[*CASES, "all"], help="one or more cases, or all of them, in one invocation")
    p.add_argument("--quick", action="store_true", help="a 2-layer Llama and a few rows / steps: a smoke test")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating TRL / align_runner (default 2)")
    p.add_argument("--only", choices=SIDES, help="run one side only")
    p.add_argument("--steps", type=int, default=None, help="grpo: optimizer steps per run (default 6, 2 with --quick)")
    p.add_argument("--rows", type=int, default=None, help="sft / reward / dpo: rows (pairs) of data, a multiple of 8")
    p.add_argument("--overhead-steps", type=int, default=None, help="optimizer steps replayed for the engine overhead")
    p.add_argument("--overhead-repeats", type=int, default=None, help="engine / bare pairs of the overhead replay")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in every worker (default 2)")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="train on the CPU in fp32 (default) or on GPU 0 in bf16 autocast"
    )
    p.add_argument("--model", choices=list(MODELS), default="smollm2-135m", help="the random-init model's layout (default smollm2-135m)")
    p.add_argument("--max-length", type=int, default=None, help="sft / reward / dpo: max_length, and packed rows' length (default 512)")
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="a saved tokenizer's directory instead of the embedded SmolLM2's (e.g. a copy of it)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra align_runner override (e.g. model.compile=true); its side only, repeatable",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"where the results go (default {RESULTS})")
    p.add_argument("--keep", action="store_true", help="keep the temporary model / data / logs directory")
    args = p.parse_args(argv)
    for flag in ("repeats", "steps", "rows", "overhead_steps", "overhead_repeats", "threads", "max_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    # results of another device, model layout or align_runner setting go beside the default's, not over them
    suffix = "-quick" * args.quick + "-cuda" * (args.device == "cuda") + f"-{args.model}" * (args.model != "smollm2-135m")
    suffix += "".join("-" + re.sub(r"[^\w.]+", "_", s) for s in args.set or [])
    started = time.perf_counter()
    results, failed = [], {}
    names = list(CASES) if "all" in args.case else list(dict.fromkeys(args.case))
    workdir = Path(tempfile.mkdtemp(prefix="ar-bench-"))
    try:
        peak, specs = prepare(args, names, workdir)
        for name, spec in specs.items():
            try:
                res = run_case(name, args, peak, spec)
            except RuntimeError as e:  # a failing case must not cost the others' results
                print(f"bench {name}: FAILED: {e}", flush=True)
                failed[name] = str(e).splitlines()[0]
                continue
            write(args.out, name + suffix, res, case_markdown(res))
            results.append(res)
    finally:
        if args.keep:
            print(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(names) > 1 and results:
        suite = {
            "command": "python scripts/bench/run.py " + " ".join(argv),
            "quick": bool(args.quick),
            "threads": args.threads,
            "device": args.device,
            "matmul_peak": peak,
            "machine": results[0]["machine"],
            "cases": suite_rows(results),
            "failed": failed,
            "total_seconds": time.perf_counter() - started,
        }
        write(args.out, "suite" + suffix, suite, suite_markdown(suite))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
