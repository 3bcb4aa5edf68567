"""The PyTorch + transformers side of scripts/gpu/check.sh, on one CUDA GPU.

Usage: python torch_gpu.py {peak|train|decode} [--seq-len 2048] [--batches 16,8,4,2,1] [--batch 32]
Prints one JSON object. `train`: SFT optimizer steps (forward + backward + AdamW) of the
Qwen2.5-0.5B shape with fp32 master weights under bf16 autocast and sdpa attention (the usual
mixed-precision recipe), at the largest batch of --batches that fits. `decode`: HF `generate`,
greedy, bf16 weights. `peak`: the measured bf16 matmul rate that MFU is computed against.
"""
import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
              tie_word_embeddings=True, rope_theta=1000000.0)


def model(dtype):
    cfg = Qwen2Config(**QWEN05)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device="cuda", dtype=dtype)


def timed(fn, reps):
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    s = timed(lambda: a @ b, 10)
    return {"bf16_matmul_tflops": round(2 * 8192 ** 3 / s / 1e12, 1),
            "device": torch.cuda.get_device_name(0)}


def train(seq_len, batches, steps):
    m = model(torch.float32)
    n_params = sum(p.numel() for p in m.parameters())
    # CONTRACTS' MFU count: the weights of the products (every nn.Linear, the tied lm_head once),
    # not the embedding lookup, biases or norms.
    n_matmul = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    for b in batches:
        try:
            ids = torch.randint(0, QWEN05["vocab_size"], (b, seq_len), device="cuda")
            labels = ids.clone()
            labels[:, : seq_len // 4] = -100

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = m(input_ids=ids, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            torch.cuda.reset_peak_memory_stats()
            step()  # warm-up
            s = timed(step, steps)
            return {"batch_size": b, "seq_len": seq_len, "step_seconds_median": s,
                    "tokens_per_s": b * seq_len / s, "num_parameters": n_params,
                    "matmul_parameters": n_matmul,
                    "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
                    "torch": torch.__version__}
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise SystemExit("no batch size fits")


def decode(batch, prompt_len, new_tokens):
    m = model(torch.bfloat16).eval()
    prompt = torch.randint(0, QWEN05["vocab_size"], (batch, prompt_len), device="cuda")
    with torch.no_grad():
        m.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        s = timed(lambda: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False), 3)
    return {"batch_size": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "tokens_per_s": batch * new_tokens / s, "seconds_median": s}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["peak", "train", "decode"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batches", default="16,8,4,2,1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    a = p.parse_args()
    if a.what == "peak":
        out = peak()
    elif a.what == "train":
        out = train(a.seq_len, [int(b) for b in a.batches.split(",")], a.steps)
    else:
        out = decode(a.batch, a.prompt_len, a.new_tokens)
    print(json.dumps(out))
