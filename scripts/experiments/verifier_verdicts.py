"""How often a quickstart verifier's greedy verdict is right on held-out policy samples (not part of the pipeline).

Labels each candidate with a small re-implementation of the terse world's check (every step's result
consistent with the question's operation and the previous result, the answer equal to the last result),
writes the CoT verify prompts, and after the verifier has written its rationales, counts verdicts.
  python3 verifier_verdicts.py prompts RUN CANDS            # writes vprompts.jsonl, meta.jsonl here
  ferrotune generate --model RUN/runs/genrm/final --prompts vprompts.jsonl --schema prompts \\
      --out rats.jsonl --n 1 --temperature 0 --max-new-tokens 160 --batch-size 128
  python3 verifier_verdicts.py score rats.jsonl [SHOW]       # verdict accuracy; SHOW wrong "Yes" examples
CANDS: `ferrotune generate --model RUN/runs/dpo/final --prompts RUN/data/test.jsonl --schema qa --n 8
--temperature 1.0 --max-new-tokens 96 --seed 1` output.
Measured on 2026-11-27 (1,600 samples of the qs8 DPO policy, 600 GenRM steps): 51 % right with the
`c-b=v ok` lines, 61 % with `c-b=v vs p ok`, 93 % with the digit pairs `c-b=v vs p: 11 01 ok`.
"""
import collections, json, re, sys


def parse_q(q):
    t = re.findall(r"\d+|[+-]", q)
    return int(t[0]), [(t[i], int(t[i + 1])) for i in range(1, len(t), 2)]


def correct(q, a):
    first, ops = parse_q(q)
    m = re.search(r"####\s*(-?\d+)", a)
    steps = re.findall(r"(-?\d+)([+-])(\d+)=(-?\d+)", a.split("####")[0])
    if m is None or len(steps) != len(ops):
        return False
    prev = first
    for (o, b), (x, so, sb, c) in zip(ops, steps):
        if (int(x), so, int(sb)) != (prev, o, b) or int(c) != (prev + b if o == "+" else prev - b):
            return False
        prev = int(c)
    return int(m.group(1)) == prev


def prompts(run, cands):
    qs = [json.loads(l)["question"] for l in open(f"{run}/data/test.jsonl")]
    with open("vprompts.jsonl", "w") as out, open("meta.jsonl", "w") as meta:
        for line in open(cands):
            c = json.loads(line)
            q = qs[c["index"]]
            out.write(json.dumps({"prompt": f"Q: {q}\nA: {c['completion']}\nVerification: Let's verify step by step.\n"}) + "\n")
            meta.write(json.dumps({"q": q, "a": c["completion"], "ok": correct(q, c["completion"])}) + "\n")


def score(rats, show=0):
    meta = [json.loads(l) for l in open("meta.jsonl")]
    got = [json.loads(l)["completion"] for l in open(rats)]
    counts = collections.Counter()
    for m, g in zip(meta, got):
        yes = g.rstrip().endswith("Yes")
        counts[(m["ok"], yes)] += 1
        if yes and not m["ok"] and show > 0:
            show -= 1
            print(m["q"], "|", m["a"], "\n" + g + "\n")
    right = counts[(True, True)] + counts[(False, False)]
    print(f"verdicts right {right / len(meta):.4f}; (label, said Yes) counts {dict(counts)}")


if __name__ == "__main__":
    if sys.argv[1] == "prompts":
        prompts(sys.argv[2], sys.argv[3])
    else:
        score(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
