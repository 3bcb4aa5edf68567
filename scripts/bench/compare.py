"""ferrotune against PyTorch + transformers on this machine, in one run: training steps (SFT, DPO) and
batched greedy decoding, on ../shared/bench/torch_anchor.py's shapes, with peak memory, MFU and the
memory-bandwidth bound of batch-1 decoding. Writes every raw measurement to a JSON file and prints a
markdown table per shape.

It is a driver, not a benchmark of its own: the timed work is in `ferrotune bench train|decode` and in
torch_anchor.py, torch_dpo.py and torch_decode.py (one child process each, so that each has its own peak
RSS, read from the kernel with wait4 when it exits).

Usage (from the repository root, with the venv that has torch and transformers):
  /work/venv/bin/python scripts/bench/compare.py all                     # tiny shape, a few minutes
  /work/venv/bin/python scripts/bench/compare.py train --shape qwen05    # slow: minutes per PyTorch run
  /work/venv/bin/python scripts/bench/compare.py all --out docs/bench-results/2025-01-01.json
  /work/venv/bin/python scripts/bench/compare.py --from-json FILE        # re-print the tables of a past run
See scripts/bench/README.md for what each number means.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_ANCHOR = os.path.join(os.path.dirname(REPO), "shared", "bench", "torch_anchor.py")
TOKENIZER = os.path.join(REPO, "tests", "fixtures", "tokenizer")

# torch_anchor.py's settings per shape (it hard-codes them; compare.py checks its output against them):
# SFT batch × sequence length and steps (the first is warm-up, the median of the rest is reported),
# generation batch and new tokens after a 32-token prompt. DPO pairs are this script's choice: tiny uses
# 4 pairs = 8 sequences (the SFT step's token count), qwen05 the smallest batch, 1 pair.
SHAPES = {
    "tiny": dict(batch=8, seq_len=256, steps=6, gen_batch=8, prompt_len=32, new_tokens=64,
                 dpo_pairs=4, decode_batches=[1, 8, 32]),
    "qwen05": dict(batch=1, seq_len=512, steps=3, gen_batch=8, prompt_len=32, new_tokens=32,
                   dpo_pairs=1, decode_batches=[1, 8]),
}
MODES = ("fp32", "bf16")
DTYPE_BYTES = {"fp32": 4, "f32": 4, "bf16": 2, "f16": 2}


def log(msg):
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Child processes


def cpu_busy_seconds():
    """CPU seconds spent by the whole machine so far (all CPUs, not idle or iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(max_wait):
    """Wait (at most max_wait seconds) until other processes use under 10 % of the CPUs over one second."""
    deadline, announced = time.time() + max_wait, False
    while True:
        before = cpu_busy_seconds()
        time.sleep(1.0)
        busy = (cpu_busy_seconds() - before) / os.cpu_count()
        if busy < 0.1 or time.time() >= deadline:
            return round(busy, 2)
        if not announced:
            log(f"machine busy ({busy:.0%} CPU used by others), waiting up to {max_wait:.0f} s")
            announced = True


def run_child(cmd, env_extra, timeout, expect_json=True, idle_wait=0):
    """Run one benchmark process; its peak RSS comes from wait4's rusage (that process alone). Also
    records how much CPU other processes used meanwhile: on 2 cores any is enough to spoil a timing."""
    env = dict(os.environ)
    env.update(env_extra)
    busy_before_start = wait_until_idle(idle_wait) if idle_wait > 0 else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        load_before = os.getloadavg()[0]
        busy0 = cpu_busy_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
        wall = time.perf_counter() - t0
        others = cpu_busy_seconds() - busy0 - usage.ru_utime - usage.ru_stime
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    parsed = None
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    result = {
        "cmd": cmd, "env": env_extra, "returncode": proc.returncode, "wall_seconds": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        # CPU used by everything else during the run, as a fraction of all CPUs × wall time
        "other_cpu_fraction": round(max(others, 0.0) / (wall * os.cpu_count()), 3),
        "other_cpu_fraction_before_start": busy_before_start,
        "json": parsed,
    }
    if proc.returncode != 0 or (expect_json and parsed is None):
        result["stderr_tail"] = stderr[-2000:]
        log(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    return result


CLEAN = 0.05  # a run during which other processes took more than this share of the CPUs is retried


def run_clean(cmd, env_extra, args):
    """run_child, repeated (at most --retries more times) while other processes disturbed it; keeps the
    least disturbed attempt."""
    best = None
    for attempt in range(1, args.retries + 2):
        result = run_child(cmd, env_extra, args.timeout, idle_wait=args.wait_idle)
        result["attempt"] = attempt
        if result["returncode"] != 0 or result["json"] is None:
            return result
        if best is None or result["other_cpu_fraction"] < best["other_cpu_fraction"]:
            best = result
        if result["other_cpu_fraction"] <= CLEAN:
            break
        log(f"other processes took {result['other_cpu_fraction']:.0%} of the CPUs meanwhile; "
            + ("running it again" if attempt <= args.retries else "keeping the least disturbed attempt"))
    return best


class Runner:
    def __init__(self, args):
        self.args = args
        self.torch_env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.rust_env = {"RAYON_NUM_THREADS": str(args.threads)}

    def torch(self, script, *argv):
        cmd = [sys.executable, script, *map(str, argv)]
        log(" ".join(cmd[1:]))
        return run_clean(cmd, self.torch_env, self.args)

    def ferrotune(self, *argv):
        cmd = [self.args.bin, *map(str, argv)]
        log(" ".join(cmd))
        return run_clean(cmd, self.rust_env, self.args)


def ferrotune_status(binary):
    """None when `ferrotune bench` is usable, else why not."""
    if not os.path.exists(binary):
        return f"{binary} not found (cargo build --release -p ferrotune-cli)"
    for sub in ("train", "decode"):
        probe = subprocess.run([binary, "bench", sub, "--help"], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"`{binary} bench {sub}` is not available: {probe.stderr.strip()[:200]}"
    return None


def ensure_model(runner, shape):
    """A random model directory per shape under --models-dir, made once by `ferrotune init-model`
    (f32 weights, seed 0) and remade only when the config or tokenizer changes: it is a plain HF
    directory, so a rebuilt binary reads it as well."""
    config = os.path.join(HERE, "configs", f"{shape}.json")
    digest = hashlib.sha256()
    for path in (config, os.path.join(TOKENIZER, "tokenizer.json")):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest = digest.hexdigest()
    out = os.path.join(runner.args.models_dir, shape)
    stamp = out + ".sha256"
    if os.path.exists(os.path.join(out, "config.json")) and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == digest:
                return out, None
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(runner.args.models_dir, exist_ok=True)
    cmd = [runner.args.bin, "init-model", "--config", config, "--tokenizer", TOKENIZER, "--out", out,
           "--seed", "0", "--dtype", "f32"]
    log(" ".join(cmd))
    result = run_child(cmd, runner.rust_env, runner.args.timeout, expect_json=False)
    if result["returncode"] != 0:
        return None, result
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    return out, result


# ---------------------------------------------------------------------------------------------------
# Machine measurements


def measure_bandwidth(threads, gib=1, repeats=5):
    """Read bandwidth: the best of a few numpy sums over a 1 GiB float64 array, on one thread and split
    over `threads` threads (numpy releases the GIL in reductions)."""
    import numpy as np

    a = np.ones((gib << 30) // 8)  # written once by the fill, so every page is resident
    a.sum()

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    one = best(a.sum)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        many = best(lambda: list(pool.map(np.sum, parts)))
    gb = a.nbytes / 1e9
    del a, parts
    return {"array_bytes": gib << 30, "one_thread_gb_s": round(gb / one, 2),
            f"{threads}_threads_gb_s": round(gb / many, 2), "gb_s": round(gb / min(one, many), 2),
            "numpy": np.__version__}


def measure_matmul_peak(threads, n=2048, windows=5, seconds=0.5):
    """GFLOP/s of an n×n×n matmul loop (2n³ flops each) in torch, bf16 and fp32, on `threads` threads:
    the best of a few short windows, so that a burst of other work lowers one window, not the peak."""
    import torch

    torch.set_num_threads(threads)
    result = {"n": n, "threads": threads, "torch": torch.__version__}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        for _ in range(2):
            torch.matmul(a, b, out=c)
        rates = []
        for _ in range(windows):
            iters, t0 = 0, time.perf_counter()
            while iters < 2 or time.perf_counter() - t0 < seconds:
                torch.matmul(a, b, out=c)
                iters += 1
            rates.append(2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e9)
        result[f"{name}_gflops"] = round(max(rates), 1)
        result[f"{name}_gflops_windows"] = [round(x, 1) for x in rates]
    return result


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU family", "Model", "L2 cache", "L3 cache"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
        info["avx512_bf16"] = "avx512_bf16" in lscpu
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.strip()
    info["git_commit"] = git("rev-parse", "--short", "HEAD")
    info["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    return info


def parameter_counts(shape):
    """(all parameters, tied embedding once; parameters in matmuls: every projection and lm_head,
    not the embedding lookup, biases or norms) from the config, as CONTRACTS' MFU defines."""
    with open(os.path.join(HERE, "configs", f"{shape}.json")) as f:
        c = json.load(f)
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    per_layer_matmul = h * q + 2 * h * kv + q * h + 3 * h * i
    matmul = L * per_layer_matmul + V * h  # lm_head (the tied embedding matrix used as output layer)
    per_layer = per_layer_matmul + (q + 2 * kv) + 2 * h  # q/k/v biases (Qwen2), two RMSNorms
    total = V * h * (1 if c.get("tie_word_embeddings") else 2) + L * per_layer + h
    return total, matmul


# ---------------------------------------------------------------------------------------------------
# The runs


def run_shape(runner, shape, what, status):
    s = SHAPES[shape]
    args = runner.args
    total, matmul = parameter_counts(shape)
    out = {"settings": s, "num_parameters": total, "matmul_parameters": matmul,
           "torch": {}, "ferrotune": {}}
    train, decode = what in ("train", "all"), what in ("decode", "all")

    if not args.skip_torch:
        t = out["torch"]
        if train:
            t["anchor"] = {m: runner.torch(args.anchor, shape, args.threads, m) for m in args.modes}
            if not args.no_dpo:
                t["dpo"] = {m: runner.torch(os.path.join(HERE, "torch_dpo.py"), shape, args.threads, m,
                                            "--pairs", s["dpo_pairs"]) for m in args.modes}
        if decode:
            t["decode"] = {
                str(b): {m: runner.torch(os.path.join(HERE, "torch_decode.py"), shape, args.threads, m,
                                         "--batch", b, "--prompt-len", s["prompt_len"],
                                         "--new-tokens", s["new_tokens"]) for m in args.modes}
                for b in s["decode_batches"]}

    if args.skip_ferrotune:
        out["ferrotune"]["skipped"] = "--skip-ferrotune"
    elif status is not None:
        out["ferrotune"]["skipped"] = status
    else:
        model, init = ensure_model(runner, shape)
        if init is not None:
            out["ferrotune"]["init_model"] = init
        if model is None:
            out["ferrotune"]["skipped"] = "init-model failed"
            return out
        f = out["ferrotune"]
        common = ["--model", model, "--seq-len", s["seq_len"], "--steps", s["steps"] - 1, "--warmup", 1,
                  "--precision", args.ferrotune_precision]
        if train and args.ferrotune_cpu_parts != 1:
            common += ["--cpu-parts", args.ferrotune_cpu_parts]
        if train:
            f["sft"] = runner.ferrotune("bench", "train", *common, "--batch-size", s["batch"],
                                        "--objective", "sft")
            if not args.no_dpo:
                f["dpo"] = runner.ferrotune("bench", "train", *common, "--batch-size", s["dpo_pairs"],
                                            "--objective", "dpo")
        if decode:
            f["decode"] = {
                str(b): runner.ferrotune("bench", "decode", "--model", model, "--batch-size", b,
                                         "--prompt-len", s["prompt_len"], "--new-tokens", s["new_tokens"],
                                         "--precision", args.ferrotune_precision)
                for b in s["decode_batches"]}
    return out


# ---------------------------------------------------------------------------------------------------
# Tables


def value(child, key):
    if not child or child.get("returncode") != 0 or not child.get("json"):
        return None
    return child["json"].get(key)


def fmt(x, digits=1):
    if x is None:
        return "—"
    if isinstance(x, float) and abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}" if isinstance(x, float) else str(x)


def best_mode(per_mode, key):
    """(mode, value) of the faster PyTorch mode, or (None, None)."""
    scored = [(value(c, key), m) for m, c in (per_mode or {}).items() if value(c, key) is not None]
    if not scored:
        return None, None
    v, m = max(scored)
    return m, v


def render_shape(shape, r, machine):
    s, t, f = r["settings"], r["torch"], r["ferrotune"]
    lines, notes, rows = [], [], []
    header = ("| benchmark | PyTorch fp32 tok/s | PyTorch bf16 tok/s | ferrotune tok/s | ferrotune ÷ best "
              "PyTorch | peak RSS PyTorch fp32 / bf16 (MB) | peak RSS ferrotune (MB) |")

    def row(label, per_mode, torch_key, ferro_child, ferro_value):
        fp, bf = (per_mode or {}).get("fp32"), (per_mode or {}).get("bf16")
        _, best = best_mode(per_mode, torch_key)
        ratio = f"{ferro_value / best:.2f}×" if ferro_value and best else "—"
        dtype = value(ferro_child, "dtype")
        ferro = fmt(ferro_value) + (f" ({dtype})" if dtype and ferro_value else "")
        rss_t = " / ".join(fmt(c["peak_rss_mb"], 0) if c and c.get("returncode") == 0 else "—"
                           for c in (fp, bf))
        rss_f = fmt(ferro_child["peak_rss_mb"], 0) if ferro_child and ferro_child.get("returncode") == 0 else "—"
        rows.append(f"| {label} | {fmt(value(fp, torch_key))} | {fmt(value(bf, torch_key))} | {ferro} | "
                    f"{ratio} | {rss_t} | {rss_f} |")

    def check_rate(name, child, tokens, seconds_key):
        rate, seconds = value(child, "tokens_per_s"), value(child, seconds_key)
        if rate and seconds and abs(rate * seconds / tokens - 1) > 0.02:
            notes.append(f"ferrotune {name}: tokens_per_s {rate} ≠ {tokens} tokens / {seconds_key} {seconds}")

    sft_tokens = s["batch"] * s["seq_len"]
    dpo_tokens = 2 * s["dpo_pairs"] * s["seq_len"]
    if "anchor" in t or "sft" in f:
        row(f"train SFT {s['batch']}×{s['seq_len']}", t.get("anchor"), "train_tokens_per_s", f.get("sft"),
            value(f.get("sft"), "tokens_per_s"))
        check_rate("sft", f.get("sft"), sft_tokens, "step_seconds_median")
    if "dpo" in t or "dpo" in f:
        row(f"train DPO {s['dpo_pairs']} pairs×{s['seq_len']}", t.get("dpo"), "train_tokens_per_s",
            f.get("dpo"), value(f.get("dpo"), "tokens_per_s"))
        check_rate("dpo", f.get("dpo"), dpo_tokens, "step_seconds_median")
    N = s["new_tokens"]
    for b in s["decode_batches"]:
        tb, fb = t.get("decode", {}).get(str(b)), f.get("decode", {}).get(str(b))
        if tb is None and fb is None:
            continue
        pre, dec = value(fb, "prefill_seconds"), value(fb, "decode_seconds")
        generate = b * N / (pre + dec) if pre is not None and dec else None
        row(f"generate b={b} (prefill incl.)", tb, "generate_tokens_per_s", fb, generate)
        row(f"decode only b={b}", tb, "decode_tokens_per_s", fb, value(fb, "tokens_per_s"))
        check_rate(f"decode b={b}", fb, b * N, "decode_seconds")
    if not rows:
        return ""

    lines.append(f"### {shape}: {r['num_parameters']:,} parameters ({r['matmul_parameters']:,} in matmuls)")
    lines.append("")
    lines += [header, "|" + " --- |" * 7, *rows, ""]
    if "skipped" in f:
        lines.append(f"ferrotune: not measured ({f['skipped']}).")
    anchor = t.get("anchor") or {}
    if any(value(c, "gen_tokens_per_s") for c in anchor.values()):
        gen = ", ".join(f"{m} {fmt(value(c, 'gen_tokens_per_s'))}" for m, c in anchor.items())
        lines.append(f"- torch_anchor.py's own generate figure (batch {s['gen_batch']}, {N} new tokens, "
                     f"prefill incl.): {gen} tok/s.")

    peak = machine.get("matmul_peak", {}).get("bf16_gflops")
    if peak:
        mfu = []
        for name, tkey, fkey in (("SFT", "anchor", "sft"), ("DPO", "dpo", "dpo")):
            rates = [(f"PyTorch {m}", value(c, "train_tokens_per_s")) for m, c in (t.get(tkey) or {}).items()]
            rates.append(("ferrotune", value(f.get(fkey), "tokens_per_s")))
            parts = [f"{who} {6 * r['matmul_parameters'] * v / (peak * 1e9):.1%}" for who, v in rates if v]
            if parts:
                mfu.append(f"{name}: " + ", ".join(parts))
        if mfu:
            lines.append(f"- MFU (6 · {r['matmul_parameters']:,} · tok/s ÷ bf16 matmul peak {fmt(peak)} "
                         f"GFLOP/s): " + "; ".join(mfu) + ".")

    bw = machine.get("bandwidth", {}).get("gb_s")
    mode, _ = best_mode(t.get("decode", {}).get("1"), "decode_tokens_per_s")
    if mode is None:
        mode, _ = best_mode(anchor, "gen_tokens_per_s")
    if bw and mode:
        weight_bytes = r["num_parameters"] * DTYPE_BYTES[mode]
        bound = bw * 1e9 / weight_bytes
        reached = []
        _, torch_b1 = best_mode(t.get("decode", {}).get("1"), "decode_tokens_per_s")
        if torch_b1:
            reached.append(f"PyTorch reaches {torch_b1 / bound:.0%}")
        ferro_b1 = value(f.get("decode", {}).get("1"), "tokens_per_s")
        if ferro_b1:
            reached.append(f"ferrotune {ferro_b1 / bound:.0%}")
        own = value(f.get("decode", {}).get("1"), "bandwidth_bound_tokens_per_s")
        if own:
            reached.append(f"ferrotune's own bound estimate {fmt(float(own))} tok/s")
        lines.append(f"- Batch-1 decode bandwidth bound: {weight_bytes / 1e6:,.0f} MB of weights in {mode} "
                     f"(PyTorch's better mode) ÷ {bw} GB/s = {fmt(bound)} tok/s"
                     + (" (" + "; ".join(reached) + ")" if reached else "") + ".")
        l3 = _mib(machine.get("l3_cache"))
        if l3 and weight_bytes < l3 * 2 ** 20:
            lines.append(f"  The weights fit in the {l3:g} MiB L3 cache, so memory bandwidth is not what limits "
                         f"this shape's decoding; the bound is only a scale.")

    busy = []
    for side, per in (("PyTorch", t), ("ferrotune", f)):
        for name, child in _children(per):
            if child.get("returncode") not in (0, None):
                notes.append(f"{side} {name} failed (exit {child['returncode']}), see the JSON's stderr_tail")
            other = child.get("other_cpu_fraction")
            if other is not None and other > CLEAN and name != "init_model":
                busy.append(f"{side} {name} ({other:.0%})")
    if busy:
        notes.append("other processes used more than 5 % of the CPUs during "
                     + ", ".join(busy) + ": those timings are not trustworthy")
    for m, c in anchor.items():  # SHAPES repeats the anchor's hard-coded settings: check they still agree
        j = (c or {}).get("json") or {}
        if j and (j.get("gen_batch"), j.get("gen_new_tokens")) != (s["gen_batch"], N):
            notes.append(f"torch_anchor.py ({m}) generated batch {j.get('gen_batch')} × {j.get('gen_new_tokens')} "
                         f"tokens, compare.py assumes {s['gen_batch']} × {N}: update SHAPES")
        if j and abs(j["train_tokens_per_s"] * j["train_step_s_median"] / sft_tokens - 1) > 0.01:
            notes.append(f"torch_anchor.py ({m}) trained on about "
                         f"{j['train_tokens_per_s'] * j['train_step_s_median']:.0f} tokens per step, compare.py "
                         f"assumes {sft_tokens}: update SHAPES")
    params = {value(c, "params") or value(c, "num_parameters") for _, c in _children(t) + _children(f)} - {None}
    if len(params) > 1:
        notes.append(f"parameter counts differ between runs: {sorted(params)}")
    lines += [f"- Note: {n}." for n in notes]
    return "\n".join(lines) + "\n"


def _mib(text):
    """'32 MiB (1 instance)' → 32.0 (lscpu's cache sizes); None when unreadable."""
    try:
        number, unit = (text or "").split()[:2]
        return float(number) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]
    except (ValueError, KeyError):
        return None


def _children(tree, prefix=""):
    """(name, child result) pairs in a nested dict of run_child results."""
    found = []
    for key, v in (tree or {}).items():
        if isinstance(v, dict) and "returncode" in v:
            found.append((prefix + key, v))
        elif isinstance(v, dict):
            found += _children(v, prefix + key + " ")
    return found


def render(results):
    m = results["machine"]
    torch_version = m.get("matmul_peak", {}).get("torch") or next(
        (c["json"]["torch"] for r in results["shapes"].values() for _, c in _children(r["torch"])
         if c.get("json") and "torch" in c["json"]), "?")
    out = [f"## ferrotune vs PyTorch, {results['date']}", ""]
    bw, mm = m.get("bandwidth", {}), m.get("matmul_peak", {})
    out.append(f"Machine: {m.get('model_name', '?')}, {m.get('cpus')} CPUs, {m.get('mem_total_gib')} GiB; "
               f"{m['threads']} threads for both sides; torch {torch_version}; repository at "
               f"{m.get('git_commit', '?')}{' (dirty)' if m.get('git_dirty') else ''}"
               + (f", ferrotune binary {m['ferrotune_bin']['path']} built {m['ferrotune_bin']['modified']}"
                  if m.get("ferrotune_bin") else "") + ".")
    if bw:
        out.append(f"Read bandwidth (numpy sum of 1 GiB): {bw.get('one_thread_gb_s')} GB/s on one thread, "
                   f"{bw.get(str(m['threads']) + '_threads_gb_s')} GB/s on {m['threads']}.")
    if mm:
        spread = lambda k: (f" (windows {min(mm[k])}–{max(mm[k])})" if mm.get(k) else "")
        out.append(f"Matmul peak ({mm['n']}³, torch, {mm['threads']} threads, best 0.5 s window): bf16 "
                   f"{mm.get('bf16_gflops')} GFLOP/s{spread('bf16_gflops_windows')}, fp32 {mm.get('fp32_gflops')} "
                   f"GFLOP/s{spread('fp32_gflops_windows')}.")
    if m.get("torch_import_rss_mb"):
        out.append(f"PyTorch's peak RSS includes about {m['torch_import_rss_mb']:.0f} MB for python + torch + "
                   f"transformers before any model exists.")
    out.append("")
    for shape, r in results["shapes"].items():
        out.append(render_shape(shape, r, m))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("what", nargs="?", choices=["train", "decode", "all"], default="all")
    parser.add_argument("--shape", choices=["tiny", "qwen05", "both"], default="tiny")
    parser.add_argument("--out", help="raw JSON (default target/bench-results/DATE-TIME.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bin", default=os.path.join(REPO, "target", "release", "ferrotune"))
    parser.add_argument("--anchor", default=DEFAULT_ANCHOR)
    parser.add_argument("--models-dir", default=os.path.join(REPO, "target", "bench-models"))
    parser.add_argument("--modes", default="fp32,bf16", help="PyTorch modes, comma-separated")
    parser.add_argument("--ferrotune-precision", default="f32", help="f32, bf16 or f16 (`bench --precision`)")
    parser.add_argument("--ferrotune-cpu-parts", type=int, default=1,
                        help="micro-batch parts side by side on the CPU (`bench train --cpu-parts`)")
    parser.add_argument("--no-dpo", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-ferrotune", action="store_true")
    parser.add_argument("--skip-machine", action="store_true", help="no bandwidth / matmul peak measurement")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--retries", type=int, default=2,
                        help="runs again (at most this many times) a process that other work disturbed")
    parser.add_argument("--wait-idle", type=float, default=120,
                        help="before each process, wait up to this many seconds for other work to stop (0: no)")
    parser.add_argument("--from-json", help="print the tables of an earlier run's JSON and exit")
    parser.add_argument("--measure-machine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure_machine:
        print(json.dumps({"bandwidth": measure_bandwidth(args.threads),
                          "matmul_peak": measure_matmul_peak(args.threads)}))
        return
    if args.from_json:
        with open(args.from_json) as f:
            print(render(json.load(f)))
        return
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in args.modes):
        parser.error(f"--modes takes {MODES}")
    args.bin = os.path.abspath(args.bin)
    if not os.path.exists(args.anchor):
        parser.error(f"{args.anchor} not found (--anchor)")

    now = datetime.datetime.now()
    out_path = args.out or os.path.join(REPO, "target", "bench-results", now.strftime("%Y-%m-%dT%H%M.json"))
    shapes = ["tiny", "qwen05"] if args.shape == "both" else [args.shape]
    runner = Runner(args)
    machine = machine_info()
    machine["threads"] = args.threads
    results = {"date": now.isoformat(timespec="seconds"), "command": sys.argv, "what": args.what,
               "machine": machine, "shapes": {}}

    if os.path.exists(args.bin):  # the repository's commit need not be the one the binary was built from
        with open(args.bin, "rb") as f:
            machine["ferrotune_bin"] = {"path": args.bin, "sha256": hashlib.sha256(f.read()).hexdigest()[:16],
                                        "modified": datetime.datetime.fromtimestamp(
                                            os.path.getmtime(args.bin)).isoformat(timespec="seconds")}
    status = None if args.skip_ferrotune else ferrotune_status(args.bin)
    if status:
        log(f"ferrotune side skipped: {status}")
    if not args.skip_machine:
        # In a child: numpy's 1 GiB array and torch would raise this process's RSS high-water mark, and
        # Linux carries the parent's mark into every child it spawns (exec keeps signal->maxrss), so the
        # children's peak RSS would read at least that much.
        log("measuring read bandwidth and matmul peak")
        probe = run_clean([sys.executable, os.path.abspath(__file__), "--measure-machine",
                           "--threads", str(args.threads)], runner.torch_env, args)
        machine.update(probe["json"] or {})
        machine["measure_other_cpu_fraction"] = probe.get("other_cpu_fraction")
    if not args.skip_torch:
        # memory only, so no idle wait or retries
        base = run_child([sys.executable, "-c", "import torch, transformers; "
                          "from transformers import Qwen2ForCausalLM; print('{}')"], runner.torch_env, args.timeout)
        machine["torch_import_rss_mb"] = base["peak_rss_mb"]

    for shape in shapes:
        results["shapes"][shape] = run_shape(runner, shape, args.what, status)
        machine["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:  # after every shape, so a long run keeps what it measured
            json.dump(results, f, indent=1)
            f.write("\n")
    log(f"raw results in {out_path}")
    print(render(results))


if __name__ == "__main__":
    main()
