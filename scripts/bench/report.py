"""The benchmark's markdown: one page per case and the suite's one table."""

from __future__ import annotations

from common import SIDES, code_label, load_label

# issue 11's goals on this 2-core CPU: align_runner / TRL throughput at least; peak RSS ratio, engine
# overhead at most; SFT's share of the matmul peak at least
GOALS = {"sft": 1.5, "sft_packed": 1.15, "reward": 1.3, "reward_packed": 1.3, "dpo": 1.3, "dpo_packed": 1.3, "grpo": 1.3}
RSS_GOAL, OVERHEAD_GOAL_PCT, SFT_PEAK_SHARE_GOAL = 0.85, 3.0, 0.60
# a side's fastest / slowest run above this: the machine was busy
NOISY = 1.2


def suite_rows(results: list[dict]) -> dict[str, dict]:
    """Per case: unit, the ratios, align_runner's FLOP/s and share of the matmul peak, the overhead."""
    rows = {}
    for res in results:
        s = res["summary"]
        a, ratio = s.get("align_runner", {}), s.get("ratio")
        overhead = a.get("overhead")
        rows[res["case"]] = {
            "unit": res["unit"],
            "align_runner_per_s": a.get("per_s"),
            "trl_per_s": s["trl"]["per_s"] if "trl" in s else None,
            "ratio": ratio["per_s"] if ratio else None,
            "ratio_pairs": ratio["pairs"] if ratio else None,
            "peak_rss_ratio": ratio["peak_rss_mib"] if ratio else None,
            "peak_gpu_ratio": ratio.get("peak_gpu_mib") if ratio else None,
            "flops_per_s": a.get("flops_per_s"),
            "peak_share": a.get("peak_share"),
            "overhead_pct": overhead["median_pct"] if overhead else None,
            # results written before the direct estimate existed have none
            "overhead_direct_pct": overhead.get("direct_pct") if overhead else None,
            "goal_ratio": GOALS.get(res["case"]),
        }
    return rows


def _x(v, fmt="{:.2f}x") -> str:
    return "n/a" if v is None else fmt.format(v)


def suite_markdown(suite: dict) -> str:
    m, peak = suite["machine"], suite["matmul_peak"]
    lines = [
        f"# Benchmark suite{' (quick)' if suite['quick'] else ''}: align_runner vs TRL",
        "",
        f"`{suite['command']}` — {m['date']}, {suite['total_seconds']:.0f} s in all; {suite['threads']} torch "
        f"thread(s); {_peak_label(peak)} (best of sizes {', '.join(peak['per_size_flops'])}).",
        "",
        "| case | unit | align_runner / TRL (median) | per repeat | goal | peak RSS ratio | peak GPU memory ratio | align_runner GFLOP/s | share of matmul peak | engine overhead vs bare loop: median pair, direct |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in suite["cases"].items():
        pairs = ", ".join(f"{x:.2f}x" for x in r["ratio_pairs"]) if r["ratio_pairs"] else "n/a"
        goal = "-" if r["goal_ratio"] is None else f">= {r['goal_ratio']}x"
        lines.append(
            f"| {name} | {r['unit']}/s | {_x(r['ratio'])} | {pairs} | {goal} | {_x(r['peak_rss_ratio'])} | "
            f"{_x(r.get('peak_gpu_ratio'))} | "
            f"{_x(r['flops_per_s'] and r['flops_per_s'] / 1e9, '{:.1f}')} | {_x(r['peak_share'] and 100 * r['peak_share'], '{:.1f}%')} | "
            f"{_x(r['overhead_pct'], '{:+.2f}%')}, {_x(r.get('overhead_direct_pct'), '{:+.2f}%')} |"
        )
    for name, why in suite.get("failed", {}).items():
        lines.append(f"| {name} | FAILED: {why} |" + " |" * 8)
    lines += [
        "",
        f"Goals (issue 11): the ratios above; peak RSS ratio <= {RSS_GOAL}; engine overhead <= {OVERHEAD_GOAL_PCT:.0f}%; "
        f"SFT >= {100 * SFT_PEAK_SHARE_GOAL:.0f}% of the matmul peak. Each case's page (results/<case>.md) has its runs, "
        "settings and what was timed.",
        "",
    ]
    return "\n".join(lines)


def _peak_label(peak: dict) -> str:
    """'fp32 matmul peak 266.0 GFLOP/s on cpu' (results written before the dtype was recorded: fp32, CPU)."""
    return f"{peak.get('dtype', 'float32')} matmul peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s on {peak.get('device', 'cpu')}"


def case_markdown(res: dict) -> str:
    s, u, m = res["summary"], res["unit"], res["machine"]
    sides = [k for k in SIDES if k in s]
    has_ratio = "ratio" in s
    lines = [
        f"# {res['case']}{' (quick)' if res['quick'] else ''}: align_runner vs TRL",
        "",
        f"`{res['command']}` — {m['date']}, {res['total_seconds']:.0f} s in all",
        "",
        "| | " + " | ".join(sides) + (" | align_runner / TRL |" if has_ratio else " |"),
        "|---|" + "---:|" * (len(sides) + has_ratio),
    ]

    def row(label, key, fmt, ratio_key=None):
        cells = [fmt.format(s[k][key]) for k in sides]
        if has_ratio:
            cells.append(f"{s['ratio'][ratio_key]:.2f}x" if ratio_key else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row(f"{u}/s (median)", "per_s", "{:.2f}", "per_s")
    row(f"{u}/s (best run)", "best_per_s", "{:.2f}", "best_per_s")
    row("training seconds (median)", "seconds", "{:.1f}")
    row("peak RSS MiB (median)", "peak_rss_mib", "{:.0f}", "peak_rss_mib")
    if all("peak_gpu_mib" in s[k] for k in sides):
        row("peak GPU memory MiB (median, max_memory_allocated)", "peak_gpu_mib", "{:.0f}", "peak_gpu_mib" if has_ratio else None)
    lines.append("| runs | " + " | ".join(str(s[k]["runs"]) for k in sides) + (" | |" if has_ratio else " |"))
    if has_ratio:
        lines += ["", "align_runner / TRL per repeat: " + ", ".join(f"{x:.2f}x" for x in s["ratio"]["pairs"]) + "."]
    if "align_runner" in s:
        lines += _align_runner_lines(s["align_runner"], res["matmul_peak"])
    codes: dict[str, list[int]] = {}
    for i, r in enumerate(res["runs"]):
        if r["side"] == "align_runner" and r.get("code"):
            codes.setdefault(code_label(r["code"]), []).append(i + 1)
    if len(codes) > 1:
        lines += ["", "**Mixed code**: align_runner's sources changed between its runs ("
                  + "; ".join(f"run(s) {', '.join(map(str, idx))}: {k}" for k, idx in codes.items()) + "): its median mixes versions."]
    for note in res.get("notes", []):
        lines += ["", f"**Note**: {note}"]
    noisy = {k: s[k]["spread"] for k in sides if s[k]["spread"] > NOISY}
    if noisy:
        lines += ["", "**Noisy**: the fastest and slowest runs of a side differ by "
                  + ", ".join(f"{v:.2f}x ({k})" for k, v in noisy.items())
                  + ": other jobs on the CPUs (see the load averages) or runs too short. Prefer the best-run and "
                  "per-repeat ratios, or rerun on an idle machine with more --repeats."]
    lines += _runs_table(res, u)
    lines += _context_lines(res)
    return "\n".join(lines)


def _align_runner_lines(a: dict, peak: dict) -> list[str]:
    lines = [
        "",
        f"align_runner's work: {a['flops'] / 1e12:.3f} TFLOP, {a['flops_per_s'] / 1e9:.2f} GFLOP/s = "
        f"**{100 * a['peak_share']:.1f}%** of this machine's {_peak_label(peak)}. "
        f"FLOPs: {a['flop_formula']}.",
        "",
        "Whole stages (also loading and saving the model): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in a["stage_seconds"].items()) + " (medians)"
        + (f"; the reference pass timed: {a['reference_seconds']:.1f} s." if "reference_seconds" in a else "."),
    ]
    o = a.get("overhead")
    if o:
        lines += [
            "",
            f"Engine overhead: {o['optimizer_steps']} recorded optimizer steps ({o['micro_batches']} micro-batches) replayed "
            "on a fresh copy of the model through `Engine.train_step` and through a bare PyTorch loop (the same step "
            "function, forward + loss, backward, clip, AdamW step, zero_grad), alternating after one unmeasured pass of each:",
            "",
            *overhead_lines(o, OVERHEAD_GOAL_PCT),
        ]
    return lines


def overhead_lines(o: dict, goal_pct: float) -> list[str]:
    """The replay's pairs and its two estimates (``measure.alternate``); shared with ppo.py's page."""
    direct = "direct_pct" in o  # results written before it existed have the pairs only
    rest = (lambda i: f" | {o['engine_rest_s'][i]:.3f} | {o['bare_rest_s'][i]:.3f}") if direct else (lambda i: "")
    lines = [
        "| pair | engine s | bare s | overhead |" + (" engine s outside forward + backward | bare s outside |" if direct else ""),
        "|---:|---:|---:|---:|" + ("---:|---:|" if direct else ""),
        *[f"| {i + 1} | {e:.3f} | {b:.3f} | {p:+.2f}%{rest(i)} |"
          for i, (e, b, p) in enumerate(zip(o["engine_s"], o["bare_s"], o["pairs_pct"]))],
        "",
        f"Median overhead of the pairs **{o['median_pct']:+.2f}%**"
        + (f"; measured directly (the engine's time outside the model's forward and backward minus the bare "
           f"loop's, over the bare loop's time) **{o['direct_pct']:+.2f}%**" if direct else "")
        + f" (goal <= {goal_pct:.0f}%).",
    ]
    return lines


def _runs_table(res: dict, u: str) -> list[str]:
    lines = [
        "",
        "Each run, in the order run:",
        "",
        f"| # | side | {u}/s | seconds | steps | real tokens fed | peak RSS MiB | load avg before | code |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(res["runs"]):
        load = "" if r.get("loadavg_before") is None else f"{r['loadavg_before']:.2f}"
        lines.append(
            f"| {i + 1} | {r['side']} | {r['per_s']:.2f} | {r['seconds']:.1f} | {r['steps']} | {r.get('tokens_trained', '')} | "
            f"{r['peak_rss_mib']:.0f} | {load} | {code_label(r.get('code'))} |"
        )
    timed = {r["side"]: r.get("timed", "") for r in res["runs"]}
    return lines + ["", "Timed: " + "; ".join(f"{k}: {v}" for k, v in timed.items()) + "."]


def _context_lines(res: dict) -> list[str]:
    mo, m = res["model"], res["machine"]
    data = res.get("data")
    return [
        "",
        f"Model: {mo.get('name', 'smollm2-135m')} layout ({mo['arch']}), {mo['num_hidden_layers']} layers, hidden {mo['hidden_size']}, {mo['num_attention_heads']} heads / "
        f"{mo['num_key_value_heads']} KV, intermediate {mo['intermediate_size']}, vocab {mo['vocab_size']}, tied embeddings, "
        f"{mo['parameters'] / 1e6:.1f}M parameters, {mo['dtype']}, {mo['init']}; tokenizer: {mo['tokenizer']}.",
        "",
        *([f"Data: {', '.join(f'{k}={v}' for k, v in data.items())}.", ""] if data else []),
        "Settings (both sides): " + ", ".join(f"{k}={v}" for k, v in res["settings"].items()) + ".",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable, {m['cpu']}), {res['threads']} torch thread(s) per run, "
        + (f"GPU {m['gpu']} (training on it), " if res.get("device") == "cuda" else "")
        + f"torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}, align_runner {m['align_runner']} "
        f"({m['git_sha']}{' + uncommitted changes' if m.get('git_dirty') else ''}), Python {m['python']}; load average "
        f"{load_label(m.get('loadavg_start'))} at start, {load_label(m.get('loadavg_end'))} at end.",
        "",
    ]
