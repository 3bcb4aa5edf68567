"""Greedy batched generation timed in PyTorch + transformers at any batch size, the counterpart of
`ferrotune bench decode`. The generation half of ../shared/bench/torch_anchor.py (same model
construction, sdpa attention, autocast, 32-token random prompt, KV cache, warm-up call), with the batch
size as a parameter and the prefill timed on its own so that decode-only speed can be compared too.

Timings: `generate_seconds` is a `generate` of N new tokens (prefill included: the anchor's
definition, tokens/s = B·N / generate_seconds); `prefill_seconds` is a `generate` of a single token
(the prompt forward plus picking the first token); decode-only tokens/s = B·(N − 1) / (generate − prefill),
the N − 1 cached forward steps. Each is the median of --repeats calls (the anchor times one call; at
the tiny shape one call lasts a fraction of a second and varies by up to 2× from run to run).

Usage: python torch_decode.py {tiny|qwen05} [threads] [fp32|bf16] [--batch B] [--prompt-len P] [--new-tokens N]
       [--repeats R]
Prints one JSON object on stdout.
"""
import argparse
import json
import os
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
NEW_TOKENS = {"tiny": 64, "qwen05": 32}  # the anchor's gen_new per shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="?", default="tiny", choices=sorted(NEW_TOKENS))
    parser.add_argument("threads", nargs="?", type=int, default=2)
    parser.add_argument("mode", nargs="?", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    new_tokens = args.new_tokens or NEW_TOKENS[args.which]
    autocast = args.mode == "bf16"

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config.from_json_file(os.path.join(HERE, "configs", f"{args.which}.json"))
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).float().eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len))

    def generate(n):
        # min_new_tokens forces exactly n tokens whatever the random model predicts (no early EOS)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        elapsed = time.perf_counter() - t0
        assert out.shape == (args.batch, args.prompt_len + n), out.shape
        return elapsed

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        generate(4)  # warm-up, as the anchor
        generate_times = [generate(new_tokens) for _ in range(args.repeats)]
        prefill_times = [generate(1) for _ in range(args.repeats)]
    generate_seconds = sorted(generate_times)[len(generate_times) // 2]
    prefill_seconds = sorted(prefill_times)[len(prefill_times) // 2]
    B, N = args.batch, new_tokens
    print(json.dumps({
        "which": args.which, "threads": args.threads, "autocast_bf16": autocast, "params": n_params,
        "torch": torch.__version__, "batch_size": B, "prompt_len": args.prompt_len, "new_tokens": N,
        "repeats": args.repeats, "generate_seconds_all": [round(x, 4) for x in generate_times],
        "generate_seconds": round(generate_seconds, 4), "prefill_seconds": round(prefill_seconds, 4),
        "generate_tokens_per_s": round(B * N / generate_seconds, 1),
        "decode_tokens_per_s": round(B * (N - 1) / max(generate_seconds - prefill_seconds, 1e-9), 1),
    }))


if __name__ == "__main__":
    main()
