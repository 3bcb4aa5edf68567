"""Verifier rationale formats for the quickstart's terse world, tried by hand (not part of the pipeline).

Rewrites the GenRM training rows of a quickstart run (RUN/data/genrm_verify_policy.jsonl) and held-out
candidates (CANDS: `ferrotune generate --prompts RUN/data/test.jsonl --schema qa --n 4` output) into
another rationale format, labelled by final-answer correctness:
  B   re-solve by rewriting the expression (`7+4+6-1`, `=11+6-1`, `=17-1`, `=16`), then `answer N ok|no`
  B2  B with the question line given in the input
  C2  rewrite with the step written out (`7+4=11 +6-1`, `11+6=17 -1`, ...), question line given
  C3  C2 with the candidate's answer compared on the last line (`17-1=16 #### 17 no`)
  C4  C3 with ` #### <candidate answer>` also given after the question line in the input
Writes train_FMT.jsonl and eval_FMT.jsonl in the current folder; then, e.g.:
  ferrotune genrm --config configs/quickstart/genrm.toml --model RUN/runs/dpo/final --data train_C4.jsonl \
      --output-dir rC4 --max-steps 300 --set correct_data="RUN/data/genrm_correct.jsonl"
  ferrotune verify --model rC4/final --data eval_C4.jsonl --out v.jsonl --k-min 8 --k-step 8 --k-max 8 \
      --temperature 0.5 --max-new-tokens 100       # prints the held-out AUC
Usage: python3 verifier_formats.py FMT RUN CANDS
"""
import json,re,sys
VQ="Verification: Let's verify step by step.\n"
VL="Verification: Is the answer correct (Yes/No)?"
def parse_q(q):
    toks=re.findall(r'\d+|[+-]',q)
    first=int(toks[0]); ops=[(toks[i],int(toks[i+1])) for i in range(1,len(toks),2)]
    return first,ops
def truth(first,ops):
    v=first; vals=[]
    for o,b in ops:
        v=v+b if o=='+' else v-b; vals.append(v)
    return vals
def cand_answer(a):
    m=re.search(r'####\s*(-?\d+)',a)
    return int(m.group(1)) if m else None
def expr(v,rest):
    return str(v)+''.join(f'{o}{b}' for o,b in rest)
def rationale_B(first,ops,a):
    vals=truth(first,ops)
    lines=[expr(first,ops)]
    for k in range(len(ops)):
        lines.append('='+expr(vals[k],ops[k+1:]))
    ans=cand_answer(a)
    ok = ans==vals[-1]
    if ans is None: lines.append('answer missing no')
    else: lines.append(f'answer {ans} '+('ok' if ok else 'no'))
    if not ok: lines.append('The final answer is wrong.')
    return '\n'.join(lines), ok
def rationale_C(first,ops,a):
    # like B but each step shows the computation: 7+4=11 then the rewritten rest
    vals=truth(first,ops)
    lines=[]; cur=first
    for k,(o,b) in enumerate(ops):
        lines.append(f'{cur}{o}{b}={vals[k]}'+('' if k==len(ops)-1 else ' '+expr(vals[k],ops[k+1:])))
        cur=vals[k]
    ans=cand_answer(a)
    ok = ans==vals[-1]
    if ans is None: lines.append('answer missing no')
    else: lines.append(f'answer {ans} '+('ok' if ok else 'no'))
    if not ok: lines.append('The final answer is wrong.')
    return '\n'.join(lines), ok
def rationale_C2(first,ops,a):
    vals=truth(first,ops)
    lines=[]; cur=first
    for k,(o,b) in enumerate(ops):
        rest=''.join(f'{oo}{bb}' for oo,bb in ops[k+1:])
        lines.append(f'{cur}{o}{b}={vals[k]}'+(' '+rest if rest else ''))
        cur=vals[k]
    ans=cand_answer(a)
    ok = ans==vals[-1]
    if ans is None: lines.append('answer missing no')
    else: lines.append(f'answer {ans} '+('ok' if ok else 'no'))
    if not ok: lines.append('The final answer is wrong.')
    return expr(first,ops)+'\n'+'\n'.join(lines), ok
def rationale_C3(first,ops,a):
    vals=truth(first,ops)
    lines=[]; cur=first
    for k,(o,b) in enumerate(ops):
        rest=''.join(f'{oo}{bb}' for oo,bb in ops[k+1:])
        lines.append(f'{cur}{o}{b}={vals[k]}'+(' '+rest if rest else ''))
        cur=vals[k]
    ans=cand_answer(a)
    ok = ans==vals[-1]
    lines[-1]+=' #### '+('missing' if ans is None else str(ans))+(' ok' if ok else ' no')
    if not ok: lines.append('The final answer is wrong.')
    return expr(first,ops)+'\n'+'\n'.join(lines), ok
F={'B':rationale_B,'C':rationale_C,'C2':rationale_C2,'C3':rationale_C3}
def row(q,a,fmt):
    first,ops=parse_q(q)
    if fmt=='C4':
        r,ok=rationale_C3(first,ops,a)
        head,_,r=r.partition('\n')
        ans=cand_answer(a)
        return {"inputs":f"Q: {q}\nA: {a}\n{VQ}{head} #### {'missing' if ans is None else ans}\n","targets":f"{r}\n{VL} "+("Yes" if ok else "No")}
    if fmt in ('B2','C2','C3'):
        r,ok=F['B' if fmt=='B2' else fmt](first,ops,a)
        head,_,r=r.partition('\n')
        return {"inputs":f"Q: {q}\nA: {a}\n{VQ}{head}\n","targets":f"{r}\n{VL} "+("Yes" if ok else "No")}
    r,ok=F[fmt](first,ops,a)
    return {"inputs":f"Q: {q}\nA: {a}\n{VQ}","targets":f"{r}\n{VL} "+("Yes" if ok else "No")}
fmt, run, cands = sys.argv[1], sys.argv[2], sys.argv[3]
with open(f'train_{fmt}.jsonl','w') as f:
    for l in open(f'{run}/data/genrm_verify_policy.jsonl'):
        r=json.loads(l)
        m=re.match(r"Q: (.*)\nA: (.*)\nVerification",r['inputs'],re.S)
        q,a=m.groups()
        f.write(json.dumps(row(q,a,fmt))+'\n')
test=[json.loads(l) for l in open(f'{run}/data/test.jsonl')]
seen=set()
with open(f'eval_{fmt}.jsonl','w') as f:
    for l in open(cands):
        c=json.loads(l); q=test[c['index']]['question']; a=c['completion'].strip()
        if (q,a) in seen: continue
        seen.add((q,a)); f.write(json.dumps(row(q,a,fmt))+'\n')
print(fmt,len(seen))
