#!/usr/bin/env python3
"""Throughput of `ferrotune serve` under a bounded concurrent load from a local client (issue 4,
"What must be shown").

Starts `ferrotune serve --model M --port P`, waits until `GET /v1/models` answers, sends one warm-up
request, then for each concurrency level C sends N `POST /v1/completions` requests (distinct prompts,
`max_tokens` 32, temperature 0) from C Python threads (urllib, no other dependency), and prints
requests/s, generated tokens/s (the responses' `usage.completion_tokens`) and p50/p95 latency per
level. The server is stopped at the end (also on errors).

    /work/venv/bin/python scripts/bench/server_load.py                       # tiny shape, C = 1 and 16
    /work/venv/bin/python scripts/bench/server_load.py --concurrency 1,4,16 --requests 64 --out r.json
    /work/venv/bin/python scripts/bench/server_load.py --model DIR --port 8011

Defaults: the 5M benchmark shape (scripts/bench/configs/tiny.json, random f32 weights, seed 0, made
under --work), 64 requests per level, prompts of ~48 tokens (the fixture tokenizer), RAYON_NUM_THREADS=2 for the server.
Latency is per request, from sending it to reading the whole reply. "other CPU" is the share of
the CPUs that processes other than the server and this client took during a level (from /proc/stat
minus both processes' CPU time): on 2 cores any is enough to spoil the figures, so a level that
others took over 5 % of the CPUs during is run again (`--retries`, default 2; the least disturbed
attempt is kept). A benchmark, not a test.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from compare import cpu_busy_seconds, wait_until_idle  # noqa: E402

TOKENIZER = os.path.join(REPO, "tests", "fixtures", "tokenizer")
CONFIG = os.path.join(HERE, "configs", "tiny.json")
WORDS = "apple river stone cloud seven garden window market winter silver lamp bridge forest number".split()


def log(msg):
    print(f"[server_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_cpu_seconds(pid):
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds():
    t = os.times()
    return t.user + t.system


def request_json(url, body=None, api_key=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def start_server(args, model, log_file):
    cmd = [args.bin, "serve", "--model", model, "--port", str(args.port)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    deadline = time.time() + args.start_timeout
    base = None
    while time.time() < deadline:
        if proc.poll() is not None:
            log_file.seek(0)
            sys.exit(f"ferrotune serve exited ({proc.returncode}):\n{log_file.read().decode(errors='replace')[-2000:]}")
        if base is None:  # with --port 0 the address is only known from the log line
            log_file.seek(0)
            m = re.search(r"listening on (\S+)", log_file.read().decode(errors="replace"))
            if m:
                base = m.group(1).rstrip("/")
        if base is not None:
            try:
                models = request_json(base + "/models", timeout=5)
                return proc, base, models["data"][0]["id"]
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("ferrotune serve did not answer GET /v1/models in time")


def prompt(i):
    words = [WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(12)]
    return f"Request {i}: " + " ".join(words) + "."


def one(base, model, i, args):
    body = {"model": model, "prompt": prompt(i), "max_tokens": args.max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    reply = request_json(base + "/completions", body)
    latency = time.perf_counter() - t0
    usage = reply["usage"]
    return {"i": i, "latency": latency, "completion_tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"], "finish_reason": reply["choices"][0]["finish_reason"]}


def percentile(xs, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_level(base, model, server_pid, concurrency, args, offset):
    idle = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else None
    load = os.getloadavg()[0]
    busy0, srv0, me0 = cpu_busy_seconds(), proc_cpu_seconds(server_pid), self_cpu_seconds()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda i: one(base, model, offset + i, args), range(args.requests)))
    wall = time.perf_counter() - t0
    busy = cpu_busy_seconds() - busy0
    srv = proc_cpu_seconds(server_pid) - srv0
    me = self_cpu_seconds() - me0
    lat = [r["latency"] for r in results]
    tokens = sum(r["completion_tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "wall_seconds": round(wall, 3),
        "requests_per_s": len(results) / wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in results),
        "latency_p50": percentile(lat, 0.5), "latency_p95": percentile(lat, 0.95),
        "latency_mean": statistics.mean(lat), "latency_max": max(lat),
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in results) for k in {r["finish_reason"] for r in results}},
        "server_cpu_seconds": round(srv, 2), "client_cpu_seconds": round(me, 2),
        "other_cpu": round(max(busy - srv - me, 0.0) / (wall * os.cpu_count()), 3),
        "other_cpu_before": idle, "loadavg_1m": round(load, 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "release", "ferrotune"))
    ap.add_argument("--model", help="model directory (default: the tiny shape, made under --work)")
    ap.add_argument("--work", default=os.path.join(REPO, "target", "bench-server"))
    ap.add_argument("--port", type=int, default=0, help="0 lets the server pick a free port")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,16", help="levels, comma separated")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="RAYON_NUM_THREADS of the server")
    ap.add_argument("--start-timeout", type=float, default=120)
    ap.add_argument("--wait-idle", type=float, default=30,
                    help="before each level, wait at most this long for the machine to go under 10%% CPU")
    ap.add_argument("--retries", type=int, default=2,
                    help="run a level again when other processes took over 5%% of the CPUs during it")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    model = args.model
    if model is None:
        model = os.path.join(args.work, "tiny")
        if not os.path.exists(os.path.join(model, "model.safetensors")):
            subprocess.run([args.bin, "init-model", "--config", CONFIG, "--tokenizer", TOKENIZER,
                            "--out", model, "--seed", "0", "--dtype", "f32"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryFile() as server_log:
        proc, base, name = start_server(args, model, server_log)
        try:
            log(f"server {base} (model {name}, pid {proc.pid}) is up")
            one(base, name, -1, args)  # warm-up
            for j, c in enumerate(levels):
                for attempt in range(1, args.retries + 2):
                    res = run_level(base, name, proc.pid, c, args, offset=j * args.requests)
                    res["attempt"] = attempt
                    if attempt == 1 or res["other_cpu"] < r["other_cpu"]:
                        r = res
                    if res["other_cpu"] <= 0.05:
                        break
                    log(f"concurrency {c}: other processes took {res['other_cpu']:.0%} of the CPUs; "
                        + ("running it again" if attempt <= args.retries else "keeping the least disturbed attempt"))
                rows.append(r)
                log(f"concurrency {c}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.0f} tok/s, "
                    f"p50 {r['latency_p50'] * 1000:.0f} ms, p95 {r['latency_p95'] * 1000:.0f} ms, "
                    f"other CPU {r['other_cpu']:.0%}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    print(f"\n`ferrotune serve` throughput: {args.requests} POST /v1/completions per level, max_tokens "
          f"{args.max_tokens}, temperature 0, prompts of ~{rows[0]['prompt_tokens_mean']:.0f} tokens, "
          f"server RAYON_NUM_THREADS={args.threads}\n")
    print("| concurrency | requests/s | generated tokens/s | p50 latency (ms) | p95 latency (ms) | "
          "tokens generated | wall (s) | server CPU (s) | other CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['latency_p50'] * 1000:,.0f} | {r['latency_p95'] * 1000:,.0f} | {r['completion_tokens']:,} | "
              f"{r['wall_seconds']:.2f} | {r['server_cpu_seconds']:.2f} | {r['other_cpu']:.0%} |")
    if len(rows) > 1:
        print(f"\nthroughput ratio, concurrency {rows[-1]['concurrency']} ÷ {rows[0]['concurrency']}: "
              f"{rows[-1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}×")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "model": model, "levels": rows}, f, indent=1)


if __name__ == "__main__":
    main()
