"""One DPO training step timed in PyTorch + transformers, the counterpart of `ferrotune bench train
--objective dpo`. It is the SFT anchor (../shared/bench/torch_anchor.py) with the loss swapped: the
same model construction, seed, AdamW, autocast and step counting, on the shapes in configs/.

What one timed step does (the sigmoid DPO loss of Rafailov et al. 2023, as TRL computes it):
  policy forward on the 2·P sequences [chosen; rejected] in one batch, log-probs of the completion tokens
  summed per sequence, loss = −log σ(β·((π_c − ref_c) − (π_r − ref_r))) averaged over pairs, backward,
  AdamW step. Reference log-probs are computed once before timing (as TRL's precompute_ref_log_probs);
  `--reference forward` adds a no-grad reference forward to every step instead.

It is not a DPO trainer: the token ids are random, chosen and rejected share a random prompt of T/4 tokens.

Usage: python torch_dpo.py {tiny|qwen05} [threads] [fp32|bf16] [--pairs P] [--seq-len T] [--steps N]
Prints one JSON object on stdout.
"""
import argparse
import copy
import json
import os
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
# The anchor's SFT settings per shape: (sequence length, steps); the first step is warm-up.
ANCHOR = {"tiny": (256, 6), "qwen05": (512, 3)}
# Pairs per step: tiny uses 4 pairs = 8 sequences, the SFT anchor's 8 × 256 tokens per step; qwen05's
# anchor batch is 1, the smallest DPO batch is 1 pair = 2 sequences.
DEFAULT_PAIRS = {"tiny": 4, "qwen05": 1}


def completion_logps(model, input_ids, completion_mask):
    """Summed log-probabilities of the completion tokens of each row ([rows] float32)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    # log p(target) = logit[target] − logsumexp(logits): the same value as log_softmax + gather without
    # materialising a second [rows, T, vocab] tensor (TRL's selective_log_softmax does the same).
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="?", default="tiny", choices=sorted(ANCHOR))
    parser.add_argument("threads", nargs="?", type=int, default=2)
    parser.add_argument("mode", nargs="?", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps + 1 warm-up step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--reference", choices=["precomputed", "forward"], default="precomputed")
    args = parser.parse_args()

    seq_len, steps = ANCHOR[args.which]
    T = args.seq_len or seq_len
    steps = args.steps or steps
    P = args.pairs or DEFAULT_PAIRS[args.which]
    autocast = args.mode == "bf16"  # CPU autocast: bf16 matmuls, fp32 master weights (as the anchor)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config.from_json_file(os.path.join(HERE, "configs", f"{args.which}.json"))
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).float()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    prompt_len = T // 4
    prompt = torch.randint(0, cfg.vocab_size, (P, prompt_len))
    chosen = torch.cat([prompt, torch.randint(0, cfg.vocab_size, (P, T - prompt_len))], dim=1)
    rejected = torch.cat([prompt, torch.randint(0, cfg.vocab_size, (P, T - prompt_len))], dim=1)
    input_ids = torch.cat([chosen, rejected], dim=0)  # [2P, T]: chosen rows first, then rejected
    completion_mask = torch.zeros(2 * P, T)
    completion_mask[:, prompt_len:] = 1.0

    reference = None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if args.reference == "forward":
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        else:  # the policy is the reference before the first update
            ref_logps = completion_logps(model, input_ids, completion_mask)

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if reference is not None:
                with torch.no_grad():
                    ref_logps = completion_logps(reference, input_ids, completion_mask)
            logps = completion_logps(model, input_ids, completion_mask)
        margin = (logps[:P] - ref_logps[:P]) - (logps[P:] - ref_logps[P:])
        loss = -torch.nn.functional.logsigmoid(args.beta * margin).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = sorted(times[1:])
    step = timed[len(timed) // 2]
    tokens = 2 * P * T
    print(json.dumps({
        "which": args.which, "objective": "dpo", "threads": args.threads, "autocast_bf16": autocast,
        "params": n_params, "torch": torch.__version__, "pairs": P, "seq_len": T, "steps": steps,
        "reference": args.reference, "beta": args.beta, "loss_last": round(loss.item(), 6),
        "train_step_s_median": round(step, 4), "train_tokens_per_s": round(tokens / step, 1),
        "train_gflops": round(6 * n_params * tokens / step / 1e9, 1),
    }))


if __name__ == "__main__":
    main()
