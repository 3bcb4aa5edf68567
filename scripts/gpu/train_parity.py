"""CUDA training steps against the CPU's, for scripts/gpu/check.sh (section 1c).

Each run directory under RESULTS holds the metrics.jsonl of 4 SFT or DPO steps of the same
random model, data and seed: step 1's loss checks the forward, its gradient norm the backward,
later losses the updates. A run agrees with `{objective}-cpu-f32` when every step's loss and
gradient norm is within the tolerance, relative.

  train_parity.py RESULTS
      all runs of check.sh's table below; prints and writes RESULTS/train-parity.json, with
      `kernels_ok` false when our kernels disagree where candle's composed ops agree.
  train_parity.py RESULTS --run DIR --objective sft [--tolerance 1e-3]
      one run; exit status 0 when it agrees.
"""
import argparse
import json
import os
import sys

RUNS = [("cuda-f32", 1e-3), ("composed-f32", 1e-3), ("cuda-bf16", 0.05)]


def steps(results, name):
    try:
        with open(os.path.join(results, name, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    except Exception:
        return None
    return [r for r in rows if r.get("split") == "train"]


def compare(results, objective, run, tolerance):
    cpu = steps(results, f"{objective}-cpu-f32")
    gpu = steps(results, run)
    if not cpu or not gpu:
        return {"ok": False, "error": "run failed"}
    worst = 0.0
    for a, b in zip(cpu, gpu):
        for k in ["loss", "grad_norm"]:
            worst = max(worst, abs(a[k] - b[k]) / max(abs(a[k]), 1e-6))
    return {"steps": len(gpu), "max_rel_diff": worst, "tolerance": tolerance,
            "ok": worst <= tolerance and len(gpu) == len(cpu)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--run")
    p.add_argument("--objective", default="sft")
    p.add_argument("--tolerance", type=float, default=1e-3)
    a = p.parse_args()
    if a.run:
        r = compare(a.results, a.objective, a.run, a.tolerance)
        print(json.dumps({a.run: r}))
        sys.exit(0 if r["ok"] else 1)
    out = {}
    for obj in ["sft", "dpo"]:
        for run, tol in RUNS:
            out[f"{obj}/{run}"] = compare(a.results, obj, f"{obj}-{run}", tol)
    # Our kernels are at fault when the composed ops agree with the CPU and they do not.
    ok = lambda k: out.get(k, {}).get("ok", False)
    failing = [o for o in ["sft", "dpo"] if ok(f"{o}/composed-f32") and not ok(f"{o}/cuda-f32")]
    out["kernels_ok"] = not failing
    out["kernels_failing"] = failing
    print(json.dumps(out))
    with open(os.path.join(a.results, "train-parity.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
