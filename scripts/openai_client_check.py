#!/usr/bin/env python3
"""Checks that the official OpenAI Python client (pip `openai`) can talk to `ferrotune serve`.

Run by hand (not part of the test suite, which needs no Python):

    pip install openai
    # a causal LM:
    ferrotune serve --model tests/fixtures/qwen2-tiny --port 8000 --api-key sk-local &
    python scripts/openai_client_check.py --base-url http://127.0.0.1:8000/v1 --api-key sk-local
    # a reward model also gets the `reward:<float>` check:
    ferrotune serve --model RM_DIR --port 8001 &
    python scripts/openai_client_check.py --base-url http://127.0.0.1:8001/v1 --reward

Or let the script start the server itself (it stops it at the end):

    python scripts/openai_client_check.py --serve tests/fixtures/qwen2-tiny [--ferrotune target/release/ferrotune]

It checks: models list, chat completion, streaming chat (chunks join to the same text as the
plain answer with the same seed), completions (text and streamed), errors arriving as the
client's typed exceptions (400 for an unknown field, 401 for a wrong key, 404 for an unknown
model), and with --reward that a [user, assistant] chat is answered `reward:<float>`. Prints one
line per check and exits non-zero on the first failure.
"""

import argparse
import os
import re
import subprocess
import sys
import time

import openai


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        sys.exit(1)


def start_server(binary, model, api_key, extra):
    cmd = [binary, "serve", "--model", model, "--port", "0", *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"listening on (\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    sys.exit("ferrotune serve did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="sk-local")
    ap.add_argument("--serve", metavar="MODEL_DIR", help="start `ferrotune serve` on this model")
    ap.add_argument("--serve-reward", metavar="RM_DIR", help="also start a reward model and check it")
    ap.add_argument("--ferrotune", default=os.environ.get("FERROTUNE", "target/debug/ferrotune"))
    ap.add_argument("--reward", action="store_true", help="the server at --base-url is a reward model")
    args = ap.parse_args()

    procs = []
    try:
        if args.serve:
            proc, args.base_url = start_server(args.ferrotune, args.serve, args.api_key, [])
            procs.append(proc)
        print(f"openai {openai.__version__} against {args.base_url}")
        client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
        if args.reward:
            check_reward(client)
        else:
            check_generation(client, args)
        if args.serve_reward:
            proc, url = start_server(args.ferrotune, args.serve_reward, None, [])
            procs.append(proc)
            print(f"reward model at {url}")
            check_reward(openai.OpenAI(base_url=url, api_key="unused", max_retries=0))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    print("all checks passed")


def check_generation(client, args):
    models = client.models.list()
    ids = [m.id for m in models.data]
    check("models.list", len(ids) == 1, f"{ids}")
    model = ids[0]

    messages = [{"role": "user", "content": "Say hello in three words."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0.8, seed=5)
    text = chat.choices[0].message.content
    check(
        "chat.completions.create",
        chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
        and chat.choices[0].finish_reason in ("stop", "length")
        and chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens,
        f"{text!r} ({chat.choices[0].finish_reason}, usage {chat.usage.prompt_tokens}+{chat.usage.completion_tokens})",
    )

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0.8, seed=5, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check(
        "chat.completions.create(stream=True)",
        "".join(pieces) == text and finish == chat.choices[0].finish_reason and usage is not None
        and usage.completion_tokens == chat.usage.completion_tokens,
        f"{chunks} chunks, same text as the plain answer",
    )

    comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0)
    check("completions.create", comp.object == "text_completion" and comp.choices[0].finish_reason in ("stop", "length"),
          repr(comp.choices[0].text))
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True)
        if c.choices
    )
    check("completions.create(stream=True)", streamed == comp.choices[0].text, "same text as greedy")

    many = client.chat.completions.create(model=model, messages=messages, max_tokens=8, n=3, seed=1)
    check("n=3", [c.index for c in many.choices] == [0, 1, 2])

    try:
        client.chat.completions.create(model=model, messages=messages, extra_body={"bogus_field": 1})
        check("unknown field is a 400", False)
    except openai.BadRequestError as e:
        check("unknown field -> openai.BadRequestError", "bogus_field" in str(e), str(e)[:100])
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
        check("unknown model is a 404", False)
    except openai.NotFoundError as e:
        check("unknown model -> openai.NotFoundError", True, str(e)[:100])
    bad = openai.OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0)
    try:
        bad.models.list()
        check("wrong key rejected (only when the server has --api-key)", args.api_key in (None, ""))
    except openai.AuthenticationError as e:
        check("wrong key -> openai.AuthenticationError", True, str(e)[:100])


def check_reward(client):
    model = client.models.list().data[0].id
    scores = []
    for answer in ["Paris.", "I think it is Berlin, or maybe Rome."]:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": answer}],
        )
        content = r.choices[0].message.content
        m = re.fullmatch(r"reward:(-?[0-9.eE+-]+)", content)
        check(f"reward for {answer!r}", m is not None, content)
        scores.append(float(m.group(1)))
    check("rewards differ between answers", scores[0] != scores[1], f"{scores}")


if __name__ == "__main__":
    main()
