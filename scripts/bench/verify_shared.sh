#!/usr/bin/env bash
# `ferrotune verify` on every file of ../shared/data/genrm/ (issue 4, "What must be shown": verify runs
# on every file and reports the label-separating AUC).
#
#   scripts/bench/verify_shared.sh [OUT_DIR]          # default OUT_DIR: target/bench-verify
#
# Makes a small random verifier (tests/fixtures/qwen2-tiny's shape, 151k parameters, with
# max_position_embeddings 4096 so the longest rows (~950 tokens with the fixture tokenizer) and
# their rationales fit), then runs, for each of the six files alone and for each correct/incorrect
# pair together (one file holds a single label, so its AUC is undefined: null; the pair is where
# the AUC separates labels):
#   direct: every row, `--mode direct`
#   cot:    `--mode cot --k-min 2 --k-step 2 --k-max 4 --max-new-tokens 16 --limit 8` (first 8 rows of
#           each file: sampling rationales is the slow part)
# and prints one table row per run: rows, label counts (from the output rows), AUC, mean k, mean
# score per label, seconds. A random model's AUC is ~0.5 (anything in 0.3–0.7 at these sizes): the
# point is that every file runs and the AUC is computed against the labels. A run that fails is
# reported with its stderr and makes the script exit 1 after the others ran.
#
# Environment: FERROTUNE (binary, default target/release/ferrotune), GENRM_DATA (default
# ../shared/data/genrm), RAYON_NUM_THREADS (default 2), COT_LIMIT (default 8).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
BIN="${FERROTUNE:-target/release/ferrotune}"
DATA="${GENRM_DATA:-../shared/data/genrm}"
OUT="${1:-target/bench-verify}"
COT_LIMIT="${COT_LIMIT:-8}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
PY="$(command -v python3)"

[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release -p ferrotune-cli)" >&2; exit 2; }
mkdir -p "$OUT"

# The verifier: qwen2-tiny's config with a 4096-token context.
"$PY" - "$OUT/verifier-config.json" <<'EOF'
import json, sys
c = json.load(open("tests/fixtures/qwen2-tiny/config.json"))
c["max_position_embeddings"] = 4096
json.dump(c, open(sys.argv[1], "w"), indent=2)
EOF
MODEL="$OUT/verifier"
"$BIN" init-model --config "$OUT/verifier-config.json" --tokenizer tests/fixtures/tokenizer \
  --out "$MODEL" --seed 0 --dtype f32 >/dev/null 2>&1 || { echo "init-model failed" >&2; exit 2; }

FILES=(
  cot_correct_val_qidmod5_01.jsonl
  cot_incorrect_val_qidmod5_01.jsonl
  rm_correct_batch00_first100.jsonl
  rm_incorrect_batch00_first100.jsonl
  data_collection_critique_gen_correct_r0s0_300.jsonl
  data_collection_critique_gen_incorrect_r0s0_300.jsonl
)
# name|data files (space separated): the six files alone, then the three correct/incorrect pairs
RUNS=()
for f in "${FILES[@]}"; do RUNS+=("${f%.jsonl}|$f"); done
RUNS+=("PAIR cot_val|${FILES[0]} ${FILES[1]}")
RUNS+=("PAIR rm_batch00|${FILES[2]} ${FILES[3]}")
RUNS+=("PAIR data_collection|${FILES[4]} ${FILES[5]}")

echo "uptime before: $(uptime)"
failed=0
: >"$OUT/runs.tsv"
: >"$OUT/commands.txt"
for mode in direct cot; do
  for run in "${RUNS[@]}"; do
    name="${run%%|*}"
    files="${run#*|}"
    tag="$(echo "$name" | tr ' ' '_')-$mode"
    args=(verify --model "$MODEL" --out "$OUT/$tag.jsonl" --mode "$mode" --summary "$OUT/$tag.summary.json")
    for f in $files; do args+=(--data "$DATA/$f"); done
    if [ "$mode" = cot ]; then
      args+=(--k-min 2 --k-step 2 --k-max 4 --max-new-tokens 16 --limit "$COT_LIMIT")
    fi
    rm -f "$OUT/$tag.summary.json" "$OUT/$tag.jsonl"
    echo "+ $BIN ${args[*]}" >>"$OUT/commands.txt"
    if "$BIN" "${args[@]}" 2>"$OUT/$tag.stderr"; then
      printf '%s\t%s\t%s\tok\n' "$name" "$mode" "$tag" >>"$OUT/runs.tsv"
    else
      rc=$?
      failed=1
      printf '%s\t%s\t%s\tFAILED(%s)\n' "$name" "$mode" "$tag" "$rc" >>"$OUT/runs.tsv"
      echo "FAILED ($rc): $BIN ${args[*]}" >&2
      tail -5 "$OUT/$tag.stderr" >&2
    fi
  done
done
echo "uptime after: $(uptime)"

"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
print("\n| data | mode | rows | label 1 / 0 / none | AUC | mean k | mean score correct / incorrect | rationale tokens | seconds | status |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for line in open(os.path.join(out, "runs.tsv")):
    name, mode, tag, status = line.rstrip("\n").split("\t")
    if status != "ok":
        print(f"| {name} | {mode} | | | | | | | | {status} |")
        continue
    s = json.load(open(os.path.join(out, f"{tag}.summary.json")))
    labels = [json.loads(l).get("label") for l in open(os.path.join(out, f"{tag}.jsonl"))]
    counts = f"{labels.count(1)} / {labels.count(0)} / {labels.count(None)}"
    f = lambda x, d=3: "null" if x is None else f"{x:.{d}f}"
    print(f"| {name} | {mode} | {s['rows']} | {counts} | {f(s['auc'])} | {s['mean_k']:.2f} | "
          f"{f(s['mean_score_correct'], 4)} / {f(s['mean_score_incorrect'], 4)} | {s['rationale_tokens']} | "
          f"{s['seconds']:.1f} | ok |")
EOF
exit $failed
