"""TRL's GRPOTrainer on the same tiny model, prompts and settings as `sear.py train`, timed per optimizer step.

This is the TRL half of the side-by-side benchmark in bench/README.md. It needs TRL, which is not a requirement
of sear.py: install it in a separate virtual environment (see bench/README.md) and run, from the repository root,

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 /work/scratch/trl-venv/bin/python bench/trl_grpo.py --out /tmp/bench_trl

What it sets up to match `sear.py train --credit outcome` with its defaults:
  - policy and frozen reference: data/tiny-warmstart in float32 on the CPU, 2 torch threads;
  - prompts: the `train` split of data/prompts.jsonl, loaded and length-checked by sear.py's own functions, in
    the order that sear.py's data shuffle (random.Random(seed)) visits them, so step k gets the same 8 prompts
    in both. They are given as conversations with sear.SYSTEM_PROMPT, so the chat template renders the token
    ids that sear.format_prompt gives (checked at start-up);
  - 8 prompts x 8 completions = 64 completions per step, 160 new tokens at most, temperature 1.0, top_k 0,
    top_p 1.0, beta 0.04 (k3 KL), clip 0.2, lr 5e-4 constant, AdamW without weight decay, gradient-norm clip 1.0;
  - one optimizer step per rollout batch: per_device_train_batch_size 16 x gradient_accumulation_steps 4 = 64
    completions, generated in one `generate` call of 64 rows (generation_batch_size 64, steps_per_generation 4),
    num_iterations 1; loss_type "dapo" (token mean over the whole step, as sear.py's loss);
  - reward: sear.py's keyword judge through sear.split_completion and sear.score_rollouts, the sum of the step
    rewards and the answer reward (what `--credit outcome` normalises); a completion cut at the token limit is
    invalid and earns 0, as in sear.py.

It writes OUT/result.json: the wall time of each optimizer step (TrainerCallback on_step_begin to on_step_end,
which covers generation, reward, reference and policy passes and the optimizer step) and its process CPU time,
the mean and longest completion length of each step, the time in `generate` and in the reward function, the
process's peak resident memory (ru_maxrss, MiB) and the resident memory when training began.
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from rss import peak_rss_mb, rss_now_mb

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for result.json and TRL's output_dir")
    parser.add_argument("--sear-dir", default=str(ROOT),
                        help="folder containing sear.py and data/ (default: this repository)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--micro-batch", type=int, default=16,
                        help="per_device_train_batch_size. Gradient accumulation makes up the rest of "
                             "prompts-per-step x group-size completions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, args.sear_dir)
    import sear
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    import transformers
    import trl
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(Path(args.sear_dir) / "data" / "tiny-warmstart")
    data_file = str(Path(args.sear_dir) / "data" / "prompts.jsonl")

    tokenizer = sear.load_tokenizer(model_dir)
    rows = sear.load_prompts(data_file, split="train")
    rows = sear.check_prompt_lengths(rows, tokenizer, 256, False, data_file)
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)                 # sear.train's first pass over the data
    rows = [rows[i] for i in order]

    def conversation(prompt):
        return [{"role": "system", "content": sear.SYSTEM_PROMPT}, {"role": "user", "content": prompt}]

    for r in rows[:args.steps * args.prompts_per_step]:
        text, prefix = sear.format_prompt(tokenizer, r["prompt"])
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = tokenizer.apply_chat_template(conversation(r["prompt"]), add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        if want != got or prefix:
            raise SystemExit(f"prompt token ids differ from sear.format_prompt's, or the template opens the "
                             f"assistant turn itself (unsupported here), for {r['prompt']!r}")
    dataset = Dataset.from_list([{"prompt": conversation(r["prompt"]), "raw_prompt": r["prompt"],
                                  "label": r["label"]} for r in rows])

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generate_seconds = []
    untimed_generate = model.generate

    def timed_generate(*positional, **keyword):    # TRL's generate calls: the counterpart of sear.py's t_rollout
        t0 = time.perf_counter()
        try:
            return untimed_generate(*positional, **keyword)
        finally:
            generate_seconds.append(time.perf_counter() - t0)

    model.generate = timed_generate
    eos_ids = set(sear.eos_token_ids(model, tokenizer))
    judge = sear.KeywordJudge()
    reward_seconds = []

    def sear_outcome_reward(prompts, completions, completion_ids, raw_prompt, label, **kwargs):
        """Return sum_k r_k + r_A per completion from sear's keyword judge, decoding and segmenting as sear.py does."""
        t0 = time.perf_counter()
        segs = []
        for ids in completion_ids:
            ended = bool(ids) and ids[-1] in eos_ids
            body = ids[:-1] if ended else ids
            text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            seg = sear.split_completion(text, "paragraph", 8)
            if not ended and seg.valid:
                seg = sear.dataclasses.replace(seg, valid=False, problem="truncated at --max-new-tokens")
            segs.append(seg)
        scores = sear.score_rollouts(judge, list(raw_prompt), list(label), segs, "all")
        reward_seconds.append(time.perf_counter() - t0)
        return [sum(s["step_rewards"]) + s["answer_reward"] for s in scores]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.seconds, self.logs, self.rss_at_start = None, [], [], None
            self.cpu_begin, self.cpu_seconds = None, []

        def on_train_begin(self, args_, state, control, **kwargs):
            self.rss_at_start = rss_now_mb()

        def on_step_begin(self, args_, state, control, **kwargs):
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.begin)
            self.cpu_seconds.append(time.process_time() - self.cpu_begin)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs, step=state.global_step))

    n = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=args.steps, seed=args.seed, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=False,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=n // args.micro_batch,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_k=0, top_p=1.0, beta=args.beta, epsilon=0.2, num_iterations=1,
        loss_type="dapo", scale_rewards="group", disable_dropout=True,
    )
    if config.generation_batch_size != n or config.steps_per_generation * args.micro_batch != n:
        raise SystemExit(f"batch sizes do not give one {n}-completion rollout per optimizer step: "
                         f"generation_batch_size {config.generation_batch_size}, "
                         f"steps_per_generation {config.steps_per_generation}")
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=sear_outcome_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()

    result = {
        "tool": "trl", "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "micro_batch": args.micro_batch,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "generation_batch_size": config.generation_batch_size, "steps": args.steps,
        "step_seconds": timer.seconds, "step_cpu_seconds": timer.cpu_seconds,
        "len_mean": [log["completions/mean_length"] for log in timer.logs],
        "len_max": [log["completions/max_length"] for log in timer.logs],
        "reward_seconds": reward_seconds, "generate_seconds": generate_seconds,
        "rss_at_train_begin_mb": timer.rss_at_start, "peak_rss_mb": peak_rss_mb(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}))
    return result


if __name__ == "__main__":
    main()
