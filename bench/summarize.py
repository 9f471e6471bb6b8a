"""Print the side-by-side table of a bench/run.sh results folder as Markdown (standard library only).

    python3 bench/summarize.py RESULTS_DIR [--warmup 2]

Per run: the median over the steps after the first `--warmup` of the step time, the CPU time, the mean
completion length and the step time per thousand completion tokens, plus the peak resident memory and the
resident memory when training began; and the median time in `generate` (sear.py's t_rollout, TRL's calls of
the policy's generate, recorded by bench/trl_grpo.py). sear.py's step time is `t_step` from its metrics.jsonl (rollout + judge +
reference + update); its whole-loop time (from bench/sear_steps.py) is shown beside it, its last step left out
because that one also saves the checkpoint. TRL's step time is on_step_begin to on_step_end. Then per
configuration: the median over every kept step of its runs, and the ratio to TRL, both of the pooled medians
and as the median of the per-round ratios (round r of sear.py against round r of TRL, which run back to back).
"""
import argparse
import json
import statistics
from pathlib import Path

COMPLETIONS_PER_STEP = 64


def load(folder):
    """(config name, round, per-step dict of lists, scalars) of one run folder, or None when it did not finish."""
    round_, _, name = folder.name.partition("-")
    for file in ("bench.json", "result.json"):
        if (folder / file).exists():
            data = json.loads((folder / file).read_text())
            return name, int(round_), data
    return None


def kept(values, warmup, drop_last=False):
    values = values[warmup:]
    return values[:-1] if drop_last else values


def run_row(name, data, warmup):
    is_sear = data["tool"] == "sear"
    step = kept(data["t_step"] if is_sear else data["step_seconds"], warmup)
    lens = kept(data["len_mean"], warmup)
    per_k = [1000 * s / (n * COMPLETIONS_PER_STEP) for s, n in zip(step, lens)]
    row = {
        "step": statistics.median(step), "steps": step,
        "loop": statistics.median(kept(data["step_seconds"], warmup, drop_last=True)) if is_sear else None,
        "cpu": statistics.median(kept(data["step_cpu_seconds"], warmup, drop_last=is_sear)),
        "gen": (statistics.median(kept(data["t_rollout"] if is_sear else data.get("generate_seconds", []), warmup))
                if is_sear or data.get("generate_seconds") else None),
        "len": statistics.mean(lens), "per_k": statistics.median(per_k), "per_k_all": per_k,
        "peak": data["peak_rss_mb"], "rss0": data["rss_at_train_begin_mb"],
    }
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    args = p.parse_args(argv)
    runs = [r for r in (load(f) for f in sorted(Path(args.results).iterdir()) if f.is_dir()) if r]
    rows = {(name, rnd): run_row(name, data, args.warmup) for name, rnd, data in runs}

    print("| run | step s (median) | sear.py loop s | generate s | CPU s | mean completion tokens | s per 1k tokens | "
          "peak RSS MiB | RSS at start MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, rnd), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        loop = f"{r['loop']:.1f}" if r["loop"] is not None else "-"
        gen = f"{r['gen']:.1f}" if r["gen"] is not None else "-"
        print(f"| {rnd}-{name} | {r['step']:.1f} | {loop} | {gen} | {r['cpu']:.1f} | {r['len']:.1f} | {r['per_k']:.2f} | "
              f"{r['peak']:.0f} | {r['rss0']:.0f} |")

    names = sorted({name for name, _ in rows})
    pooled = {}
    for name in names:
        mine = [r for (n, _), r in rows.items() if n == name]
        pooled[name] = {
            "step": statistics.median([s for r in mine for s in r["steps"]]),
            "per_k": statistics.median([s for r in mine for s in r["per_k_all"]]),
            "peak": statistics.median([r["peak"] for r in mine]),
            "len": statistics.mean([r["len"] for r in mine]),
            "runs": len(mine),
        }
    print()
    print("| configuration | runs | median step s | median s per 1k tokens | mean completion tokens | "
          "median peak RSS MiB | step ratio to TRL (pooled) | step ratio to TRL (per round, median) | "
          "peak RSS ratio to TRL |")
    print("|---|---|---|---|---|---|---|---|---|")
    trl = pooled.get("trl")
    for name in names:
        q = pooled[name]
        ratio = per_round = mem = "-"
        if trl and name != "trl":
            ratio = f"{q['step'] / trl['step']:.2f}"
            rounds = [rows[(name, rnd)]["step"] / rows[("trl", rnd)]["step"]
                      for (n, rnd) in rows if n == name and ("trl", rnd) in rows]
            per_round = f"{statistics.median(rounds):.2f}" if rounds else "-"
            mem = f"{q['peak'] / trl['peak']:.2f}"
        print(f"| {name} | {q['runs']} | {q['step']:.1f} | {q['per_k']:.2f} | {q['len']:.1f} | {q['peak']:.0f} | "
              f"{ratio} | {per_round} | {mem} |")


if __name__ == "__main__":
    main()
