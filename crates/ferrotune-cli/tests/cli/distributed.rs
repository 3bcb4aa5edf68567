//! Data parallelism end to end under `mpirun -np 2` (built with `--features mpi`; CI installs
//! OpenMPI): two ranks at global batch 8 reproduce one rank at batch 8 (SFT and DPO: losses
//! within 1e-5 relative, final weights within 1e-5), rank 0 alone writes, sharded `generate`
//! and `verify` equal the single-process files, a killed or failing rank ends the job with an
//! error, and its last checkpoint resumes (under another world size).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::{fixtures, stdout_json};

const RELATIVE: f64 = 1e-5;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrotune")
}

fn shared(file: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(file)
        .to_string_lossy()
        .to_string()
}

fn model() -> String {
    fixtures().join("qwen2-tiny").to_string_lossy().to_string()
}

/// `mpirun -np N ferrotune ARGS` (one thread per rank: two ranks share this machine's cores).
fn mpirun(np: usize, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "-np",
        &np.to_string(),
        "--bind-to",
        "none",
        "--oversubscribe",
    ])
    .arg(bin())
    .args(args)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("RAYON_NUM_THREADS", "1")
    .env("RUST_LOG", "info");
    c
}

fn single(args: &[String]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env("RUST_LOG", "warn");
    c
}

fn output(mut c: Command) -> Output {
    c.output()
        .expect("start (mpirun: apt-get install openmpi-bin)")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn rows(run: &Path, split: &str) -> Vec<serde_json::Value> {
    metrics(run)
        .into_iter()
        .filter(|r| r["split"] == split)
        .collect()
}

fn assert_close(what: &str, a: f64, b: f64) {
    let scale = a.abs().max(b.abs()).max(1e-30);
    assert!(
        (a - b).abs() <= RELATIVE * scale,
        "{what}: {a} vs {b} (relative {:.2e})",
        (a - b).abs() / scale
    );
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn assert_weights_close(a: &Path, b: &Path) {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let diff = (x - &b[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "{name}: max |Δw| = {diff:e}");
    }
}

/// Train rows' losses (and the objective's other train metrics) and eval rows of two runs agree.
fn assert_same_trajectory(one: &Path, two: &Path, keys: &[&str]) {
    for split in ["train", "eval"] {
        let (a, b) = (rows(one, split), rows(two, split));
        assert_eq!(a.len(), b.len(), "{split} rows");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x["step"], y["step"]);
            for key in keys {
                if let (Some(p), Some(q)) = (x[key].as_f64(), y[key].as_f64()) {
                    assert_close(&format!("{split} step {} {key}", x["step"]), p, q);
                }
            }
        }
    }
}

/// Rank 0 alone wrote the run: each train step once, one TensorBoard file, one JSON summary;
/// the other rank logged no info lines.
fn assert_written_once(run: &Path, steps: usize, out: &Output) {
    let train_steps: Vec<u64> = rows(run, "train")
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, (1..=steps as u64).collect::<Vec<_>>());
    let events = std::fs::read_dir(run)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("events.out"))
        .count();
    assert_eq!(events, 1, "one TensorBoard file");
    stdout_json(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr
            .lines()
            .any(|l| l.contains("[rank 1/2]") && l.contains("INFO")),
        "rank 1 logs warnings and errors only:\n{stderr}"
    );
}

fn sft_args(out: &Path, steps: usize) -> Vec<String> {
    strings(&[
        "sft",
        "--model",
        &model(),
        "--data",
        &shared("chat/llamafactory_dpo_en_demo_chat.jsonl"),
        "--output-dir",
        out.to_str().unwrap(),
        // 30 rows in global batches of 8: every epoch ends with a batch of 6.
        "--train-dataset-length",
        "30",
        "--batch-size",
        "8",
        "--max-length",
        "64",
        "--truncation",
        "left",
        "--max-steps",
        &steps.to_string(),
        "--lr",
        "1e-3",
        "--lr-scheduler",
        "constant",
        "--val-check-interval",
        "10",
        "--eval-generate",
        "4",
        "--num-sanity-val-steps",
        "1",
        "--seed",
        "3",
        "--json",
    ])
}

#[test]
fn two_ranks_reproduce_one_rank_for_20_sft_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    stdout_json(&output(single(&sft_args(&one, 20))));
    let out = output(mpirun(2, &sft_args(&two, 20)));
    assert_written_once(&two, 20, &out);
    assert_same_trajectory(
        &one,
        &two,
        &[
            "loss",
            "grad_norm",
            "token_accuracy",
            "perplexity",
            "edit_distance",
        ],
    );
    assert_weights_close(&one.join("final"), &two.join("final"));
}

#[test]
fn two_ranks_reproduce_one_rank_for_20_dpo_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &Path| {
        strings(&[
            "dpo",
            "--model",
            &model(),
            "--data",
            &shared("preference/ultrafeedback_binarized_h4schema.jsonl"),
            "--output-dir",
            out.to_str().unwrap(),
            "--train-dataset-length",
            "20",
            "--batch-size",
            "8",
            "--max-length",
            "96",
            "--max-steps",
            "20",
            "--lr",
            "2e-4",
            "--lr-scheduler",
            "constant",
            "--val-check-interval",
            "10",
            "--num-sanity-val-steps",
            "0",
            "--seed",
            "5",
            "--json",
        ])
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    stdout_json(&output(single(&args(&one))));
    let out = output(mpirun(2, &args(&two)));
    assert_written_once(&two, 20, &out);
    assert_same_trajectory(&one, &two, &["loss", "rewards/accuracies", "logps/chosen"]);
    assert_weights_close(&one.join("final"), &two.join("final"));
    // The reference log-probs were computed across the ranks and cached by rank 0: the same.
    let cache = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("reference_logps.json")).unwrap())
            .unwrap()
    };
    assert_eq!(cache(&one)["train"], cache(&two)["train"]);
}

#[test]
fn sharded_generate_and_verify_equal_the_single_process_output() {
    let tmp = tempfile::tempdir().unwrap();
    // Seven prompts in batches of 4 rows, 3 samples each: batches dealt unevenly over the ranks.
    let prompts = tmp.path().join("prompts.jsonl");
    let gsm8k = std::fs::read_to_string(shared("gsm8k/train_first500.jsonl")).unwrap();
    std::fs::write(
        &prompts,
        gsm8k.lines().take(7).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let generate = |out: &Path| {
        strings(&[
            "generate",
            "--model",
            &model(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--n",
            "3",
            "--max-new-tokens",
            "10",
            "--batch-size",
            "4",
            "--seed",
            "5",
        ])
    };
    let one = tmp.path().join("one.jsonl");
    assert!(output(single(&generate(&one))).status.success());
    for np in [2, 3] {
        let many = tmp.path().join(format!("{np}.jsonl"));
        let out = output(mpirun(np, &generate(&many)));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(&many).unwrap(),
            std::fs::read_to_string(&one).unwrap(),
            "generate on {np} ranks"
        );
    }

    // CoT verify with adaptive K over a long-context random verifier (rounds of different sizes).
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qwen2-tiny/config.json")).unwrap(),
    )
    .unwrap();
    config["max_position_embeddings"] = 4096.into();
    let config_path = tmp.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let verifier = tmp.path().join("verifier");
    let init = output(single(&strings(&[
        "init-model",
        "--config",
        config_path.to_str().unwrap(),
        "--tokenizer",
        fixtures().join("tokenizer").to_str().unwrap(),
        "--out",
        verifier.to_str().unwrap(),
        "--seed",
        "1",
    ])));
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let verify = |out: &Path, summary: &Path| {
        strings(&[
            "verify",
            "--model",
            verifier.to_str().unwrap(),
            "--data",
            &shared("genrm/cot_correct_val_qidmod5_01.jsonl"),
            "--data",
            &shared("genrm/cot_incorrect_val_qidmod5_01.jsonl"),
            "--limit",
            "3",
            "--k-min",
            "2",
            "--k-step",
            "2",
            "--k-max",
            "6",
            "--var-threshold",
            "0.00001",
            "--max-new-tokens",
            "12",
            "--batch-size",
            "5",
            "--out",
            out.to_str().unwrap(),
            "--summary",
            summary.to_str().unwrap(),
        ])
    };
    let (one, one_summary) = (tmp.path().join("v1.jsonl"), tmp.path().join("s1.json"));
    let (two, two_summary) = (tmp.path().join("v2.jsonl"), tmp.path().join("s2.json"));
    assert!(output(single(&verify(&one, &one_summary))).status.success());
    let out = output(mpirun(2, &verify(&two, &two_summary)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&one).unwrap();
    assert_eq!(text.lines().count(), 6);
    assert_eq!(std::fs::read_to_string(&two).unwrap(), text, "verify rows");
    let summary = |p: &Path| -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("seconds");
        v
    };
    assert_eq!(summary(&one_summary), summary(&two_summary));
}

/// The pid of `rank` among mpirun's children (OpenMPI starts local ranks as its children).
fn rank_pid(mpirun_pid: u32, rank: usize) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: the comm may hold spaces, so split after its ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(mpirun_pid) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
        if environ
            .split(|&b| b == 0)
            .any(|var| var == wanted.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_ends_the_job_and_its_last_checkpoint_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    stdout_json(&output(single(&sft_args(&reference, 24))));

    // Two ranks, checkpoints every 4 steps; rank 1 is killed once the first one exists.
    let killed = tmp.path().join("killed");
    let mut args = sft_args(&killed, 400);
    args.extend(strings(&[
        "--checkpoint-frequency",
        "4",
        "--ckpt-to-keep",
        "2",
    ]));
    let log = tmp.path().join("killed.log");
    let mut job = mpirun(2, &args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !killed.join("checkpoints/step-4").exists() {
        if job.try_wait().unwrap().is_some() {
            let stderr = std::fs::read_to_string(&log).unwrap();
            panic!("the job ended before its first checkpoint:\n{stderr}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let victim = rank_pid(job.id(), 1).expect("rank 1 among mpirun's children");
    assert!(Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap()
        .success());
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "the job outlived its killed rank by a minute"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "a job that lost a rank exits non-zero");
    assert!(!killed.join("final").exists());

    // The newest complete checkpoint resumes, here on one rank: the cursor counts global
    // batches, so the trajectory continues as the uninterrupted run's.
    let latest = ferrotune::train::checkpoint::list_checkpoints(&killed.join("checkpoints"))
        .into_iter()
        .max()
        .unwrap();
    assert!(
        latest < 24,
        "killed at step {latest}, past the reference run"
    );
    let checkpoint = killed.join(format!("checkpoints/step-{latest}"));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2);
    let mut resume = sft_args(&killed, 24);
    resume.extend(strings(&[
        "--checkpoint-frequency",
        "4",
        "--ckpt-to-keep",
        "2",
        "--resume-from-checkpoint",
        checkpoint.to_str().unwrap(),
    ]));
    stdout_json(&output(single(&resume)));
    assert_same_trajectory(
        &reference,
        &killed,
        &["loss", "grad_norm", "token_accuracy"],
    );
    assert_weights_close(&reference.join("final"), &killed.join("final"));

    // A different global batch cannot continue the cursor: a clear error.
    let newest = killed.join("checkpoints/step-24");
    let mut other = sft_args(&tmp.path().join("other"), 28);
    let i = other.iter().position(|a| a == "--batch-size").unwrap();
    other[i + 1] = "4".into();
    other.extend(strings(&[
        "--resume-from-checkpoint",
        newest.to_str().unwrap(),
    ]));
    let out = output(single(&other));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--batch-size 8"), "{stderr}");
}

#[test]
fn a_rank_that_fails_ends_the_job_with_its_error() {
    // MPMD launch: rank 1 gets a data file that does not exist; rank 0 would wait for it in its
    // first collective, but the failing rank aborts the whole job.
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let good = sft_args(&out_dir, 20);
    let mut bad = good.clone();
    let i = bad.iter().position(|a| a == "--data").unwrap();
    bad[i + 1] = tmp
        .path()
        .join("missing.jsonl")
        .to_string_lossy()
        .to_string();
    let started = Instant::now();
    let mut c = mpirun(1, &good);
    c.arg(":").args(["-np", "1"]).arg(bin()).args(&bad);
    let out = output(c);
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[rank 1/2] error:") && stderr.contains("missing.jsonl"),
        "{stderr}"
    );
    assert!(!out_dir.join("final").exists());

    // Launcher variables without an MPI launcher (every process would be rank 0 of 1): an error.
    let out = Command::new(bin())
        .args(sft_args(&tmp.path().join("alone"), 1))
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WORLD_SIZE=2") && stderr.contains("MPI launcher"),
        "{stderr}"
    );
}
