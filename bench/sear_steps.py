"""Run `sear.py train` unchanged and also record each RL step's whole wall and CPU time, for bench/README.md.

sear.py's own per-step figure, `t_step` in OUT/metrics.jsonl, is the sum of its four timed phases (rollout,
judge, reference pass, update). It leaves out the work between them: decoding, segmenting, advantages, micro-batch
packing and the metrics line. This wrapper times the whole loop body too, by stamping each iteration of the
progress bar that `for step in bar` walks in sear.train, so the figure is comparable with TRL's
on_step_begin-to-on_step_end time. The last step's figure also includes the checkpoint save, so drop it.

From the repository root, with sear.py's virtual environment:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 /work/venv/bin/python bench/sear_steps.py train --steps 12 --no-eval \
        --out /tmp/bench_sear --overwrite --credit outcome

Every argument goes to sear.py unchanged. Afterwards OUT/bench.json holds, per step, sear.py's t_step and its
phases, the loop's wall and CPU seconds and the mean and longest completion length, plus the peak resident
memory (ru_maxrss, MiB, the same figure as metrics.jsonl's peak_mem_mb) and the resident memory before the first
step.
"""
import json
import os
import sys
import time
from pathlib import Path

from rss import peak_rss_mb, rss_now_mb

ROOT = Path(__file__).resolve().parent.parent


def main(argv):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, os.environ.get("SEAR_DIR", str(ROOT)))
    import sear
    import torch
    import transformers

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    stamps, cpu, rss_before = [], [], []

    class TimedBar(sear.tqdm):
        """Progress bar of sear.train that stamps the wall clock and the process CPU time at each step boundary."""

        def __iter__(self):
            for item in super().__iter__():
                if not rss_before:
                    rss_before.append(rss_now_mb())
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
                yield item
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    sear.tqdm = TimedBar
    sear.main(argv)

    command, cfg = sear.parse_args(argv)
    out = Path(cfg.out or ROOT / "runs" / "sear")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    walls = [b - a for a, b in zip(stamps, stamps[1:])]
    cpus = [b - a for a, b in zip(cpu, cpu[1:])]
    result = {
        "tool": "sear", "credit": cfg.credit, "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "steps": cfg.steps,
        "t_step": [m["t_step"] for m in metrics],
        **{k: [m[k] for m in metrics] for k in ("t_rollout", "t_judge", "t_ref", "t_update")},
        "step_seconds": walls, "step_cpu_seconds": cpus,
        "len_mean": [m["len_mean"] for m in metrics], "len_max": [m["len_max"] for m in metrics],
        "rss_at_train_begin_mb": rss_before[0] if rss_before else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_mem_mb_metrics": metrics[-1]["peak_mem_mb"],
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main(sys.argv[1:])
