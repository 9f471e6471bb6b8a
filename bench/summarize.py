"""Print the tables of a bench/run.sh results folder as Markdown (standard library only).

    python3 bench/summarize.py RESULTS_DIR [--warmup 2] [--rounds 2,3,4]

Step time: sear.py's `t_step` from metrics.jsonl (rollout + judge + reference + update); TRL's on_step_begin to
on_step_end. "sear.py loop" is the whole body of sear.py's training loop (bench/sear_steps.py), its last step
left out because that one also saves the checkpoint. "generate" is sear.py's t_rollout and, for TRL, the time in
the policy's `generate`; "rest" is step minus generate. "ms per decode step" is generate time over the longest
completion of the step: batched generation runs until its longest row ends, so this is the generation speed with
the luck of the sampled lengths taken out. Every figure is a median over the steps after the first --warmup,
except peak RSS (the process's ru_maxrss) and the mean completion length.

The second table pools each configuration's kept steps over its runs and compares them with TRL twice. The
first ratio divides the pooled medians. The second is the median of the per-round ratios: round r of sear.py
against round r of TRL, which ran back to back under similar load.
"""
import argparse
import json
import re
import statistics
from pathlib import Path

COMPLETIONS_PER_STEP = 64


def load_runs(results):
    """Return {(config, round): data} of the finished runs and {run name: [1-minute load at start, at end]}."""
    runs = {}
    for folder in sorted(Path(results).iterdir()):
        round_, _, name = folder.name.partition("-")
        for file in ("bench.json", "result.json"):
            if folder.is_dir() and round_.isdigit() and (folder / file).exists():
                runs[(name, int(round_))] = json.loads((folder / file).read_text())
    loads = {}
    load_file = Path(results) / "load.txt"
    if load_file.exists():
        for line in load_file.read_text().splitlines():
            m = re.match(r"(\S+) (?:start|end) .* load (\S+)", line)
            if m:
                loads.setdefault(m.group(1), []).append(float(m.group(2)))
    return runs, loads


def per_step(data, warmup):
    """Return the per-step figures of one run after the warm-up, as a dict of equal-length lists."""
    is_sear = data["tool"] == "sear"
    step = data["t_step"] if is_sear else data["step_seconds"]
    gen = data["t_rollout"] if is_sear else data["generate_seconds"]
    out = {
        "step": step, "gen": gen, "rest": [s - g for s, g in zip(step, gen)],
        "ms_decode": [1000 * g / n for g, n in zip(gen, data["len_max"])],
        "per_k": [1000 * s / (n * COMPLETIONS_PER_STEP) for s, n in zip(step, data["len_mean"])],
        "cpu": data["step_cpu_seconds"], "len": data["len_mean"], "len_max": data["len_max"],
    }
    return {k: v[warmup:] for k, v in out.items()}


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--warmup", type=int, default=2, help="number of first steps of each run to leave out")
    parser.add_argument("--rounds", default="", help="comma-separated rounds to keep (default: all)")
    args = parser.parse_args(argv)
    runs, loads = load_runs(args.results)
    if args.rounds:
        keep = {int(r) for r in args.rounds.split(",")}
        runs = {k: v for k, v in runs.items() if k[1] in keep}
    steps = {k: per_step(v, args.warmup) for k, v in runs.items()}
    med = statistics.median

    print("| run | load at start / end | step s | sear.py loop s | generate s | rest s | ms per decode step | CPU s | "
          "mean / longest completion tokens | s per 1k completion tokens | peak RSS MiB | RSS at start MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, rnd), data in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        s = steps[(name, rnd)]
        loop_steps = data["step_seconds"][args.warmup:-1] if data["tool"] == "sear" else []
        loop = med(loop_steps) if loop_steps else None
        load = " / ".join(f"{x:.1f}" for x in loads.get(f"{rnd}-{name}", [])) or "-"
        print(f"| {rnd}-{name} | {load} | {fmt(med(s['step']))} | {fmt(loop)} | "
              f"{fmt(med(s['gen']))} | {fmt(med(s['rest']))} | {fmt(med(s['ms_decode']), 1)} | "
              f"{fmt(med(s['cpu']), 1)} | {statistics.mean(s['len']):.1f} / {statistics.mean(s['len_max']):.0f} | "
              f"{fmt(med(s['per_k']))} | {data['peak_rss_mb']:.0f} | {data['rss_at_train_begin_mb']:.0f} |")

    names = sorted({name for name, _ in runs}, key=lambda n: (n == "trl", n))
    pooled = {}
    for name in names:
        mine = [steps[k] for k in runs if k[0] == name]
        pooled[name] = {key: med([x for s in mine for x in s[key]]) for key in ("step", "gen", "rest", "ms_decode",
                                                                                 "per_k")}
        pooled[name]["len"] = statistics.mean([x for s in mine for x in s["len"]])
        pooled[name]["peak"] = med([runs[k]["peak_rss_mb"] for k in runs if k[0] == name])
        pooled[name]["runs"] = len(mine)
    print()
    print("| configuration | runs | step s | generate s | rest s | ms per decode step | mean completion tokens | "
          "s per 1k completion tokens | peak RSS MiB | step / TRL (pooled) | step / TRL (median of rounds) | "
          "rest / TRL | peak RSS / TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    trl = pooled.get("trl")
    for name in names:
        q = pooled[name]
        ratio = per_round = rest = mem = None
        if trl and name != "trl":
            ratio, rest, mem = q["step"] / trl["step"], q["rest"] / trl["rest"], q["peak"] / trl["peak"]
            rounds = [med(steps[(name, r)]["step"]) / med(steps[("trl", r)]["step"])
                      for (n, r) in runs if n == name and ("trl", r) in runs]
            per_round = med(rounds) if rounds else None
        print(f"| {name} | {q['runs']} | {fmt(q['step'])} | {fmt(q['gen'])} | {fmt(q['rest'])} | "
              f"{fmt(q['ms_decode'], 1)} | {q['len']:.1f} | {fmt(q['per_k'])} | {q['peak']:.0f} | {fmt(ratio)} | "
              f"{fmt(per_round)} | {fmt(rest)} | {fmt(mem)} |")


if __name__ == "__main__":
    main()
