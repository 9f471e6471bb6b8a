#!/usr/bin/env bash
# Side-by-side benchmark of sear.py's RL step and TRL's GRPOTrainer. See bench/README.md.
#
#   bench/run.sh RESULTS_DIR
#
# Runs ROUNDS rounds (default 3), each in turn: sear.py --credit outcome, TRL, sear.py --credit process, so that
# a change in the machine's load hits all three alike. Each run writes RESULTS_DIR/<round>-<name>/ (bench.json for
# sear.py, result.json for TRL, and the run's log); RESULTS_DIR/load.txt gets the load average before each run.
# Then bench/summarize.py RESULTS_DIR prints the table and the medians.
#
# Environment: SEAR_PY (sear.py's Python, default /work/venv/bin/python), TRL_PY (a Python with TRL, default
# /work/scratch/trl-venv/bin/python), SEAR_DIR (folder with sear.py and data/, default this repository), STEPS
# (default 12), ROUNDS (default 3), THREADS (default 2).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
results="${1:?usage: bench/run.sh RESULTS_DIR}"
sear_py="${SEAR_PY:-/work/venv/bin/python}"
trl_py="${TRL_PY:-/work/scratch/trl-venv/bin/python}"
sear_dir="${SEAR_DIR:-$(dirname "$here")}"
steps="${STEPS:-12}"
rounds="${ROUNDS:-3}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${THREADS:-2}" SEAR_DIR="$sear_dir" TOKENIZERS_PARALLELISM=false

mkdir -p "$results"
{
    echo "date: $(date -Is)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
    echo "sear.py sha256: $(sha256sum "$sear_dir/sear.py" | cut -d' ' -f1)"
    echo "sear venv: $("$sear_py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
    echo "trl venv: $("$trl_py" -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)')"
    echo "threads: $OMP_NUM_THREADS, steps: $steps, rounds: $rounds"
} > "$results/machine.txt"
cat "$results/machine.txt"

run() {   # run NAME COMMAND...: one timed run into RESULTS_DIR/NAME
    local name="$1"; shift
    mkdir -p "$results/$name"
    echo "$name start $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$results/load.txt"
    "$@" > "$results/$name/log.txt" 2>&1
    echo "$name end   $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$results/load.txt"
}

for r in $(seq 1 "$rounds"); do
    for credit in outcome trl process; do
        if [ "$credit" = trl ]; then
            run "$r-trl" "$trl_py" "$here/trl_grpo.py" --out "$results/$r-trl" --sear-dir "$sear_dir" --steps "$steps" \
                --threads "$OMP_NUM_THREADS"
        else
            run "$r-sear-$credit" "$sear_py" "$here/sear_steps.py" train --steps "$steps" --no-eval \
                --out "$results/$r-sear-$credit" --overwrite --credit "$credit"
        fi
    done
done
python3 "$here/summarize.py" "$results" | tee "$results/summary.md"
