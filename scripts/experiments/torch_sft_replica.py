"""Independent check of ferrotune's SFT loop: the same SFT in PyTorch + transformers (batch 64, AdamW lr 3e-3,
30 warm-up steps then cosine, clip 1.0, loss on the answer + <|im_end|>, rows shuffled, not grouped by length),
then greedy accuracy on held-out QA rows. It found the length-grouped batching that held ferrotune's
quickstart SFT at 0.22 accuracy where this replica reached 0.995 (same checkpoint, data and steps).
Usage: /work/venv/bin/python torch_sft_replica.py PRETRAINED_DIR SFT_JSONL TEST_JSONL STEPS
"""
import json, math, random, re, sys, time, torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
src, data, test, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
tok = PreTrainedTokenizerFast(tokenizer_file=f'{src}/tokenizer.json')
def enc(q, a=None):
    p = tok(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    if a is None: return p
    return p, tok(a + "<|im_end|>", add_special_tokens=False).input_ids
rows = [json.loads(l)['messages'] for l in open(data)]
rows = [enc(r[0]['content'], r[1]['content']) for r in rows]
opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
def lr_at(s):
    if s < 30: return 3e-3 * s / 30
    return 3e-3 * 0.5 * (1 + math.cos(math.pi * (s - 30) / (steps - 30)))
order = list(range(len(rows))); random.shuffle(order); pos = 0
t0 = time.time()
for s in range(steps):
    batch = []
    for _ in range(64):
        if pos == len(order): random.shuffle(order); pos = 0
        batch.append(rows[order[pos]]); pos += 1
    L = max(len(p) + len(a) for p, a in batch)
    ids = torch.zeros(64, L, dtype=torch.long); lab = torch.full((64, L), -100); att = torch.zeros(64, L, dtype=torch.long)
    for i, (p, a) in enumerate(batch):
        x = p + a; ids[i, :len(x)] = torch.tensor(x); att[i, :len(x)] = 1; lab[i, len(p):len(x)] = torch.tensor(a)
    for g in opt.param_groups: g['lr'] = lr_at(s)
    out = m(input_ids=ids, attention_mask=att, labels=lab)
    opt.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    if s % 100 == 0 or s == steps - 1: print(s, round(out.loss.item(), 4), round(time.time() - t0, 1), flush=True)
m.eval(); ok = 0; te = [json.loads(l) for l in open(test)]
im_end = tok.convert_tokens_to_ids('<|im_end|>')
with torch.no_grad():
    for t in te:
        ids = torch.tensor([enc(t['question'])])
        out = m.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=im_end, pad_token_id=0)
        txt = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        a = re.search(r'####\s*(-?\d+)', txt); b = re.search(r'####\s*(-?\d+)', t['answer'])
        ok += bool(a) and a.group(1) == b.group(1)
print('acc', ok / len(te))
