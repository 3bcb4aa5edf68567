#!/usr/bin/env bash
# The NCCL check, in one call of at most 5 minutes on the GPU machine (NVIDIA driver, CUDA 13,
# PyTorch whose pip install carries libnccl.so.2 and the cu13 libraries; no Rust, no internet),
# from the repository root, with target/gpu-carry/ferrotune.xz built by
#   FERROTUNE_GPU_FEATURES=cuda,nccl scripts/gpu/build.sh
# The machine has one GPU, so the NCCL world is of size one (torchrun variables, WORLD_SIZE=1):
# that still runs the whole NCCL path (the communicator's init from NCCL_COMM_ID, the device
# all-reduce of every gradient bucket, the host collectives staged through the GPU).
#   1. a 20-step SFT run of the 5M shape under NCCL and the same run as a plain single process
#      on CUDA: the train losses and gradient norms must agree to 1e-5 relative;
#   2. step time and all-reduce time per step (`bench train`) and the gradient all-reduce alone
#      (`bench allreduce`) for the 5M and the Qwen2.5-0.5B shapes, NCCL against single;
#   3. the clear errors: NCCL asked for with the model on the CPU, a GPU index the node lacks,
#      a world of two without MASTER_ADDR.
# Everything is printed and the summary written to ${OUT:-target/nccl-check}/nccl-check.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-target/nccl-check}
mkdir -p "$OUT"
. scripts/gpu/runtime.sh   # PY, BIN, LD_LIBRARY_PATH (libnccl.so.2 included)
exec > >(tee "$OUT/nccl-check.log") 2>&1
WORK=${WORK:-/tmp/nccl-check}
rm -rf "$WORK" && mkdir -p "$WORK"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ldd "$BIN" | grep -E 'nccl|not found'
$BIN --version || { echo "nccl_check.sh: $BIN does not start (missing libraries?)"; exit 1; }

# torchrun's variables for a world of one; SINGLE_ENV clears them (and any inherited ones). Each
# NCCL run gets the next port (rank 0 listens on it; a port just closed may linger in TIME_WAIT).
PORT=29511
NCCL_ENV=()
next_port() {
  NCCL_ENV=(env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT RUST_LOG=info)
  PORT=$((PORT + 1))
}
SINGLE_ENV=(env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u MASTER_ADDR -u MASTER_PORT -u NCCL_COMM_ID RUST_LOG=info)

echo "== models"
M5=$WORK/m5
M05=$WORK/qwen05
$BIN init-model --config scripts/bench/configs/tiny.json --tokenizer tests/fixtures/tokenizer \
  --out $M5 --seed 0 --dtype f32 >/dev/null || exit 1
timeout 90 $BIN init-model --config scripts/bench/configs/qwen05.json \
  --tokenizer tests/fixtures/tokenizer --out $M05 --seed 0 --dtype f32 >/dev/null

echo "== 1. 20 SFT steps, NCCL world of one vs single process"
sft() {
  timeout 90 "$@" $BIN sft --model $M5 --data tests/fixtures/data/chat.jsonl \
    --output-dir "$RUN" --batch-size 4 --max-length 1024 --max-steps 20 --lr 1e-3 \
    --lr-scheduler constant --num-sanity-val-steps 0 --seed 3 --json
}
next_port
RUN=$WORK/sft-nccl sft "${NCCL_ENV[@]}" >"$WORK/sft-nccl.json" 2>"$WORK/sft-nccl.err"
echo "nccl sft: exit $?"; grep -iE 'nccl|distributed' "$WORK/sft-nccl.err" | head -5
RUN=$WORK/sft-single sft "${SINGLE_ENV[@]}" >"$WORK/sft-single.json" 2>"$WORK/sft-single.err"
echo "single sft: exit $?"
tail -c 400 "$WORK/sft-nccl.err"; tail -c 400 "$WORK/sft-single.err"

echo "== 2. step and all-reduce times"
bench() { # name, env…, then ferrotune arguments after --
  local name=$1; shift
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  timeout 100 "${envs[@]}" $BIN bench "$@" >"$WORK/bench-$name.json" 2>"$WORK/bench-$name.err" \
    || echo "bench $name failed: $(tail -c 300 "$WORK/bench-$name.err")"
  cat "$WORK/bench-$name.json"
}
next_port
bench train-5m-nccl "${NCCL_ENV[@]}" -- train --model $M5 --batch-size 8 --seq-len 256 --steps 5 --warmup 1
bench train-5m-single "${SINGLE_ENV[@]}" -- train --model $M5 --batch-size 8 --seq-len 256 --steps 5 --warmup 1
next_port
bench allreduce-5m-nccl "${NCCL_ENV[@]}" -- allreduce --config scripts/bench/configs/tiny.json --repeats 5
if [ -f $M05/config.json ]; then
  next_port
  bench train-05b-nccl "${NCCL_ENV[@]}" -- train --model $M05 --batch-size 2 --seq-len 512 \
    --steps 3 --warmup 1 --precision bf16
  bench train-05b-single "${SINGLE_ENV[@]}" -- train --model $M05 --batch-size 2 --seq-len 512 \
    --steps 3 --warmup 1 --precision bf16
  next_port
  bench allreduce-05b-nccl "${NCCL_ENV[@]}" -- allreduce --config scripts/bench/configs/qwen05.json --repeats 3
fi

echo "== 3. clear errors"
expect_error() { # name, expected text, env…
  local name=$1 want=$2; shift 2
  timeout 30 "$@" $BIN bench allreduce --config scripts/bench/configs/tiny.json --repeats 1 \
    >/dev/null 2>"$WORK/error-$name.err"
  local rc=$?
  echo "$name: exit $rc: $(head -c 300 "$WORK/error-$name.err")"
  if [ $rc -ne 0 ] && grep -q "$want" "$WORK/error-$name.err"; then echo ok >"$WORK/error-$name.ok"; fi
}
next_port
expect_error nccl-on-cpu "CUDA device" "${NCCL_ENV[@]}" FERROTUNE_DEVICE=cpu FERROTUNE_DIST_BACKEND=nccl
next_port
expect_error missing-gpu "GPU(s)" "${NCCL_ENV[@]}" LOCAL_RANK=7
expect_error no-master "MASTER_ADDR" "${SINGLE_ENV[@]}" RANK=0 WORLD_SIZE=2

$PY - "$WORK" "$OUT/nccl-check.json" <<'PYEOF'
import json, os, sys
work, dest = sys.argv[1], sys.argv[2]
def load(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except Exception as e:
        return {"error": str(e)}
def train_rows(run):
    try:
        rows = [json.loads(l) for l in open(os.path.join(work, run, "metrics.jsonl"))]
    except Exception as e:
        return {"error": str(e)}
    return [r for r in rows if r.get("split") == "train"]
nccl, single = train_rows("sft-nccl"), train_rows("sft-single")
parity = {"steps": None, "max_relative_loss_diff": None, "max_relative_grad_norm_diff": None, "ok": False}
if isinstance(nccl, list) and isinstance(single, list) and nccl and len(nccl) == len(single):
    def rel(key):
        worst = 0.0
        for a, b in zip(nccl, single):
            x, y = a.get(key), b.get(key)
            if x is None or y is None:
                continue
            worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-30))
        return worst
    parity.update(steps=len(nccl), max_relative_loss_diff=rel("loss"),
                  max_relative_grad_norm_diff=rel("grad_norm"),
                  first_loss=nccl[0].get("loss"), last_loss=nccl[-1].get("loss"))
    parity["ok"] = len(nccl) == 20 and parity["max_relative_loss_diff"] <= 1e-5
else:
    parity["error"] = f"train rows: nccl {nccl if not isinstance(nccl, list) else len(nccl)}, single {single if not isinstance(single, list) else len(single)}"
try:
    parity["nccl_backend_logged"] = "nccl" in open(os.path.join(work, "sft-nccl.err")).read()
except Exception:
    parity["nccl_backend_logged"] = False
benches = {}
for name in ["train-5m-nccl", "train-5m-single", "allreduce-5m-nccl",
             "train-05b-nccl", "train-05b-single", "allreduce-05b-nccl"]:
    if os.path.exists(os.path.join(work, f"bench-{name}.json")):
        benches[name] = load(f"bench-{name}.json")
errors = {n: os.path.exists(os.path.join(work, f"error-{n}.ok"))
          for n in ["nccl-on-cpu", "missing-gpu", "no-master"]}
summary = {"sft_parity": parity, "bench": benches, "clear_errors": errors}
json.dump(summary, open(dest, "w"), indent=1)
short = {"parity_ok": parity["ok"], "max_rel_loss": parity["max_relative_loss_diff"],
         "nccl_logged": parity["nccl_backend_logged"], "errors_ok": all(errors.values())}
for name, b in benches.items():
    short[name] = {k: b.get(k) for k in ["backend", "step_seconds_median",
                                          "allreduce_seconds_median", "tokens_per_s",
                                          "bus_gb_per_s", "error"] if k in b}
print(json.dumps(short, indent=1))
PYEOF
