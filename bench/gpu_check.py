"""GPU check: one RL step of sear.py on a randomly initialised model of Qwen2.5-1.5B's shape.

Nothing is downloaded. The model is built from a config with Qwen2.5-1.5B's sizes (1.5B parameters, 151936-token
vocabulary), so its completions are random tokens that never reach an end-of-sequence token: every row runs the
full --new-tokens, the worst case for memory and time. The step uses sear.py's own pieces in the order `train`
runs them: `decode` (rollout), `score_micro_batches` (reference), `backward_micro_batches` and AdamW (update).
Advantages are random, since the judge is not what is measured (the keyword judge costs about 0.01 s a step).

    python bench/gpu_check.py                     # on CUDA: bf16, 4 prompts x 8 samples x 512 new tokens
    python bench/gpu_check.py --shape tiny --device cpu --new-tokens 16     # a smoke test of the script itself
    python bench/gpu_check.py --device cpu --layers 1 --prompts 1 --samples 4 --new-tokens 8   # full vocabulary

For each setting (without, then with gradient checkpointing) it runs --steps steps and prints one JSON line per
step: seconds per phase, rollout tokens per second and peak memory (CUDA max allocated, else max resident set).
The first step includes CUDA warm-up, so read the later ones.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from rss import peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sear  # noqa: E402

SHAPES = {
    # the sizes published in Qwen/Qwen2.5-1.5B-Instruct's config.json
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=2050, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
}
EOS_ID, PAD_ID = 2, 0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def random_prompts(n_prompts, samples, length, device, generator):
    """Make left-padded random prompts, each repeated `samples` times, of length/2 to `length` tokens."""
    lengths = torch.randint(length // 2, length + 1, (n_prompts,), generator=generator).repeat_interleave(samples)
    ids = torch.randint(3, 1000, (len(lengths), length), generator=generator)
    mask = (torch.arange(length)[None, :] >= (length - lengths)[:, None]).long()
    return (ids * mask + PAD_ID * (1 - mask)).to(device), mask.to(device)


def one_step(model, reference, optimizer, cfg, prompt_ids, prompt_mask, args, device, autocast, generator):
    record = {}
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast:
        model.eval()
        completion_ids = sear.decode(model, prompt_ids, prompt_mask, args.new_tokens, 1.0, [EOS_ID], PAD_ID)
    mask = sear.completion_mask(completion_ids, [EOS_ID])
    sync(device)
    record["t_rollout"] = time.perf_counter() - t0
    record["rollout_tokens_per_s"] = int(mask.sum()) / record["t_rollout"]

    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, mask=mask)
    lengths = (prompt_mask.sum(1) + mask.sum(1)).tolist()
    micro = sear.pack_micro_batches(lengths, cfg.micro_batch, cfg.micro_batch_tokens)
    advantages = torch.randn(mask.shape, generator=generator) * mask.cpu()
    n_tokens = int(mask.sum())

    t0 = time.perf_counter()
    ref_logps = sear.score_micro_batches(reference, batch, micro, autocast)
    sync(device)
    record["t_ref"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    sums = sear.backward_micro_batches(model, batch, advantages.to(device), micro, n_tokens, cfg, autocast, None,
                                       ref_logps)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    sync(device)
    record["t_update"] = time.perf_counter() - t0
    record["t_step"] = record["t_rollout"] + record["t_ref"] + record["t_update"]
    record["trained_tokens_per_s"] = n_tokens / (record["t_ref"] + record["t_update"])
    record["micro_batches"] = len(micro)
    record["completion_tokens"] = n_tokens
    record["loss"] = sums["loss"]
    record["peak_mem_mib"] = peak_mib(device)
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="", help="autocast dtype: bf16 (the CUDA default), fp16 or fp32")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=0, help="override the layer count (0: the shape's own)")
    parser.add_argument("--checkpointing", choices=["both", "off", "on"], default="both")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = sear.Config(micro_batch=args.micro_batch, micro_batch_tokens=args.micro_batch_tokens, beta=0.04,
                      clip_eps=0.2)
    autocast = sear.autocast_for(device, args.dtype)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": args.shape, "autocast": str(autocast.fast_dtype) if autocast._enabled else "off (float32)",
            "rows": args.prompts * args.samples, "new_tokens": args.new_tokens}
    print(json.dumps(info), flush=True)

    settings = {"both": [False, True], "off": [False], "on": [True]}[args.checkpointing]
    for checkpointing in settings:
        shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
        config = Qwen2Config(**shape, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        params = sum(p.numel() for p in model.parameters())
        for step in range(1, args.steps + 1):
            prompt_ids, prompt_mask = random_prompts(args.prompts, args.samples, args.prompt_tokens, device,
                                                     generator)
            record = one_step(model, reference, optimizer, cfg, prompt_ids, prompt_mask, args, device, autocast,
                              generator)
            record = {"gradient_checkpointing": checkpointing, "step": step, "params": params,
                      **{k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}}
            print(json.dumps(record), flush=True)
        del model, reference, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
