//! `generate`, `winrate` and `serve` (CONTRACTS "Win rate", "Generation and verification").

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::{ferrotune, fixtures, stdout_json};

fn tiny() -> PathBuf {
    fixtures().join("qwen2-tiny")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny reward model: qwen2-tiny's body with a fixed score head.
fn tiny_reward_model(out: &Path) {
    let src = tiny();
    let config = ferrotune::io::model_dir::load_config(&src).unwrap();
    let tok = ferrotune::io::load_model(&src, DType::F32, &Device::Cpu)
        .unwrap()
        .tokenizer
        .unwrap();
    let pad = ferrotune::data::pad_id(&tok).unwrap();
    let rm_config = ferrotune::train::trainer::reward_model_config(&config, pad).unwrap();
    let mut tensors =
        ferrotune::io::checkpoint::load_tensors(&src, DType::F32, &Device::Cpu).unwrap();
    tensors.remove("lm_head.weight");
    let h = config.hidden_size;
    let w: Vec<f32> = (0..h).map(|i| ((i as f32) * 0.7).sin() * 0.5).collect();
    tensors.insert(
        "score.weight".into(),
        Tensor::from_vec(w, (1, h), &Device::Cpu).unwrap(),
    );
    let decoder = ferrotune::model::Decoder::from_params(rm_config, tensors).unwrap();
    ferrotune::io::save_model(&decoder, Some(&src), out, DType::F32).unwrap();
}

fn write_prompts(path: &Path) {
    let rows = [
        json!({"prompt": [{"role": "user", "content": "What is the capital of France?"}]}),
        json!({"prompt": [{"role": "user", "content": "Write a haiku about rust."}]}),
        json!({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]}),
        json!({"prompt": [{"role": "user", "content": "Count to five."}]}),
        json!({"prompt": [{"role": "user", "content": "Why is the sky blue?"}]}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ferrotune serve` as a child process on a free port; killed on drop.
struct Served {
    child: Child,
    base_url: String,
}

impl Served {
    fn start(model: &Path, name: &str) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args([
                "serve",
                "--model",
                s(model),
                "--port",
                "0",
                "--served-model-name",
                name,
            ])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base_url = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Served { child, base_url }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal OpenAI-style reward endpoint that answers `reward:<length of the answer>` to its
/// first `ok` requests and HTTP 503 to every later one.
fn flaky_judge(ok: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let (status, reply) = if n < ok {
                let request: Value = serde_json::from_slice(&body).unwrap();
                let answer = request["messages"].as_array().unwrap().last().unwrap()["content"]
                    .as_str()
                    .unwrap()
                    .chars()
                    .count();
                (
                    "200 OK",
                    json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": format!("reward:{answer}")}}]})
                        .to_string(),
                )
            } else {
                (
                    "503 Service Unavailable",
                    json!({"error": {"message": "overloaded", "type": "server_error", "code": null}})
                        .to_string(),
                )
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (url, count)
}

#[test]
fn generate_writes_contract_rows_reproducibly() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts);
    let run = |n: &str, out: &Path| {
        let o = ferrotune(&[
            "generate",
            "--model",
            s(&tiny()),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--n",
            n,
            "--max-new-tokens",
            "10",
            "--seed",
            "7",
            "--batch-size",
            "4",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));
        read_jsonl(out)
    };
    let rows = run("3", &tmp.path().join("a.jsonl"));
    assert_eq!(rows.len(), 15);
    for (k, r) in rows.iter().enumerate() {
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "index",
                "sample_index",
                "prompt",
                "completion",
                "num_tokens",
                "finish_reason"
            ]
        );
        assert_eq!(r["index"], k / 3);
        assert_eq!(r["sample_index"], k % 3);
        assert!(r["prompt"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>assistant\n"));
        let tokens = r["num_tokens"].as_u64().unwrap();
        assert!((1..=10).contains(&tokens));
        let reason = r["finish_reason"].as_str().unwrap();
        assert!(reason == "stop" || reason == "length");
        assert_eq!(reason == "length", tokens == 10);
    }
    // Same seed, same rows; the first sample of a 3-sample run is the 1-sample run's.
    assert_eq!(run("3", &tmp.path().join("b.jsonl")), rows);
    let single = run("1", &tmp.path().join("c.jsonl"));
    let firsts: Vec<&Value> = rows.iter().filter(|r| r["sample_index"] == 0).collect();
    assert_eq!(single.iter().collect::<Vec<_>>(), firsts);
}

#[test]
fn generate_in_bf16_writes_the_same_rows_and_a_bad_precision_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts);
    let run = |precision: &str, out: &Path| {
        ferrotune(&[
            "generate",
            "--model",
            s(&tiny()),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--max-new-tokens",
            "8",
            "--precision",
            precision,
        ])
    };
    let f32_rows = {
        let out = tmp.path().join("f32.jsonl");
        assert!(run("f32", &out).status.success());
        read_jsonl(&out)
    };
    let out = tmp.path().join("bf16.jsonl");
    let o = run("bf16", &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let bf16_rows = read_jsonl(&out);
    assert_eq!(bf16_rows.len(), f32_rows.len());
    for (a, b) in f32_rows.iter().zip(&bf16_rows) {
        assert_eq!(a["index"], b["index"]);
        assert_eq!(a["prompt"], b["prompt"]);
        assert!(b["num_tokens"].as_u64().unwrap() >= 1);
    }
    let o = run("fp8", &tmp.path().join("bad.jsonl"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fp8"), "{}", stderr(&o));
}

#[test]
fn winrate_against_a_served_reward_model_matches_the_in_process_rm_judge() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    tiny_reward_model(&rm);
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts);
    // Two answer files from different seeds.
    for (seed, name) in [("1", "a.jsonl"), ("2", "b.jsonl")] {
        let o = ferrotune(&[
            "generate",
            "--model",
            s(&tiny()),
            "--prompts",
            s(&prompts),
            "--out",
            s(&tmp.path().join(name)),
            "--max-new-tokens",
            "12",
            "--seed",
            seed,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (a, b) = (tmp.path().join("a.jsonl"), tmp.path().join("b.jsonl"));
    let winrate = |judge: &str, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "winrate",
            "--prompts",
            s(&prompts),
            "--answers",
            s(&a),
            "--reference-answers",
            s(&b),
            "--judge",
            judge,
            "--out",
            s(out),
            "--json",
        ];
        args.extend_from_slice(extra);
        ferrotune(&args)
    };
    let local_out = tmp.path().join("local/report.json");
    let summary = stdout_json(&winrate(&format!("rm:{}", s(&rm)), &local_out, &[]));
    let local = read_json(&local_out);
    assert!(tmp.path().join("local/report.md").exists());
    assert_eq!(summary["n"], 5);
    assert!(summary.get("records").is_none());

    let server = Served::start(&rm, "rm");
    let remote_out = tmp.path().join("remote/report.json");
    let spec = format!("openai-reward:{}#rm", server.base_url);
    let cache = tmp.path().join("cache.jsonl");
    stdout_json(&winrate(
        &spec,
        &remote_out,
        &["--cache", s(&cache), "--concurrency", "3"],
    ));
    let remote = read_json(&remote_out);
    assert_eq!(remote["judge"], spec);
    for key in [
        "n",
        "wins",
        "ties",
        "losses",
        "win_rate",
        "se",
        "mean_tokens_model",
        "mean_tokens_reference",
    ] {
        assert_eq!(local[key], remote[key], "{key}");
    }
    let (lr, rr) = (
        local["records"].as_array().unwrap(),
        remote["records"].as_array().unwrap(),
    );
    assert_eq!(lr.len(), 5);
    for (l, r) in lr.iter().zip(rr) {
        for key in ["prompt", "model_answer", "reference_answer", "outcome"] {
            assert_eq!(l[key], r[key]);
        }
        for key in ["model_score", "reference_score"] {
            let (a, b) = (l[key].as_f64().unwrap(), r[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-5, "{key}: {a} vs {b}");
        }
    }
    // The remote replies are cached: with the server gone, a rerun pays nothing and agrees.
    let distinct: std::collections::HashSet<(String, String)> = rr
        .iter()
        .flat_map(|r| {
            let p = r["prompt"].as_str().unwrap().to_string();
            [
                (p.clone(), r["model_answer"].as_str().unwrap().to_string()),
                (p, r["reference_answer"].as_str().unwrap().to_string()),
            ]
        })
        .collect();
    assert_eq!(read_jsonl(&cache).len(), distinct.len());
    drop(server);
    let again_out = tmp.path().join("again/report.json");
    let o = winrate(
        &spec,
        &again_out,
        &["--cache", s(&cache), "--judge-retries", "0"],
    );
    stdout_json(&o);
    assert_eq!(read_json(&again_out)["records"], remote["records"]);
}

#[test]
fn winrate_generates_both_sides_and_saves_their_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    tiny_reward_model(&rm);
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts);
    let out = tmp.path().join("eval/report.json");
    let o = ferrotune(&[
        "winrate",
        "--model",
        s(&tiny()),
        "--reference",
        s(&fixtures().join("llama-tiny")),
        "--prompts",
        s(&prompts),
        "--judge",
        &format!("rm:{}", s(&rm)),
        "--out",
        s(&out),
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "3",
        "--tie-epsilon",
        "0.001",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = read_json(&out);
    let keys: Vec<&String> = report.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "n",
            "wins",
            "ties",
            "losses",
            "win_rate",
            "se",
            "judge",
            "mean_tokens_model",
            "mean_tokens_reference",
            "records"
        ]
    );
    let n = report["n"].as_u64().unwrap();
    assert_eq!(n, 5);
    let (w, t, l) = (
        report["wins"].as_u64().unwrap(),
        report["ties"].as_u64().unwrap(),
        report["losses"].as_u64().unwrap(),
    );
    assert_eq!(w + t + l, n);
    let p = (w as f64 + 0.5 * t as f64) / n as f64;
    assert!((report["win_rate"].as_f64().unwrap() - p).abs() < 1e-12);
    for r in report["records"].as_array().unwrap() {
        let d = r["model_score"].as_f64().unwrap() - r["reference_score"].as_f64().unwrap();
        let want = if d.abs() <= 0.001 {
            "tie"
        } else if d > 0.0 {
            "win"
        } else {
            "loss"
        };
        assert_eq!(r["outcome"], want);
    }
    let model_rows = read_jsonl(&tmp.path().join("eval/report.model_answers.jsonl"));
    let reference_rows = read_jsonl(&tmp.path().join("eval/report.reference_answers.jsonl"));
    assert_eq!((model_rows.len(), reference_rows.len()), (5, 5));
    let mean = |rows: &[Value]| {
        rows.iter()
            .map(|r| r["num_tokens"].as_f64().unwrap())
            .sum::<f64>()
            / rows.len() as f64
    };
    assert_eq!(
        report["mean_tokens_model"].as_f64().unwrap(),
        mean(&model_rows)
    );
    assert_eq!(
        report["mean_tokens_reference"].as_f64().unwrap(),
        mean(&reference_rows)
    );
    assert!(std::fs::read_to_string(tmp.path().join("eval/report.md"))
        .unwrap()
        .contains("| 5 |"));
}

#[test]
fn winrate_with_a_genrm_judge_reads_p_yes() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts);
    let out = tmp.path().join("report.json");
    for mode in ["direct", "cot"] {
        let o = ferrotune(&[
            "winrate",
            "--model",
            s(&tiny()),
            "--reference",
            s(&fixtures().join("llama-tiny")),
            "--prompts",
            s(&prompts),
            "--judge",
            &format!("genrm:{}", s(&tiny())),
            "--out",
            s(&out),
            "--max-new-tokens",
            "6",
            "--genrm-mode",
            mode,
            "--genrm-k",
            "2",
            "--genrm-max-new-tokens",
            "6",
            "--genrm-format",
            "terse",
            "--json",
        ]);
        let summary = stdout_json(&o);
        assert_eq!(summary["n"], 5, "{mode}");
        for r in read_json(&out)["records"].as_array().unwrap() {
            for key in ["model_score", "reference_score"] {
                let p = r[key].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&p), "{mode} {key} {p}");
            }
        }
    }
    let o = ferrotune(&[
        "winrate",
        "--model",
        s(&tiny()),
        "--reference",
        s(&tiny()),
        "--prompts",
        s(&prompts),
        "--judge",
        &format!("genrm:{}", s(&tiny())),
        "--out",
        s(&out),
        "--genrm-mode",
        "sideways",
    ]);
    assert!(
        stderr(&o).contains("--genrm-mode `sideways`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_failing_judge_is_retried_a_bounded_number_of_times_and_partial_results_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts);
    // Five requests answered: two pairs judged, the third pair's reference side fails.
    let (url, count) = flaky_judge(5);
    let out = tmp.path().join("report.json");
    let start = std::time::Instant::now();
    let o = ferrotune(&[
        "winrate",
        "--model",
        s(&tiny()),
        "--reference",
        s(&tiny()),
        "--prompts",
        s(&prompts),
        "--judge",
        &format!("openai-reward:{url}#rm"),
        "--out",
        s(&out),
        "--max-new-tokens",
        "6",
        "--concurrency",
        "1",
        "--judge-retries",
        "2",
        "--no-cache",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("judging stopped after 2 of 5 prompts"),
        "{err}"
    );
    assert!(
        err.contains("failed after 3 attempts") && err.contains("HTTP 503"),
        "{err}"
    );
    assert!(err.contains("report.partial.json"), "{err}");
    assert_eq!(count.load(Ordering::SeqCst), 5 + 3);
    assert!(start.elapsed() < std::time::Duration::from_secs(60));
    assert!(!out.exists());
    let partial = read_json(&tmp.path().join("report.partial.json"));
    assert_eq!(partial["n"], 2);
    assert_eq!(partial["records"].as_array().unwrap().len(), 2);
    // Same model and seed on both sides: equal answers, equal rewards, ties.
    assert_eq!(partial["ties"], 2);
    assert_eq!(
        read_jsonl(&tmp.path().join("report.model_answers.jsonl")).len(),
        5
    );

    // Nothing listening at all: the same bounded retries, then a clear error.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = ferrotune(&[
        "winrate",
        "--answers",
        s(&tmp.path().join("report.model_answers.jsonl")),
        "--reference-answers",
        s(&tmp.path().join("report.reference_answers.jsonl")),
        "--prompts",
        s(&prompts),
        "--judge",
        &format!("openai-judge:http://127.0.0.1:{port}/v1#m"),
        "--out",
        s(&tmp.path().join("down/report.json")),
        "--judge-retries",
        "1",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("judging stopped after 0 of 5 prompts"),
        "{err}"
    );
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("failed after 2 attempts"),
        "{err}"
    );
    assert_eq!(
        read_json(&tmp.path().join("down/report.partial.json"))["n"],
        0
    );
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts);
    let out = tmp.path().join("r.json");
    let model = tiny();
    let winrate = |extra: &[&str]| {
        let mut args = vec![
            "winrate",
            "--model",
            s(&model),
            "--reference",
            s(&model),
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        ferrotune(&args)
    };
    // Unknown judge: rejected before any generation.
    let o = winrate(&["--prompts", s(&prompts), "--judge", "bleu:x"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("unknown judge kind `bleu`") && err.contains("openai-judge:URL#MODEL"),
        "{err}"
    );
    let o = winrate(&[
        "--prompts",
        s(&prompts),
        "--judge",
        "openai-reward:http://127.0.0.1:9/v1",
    ]);
    assert!(
        stderr(&o).contains("the model is missing"),
        "{}",
        stderr(&o)
    );
    // A causal LM is not a reward model.
    let o = winrate(&[
        "--prompts",
        s(&prompts),
        "--judge",
        &format!("rm:{}", s(&tiny())),
    ]);
    assert!(stderr(&o).contains("not a reward model"), "{}", stderr(&o));
    // A named API-key variable that is not set.
    let o = winrate(&[
        "--prompts",
        s(&prompts),
        "--judge",
        "openai-judge:http://127.0.0.1:9/v1#m",
        "--judge-api-key-env",
        "FERROTUNE_TEST_SURELY_UNSET",
    ]);
    assert!(
        stderr(&o).contains("FERROTUNE_TEST_SURELY_UNSET"),
        "{}",
        stderr(&o)
    );

    let rm = tmp.path().join("rm");
    tiny_reward_model(&rm);
    let judge = format!("rm:{}", s(&rm));
    let bad = tmp.path().join("bad.jsonl");
    // An empty prompt, a prompt longer than the context (256), a row without its prompt field.
    for (rows, want) in [
        (
            "{\"prompt\": \"hi\"}\n{\"prompt\": \"\"}\n",
            "bad.jsonl:2: the prompt is empty",
        ),
        (
            &format!("{{\"prompt\": \"{}\"}}\n", "many words ".repeat(200)) as &str,
            "bad.jsonl:1: the prompt is",
        ),
        (
            "{\"prompt\": \"hi\"}\n{\"question\": \"q\"}\n",
            "bad.jsonl:2: field `prompt`: missing",
        ),
        ("{\"text\": \"hi\"}\n", "holds no prompt"),
    ] {
        std::fs::write(&bad, rows).unwrap();
        for cmd in ["generate", "winrate"] {
            let o = if cmd == "winrate" {
                winrate(&["--prompts", s(&bad), "--judge", &judge])
            } else {
                ferrotune(&[
                    "generate",
                    "--model",
                    s(&tiny()),
                    "--prompts",
                    s(&bad),
                    "--out",
                    s(&tmp.path().join("g.jsonl")),
                ])
            };
            assert!(!o.status.success(), "{cmd} {rows}");
            assert!(stderr(&o).contains(want), "{cmd}: {}", stderr(&o));
        }
    }
    // Answer rows without a completion, and answer files that miss a prompt.
    let answers = tmp.path().join("answers.jsonl");
    std::fs::write(
        &answers,
        "{\"index\": 0, \"prompt\": \"p\", \"num_tokens\": 1}\n",
    )
    .unwrap();
    let o = ferrotune(&[
        "winrate",
        "--answers",
        s(&answers),
        "--reference-answers",
        s(&answers),
        "--judge",
        &judge,
        "--out",
        s(&out),
    ]);
    assert!(
        stderr(&o).contains("answers.jsonl:1: field `completion`: missing"),
        "{}",
        stderr(&o)
    );
    std::fs::write(
        &answers,
        "{\"index\": 0, \"sample_index\": 0, \"prompt\": \"p\", \"completion\": \"c\", \"num_tokens\": 1, \"finish_reason\": \"stop\"}\n",
    )
    .unwrap();
    let o = ferrotune(&[
        "winrate",
        "--prompts",
        s(&prompts),
        "--answers",
        s(&answers),
        "--reference-answers",
        s(&answers),
        "--judge",
        &judge,
        "--out",
        s(&out),
    ]);
    assert!(
        stderr(&o).contains("no answer for prompt index 1"),
        "{}",
        stderr(&o)
    );
    // Generation needs prompts.
    let o = ferrotune(&[
        "winrate",
        "--model",
        s(&tiny()),
        "--reference",
        s(&tiny()),
        "--judge",
        &judge,
        "--out",
        s(&out),
    ]);
    assert!(stderr(&o).contains("--prompts is needed"), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn sft_with_calculate_win_rate_logs_win_rate_at_each_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    tiny_reward_model(&rm);
    let judge = format!("rm:{}", s(&rm));
    let out = tmp.path().join("run");
    let data = fixtures().join("data/chat.jsonl");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "sft",
            "--model",
            s(&tiny()),
            "--data",
            s(&data),
            "--output-dir",
            s(&out),
            "--sanity-train",
            "--batch-size",
            "4",
            "--max-length",
            "128",
            "--truncation",
            "left",
            "--max-steps",
            "4",
            "--lr",
            "5e-3",
            "--val-check-interval",
            "2",
            "--num-sanity-val-steps",
            "1",
            "--eval-generate",
            "0",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |a: Vec<String>| ferrotune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let summary = stdout_json(&run(args(&[
        "--calculate-win-rate",
        "--win-rate-judge",
        &judge,
        "--win-rate-prompts",
        "2",
        "--win-rate-max-new-tokens",
        "8",
        "--json",
    ])));
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let evals: Vec<&Value> = metrics.iter().filter(|r| r["split"] == "eval").collect();
    // Validations at steps 2 and 4 (the sanity validation logs no row).
    assert_eq!(
        evals
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [2, 4]
    );
    for row in &evals {
        let w = row["win_rate"].as_f64().expect("win_rate");
        let se = row["win_rate_se"].as_f64().expect("win_rate_se");
        assert!((0.0..=1.0).contains(&w), "{row}");
        assert!(se >= 0.0, "{row}");
        // n = 2 prompts: the win rate is a multiple of ½ / 2.
        assert!((w * 4.0 - (w * 4.0).round()).abs() < 1e-9, "{row}");
    }
    assert!(summary["eval"].get("win_rate").is_some(), "{summary}");
    assert!(metrics
        .iter()
        .filter(|r| r["split"] == "train")
        .all(|r| r.get("win_rate").is_none()));
    // The settings are config keys, saved with the run.
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("calculate_win_rate = true"), "{config}");
    assert!(config.contains("win_rate_prompts = 2"), "{config}");

    // Without a judge, or on an objective that does not generate: an error before training.
    let r = run(args(&["--calculate-win-rate"]));
    assert!(!r.status.success());
    assert!(stderr(&r).contains("--win-rate-judge"), "{}", stderr(&r));
    let r = run(args(&[
        "--calculate-win-rate",
        "--win-rate-judge",
        "judge-me",
    ]));
    assert!(!r.status.success());
    assert!(stderr(&r).contains("judge `judge-me`"), "{}", stderr(&r));
    let mut rm_args = args(&["--calculate-win-rate", "--win-rate-judge", &judge]);
    rm_args[0] = "rm".into();
    let r = run(rm_args);
    assert!(!r.status.success());
    assert!(stderr(&r).contains("sft, dpo and genrm"), "{}", stderr(&r));
}
