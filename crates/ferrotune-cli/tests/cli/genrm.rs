//! GenRM training, verification with adaptive K, best-of-N and the quickstart pipeline, end to
//! end through the binary.

use std::path::Path;

use crate::{ferrotune, fixtures, stdout_json};

fn shared(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(file)
        .to_string_lossy()
        .to_string()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A random tiny model with a context long enough for the genrm-critiques rows.
fn long_context_model(dir: &Path) -> String {
    let mut config = read_json(&fixtures().join("qwen2-tiny/config.json"));
    config["max_position_embeddings"] = 4096.into();
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = dir.join("model");
    let r = ferrotune(&[
        "init-model",
        "--config",
        config_path.to_str().unwrap(),
        "--tokenizer",
        fixtures().join("tokenizer").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "1",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    out.to_string_lossy().to_string()
}

#[test]
fn verify_runs_on_the_genrm_critiques_files_and_reports_auc() {
    let tmp = tempfile::tempdir().unwrap();
    let model = long_context_model(tmp.path());
    // Direct: every file of the release, correct and incorrect together so the AUC exists.
    for (correct, incorrect) in [
        (
            "genrm/cot_correct_val_qidmod5_01.jsonl",
            "genrm/cot_incorrect_val_qidmod5_01.jsonl",
        ),
        (
            "genrm/rm_correct_batch00_first100.jsonl",
            "genrm/rm_incorrect_batch00_first100.jsonl",
        ),
        (
            "genrm/data_collection_critique_gen_correct_r0s0_300.jsonl",
            "genrm/data_collection_critique_gen_incorrect_r0s0_300.jsonl",
        ),
    ] {
        let out = tmp.path().join("direct.jsonl");
        let summary = tmp.path().join("summary.json");
        let r = ferrotune(&[
            "verify",
            "--model",
            &model,
            "--data",
            &shared(correct),
            "--data",
            &shared(incorrect),
            "--mode",
            "direct",
            "--limit",
            "6",
            "--out",
            out.to_str().unwrap(),
            "--summary",
            summary.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let rows = jsonl(&out);
        assert_eq!(rows.len(), 12);
        assert_eq!(
            rows.iter().filter(|r| r["label"] == 1).count(),
            6,
            "{correct}: labels read from the rows"
        );
        let s = read_json(&summary);
        let auc = s["auc"].as_f64().expect("auc with both labels");
        assert!((0.0..=1.0).contains(&auc));
        assert_eq!(s["mean_k"], 1.0);
    }
    // CoT with adaptive K: k within bounds, one p(Yes) per rationale, population variance.
    let out = tmp.path().join("cot.jsonl");
    let r = ferrotune(&[
        "verify",
        "--model",
        &model,
        "--data",
        &shared("genrm/cot_correct_val_qidmod5_01.jsonl"),
        "--data",
        &shared("genrm/cot_incorrect_val_qidmod5_01.jsonl"),
        "--mode",
        "cot",
        "--limit",
        "2",
        "--k-min",
        "2",
        "--k-step",
        "2",
        "--k-max",
        "4",
        "--max-new-tokens",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for row in jsonl(&out) {
        let k = row["k"].as_u64().unwrap() as usize;
        let p: Vec<f64> = row["p_yes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(k == 2 || k == 4, "k = {k}");
        assert_eq!(p.len(), k);
        assert!(p.iter().all(|x| (0.0..=1.0).contains(x)));
        let mean = p.iter().sum::<f64>() / k as f64;
        assert!((row["score"].as_f64().unwrap() - mean).abs() < 1e-9);
        let var = p.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / k as f64;
        assert!((row["variance"].as_f64().unwrap() - var).abs() < 1e-9);
        // A random model is unsure in no particular way, but it is consistent: var < 0.05 stops at k_min.
        assert_eq!(k == 2, var < 0.05);
    }
    // Bad input: rows without a label still verify (no label key); too-long rows are named.
    let unlabeled = tmp.path().join("unlabeled.jsonl");
    std::fs::write(
        &unlabeled,
        "{\"question\": \"1+1=?\", \"solution\": \"1+1=2. The answer is 2.\"}\n",
    )
    .unwrap();
    let r = ferrotune(&[
        "verify",
        "--model",
        &model,
        "--data",
        unlabeled.to_str().unwrap(),
        "--mode",
        "direct",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(jsonl(&out)[0].get("label").is_none());
    let short = fixtures().join("qwen2-tiny");
    let r = ferrotune(&[
        "verify",
        "--model",
        short.to_str().unwrap(),
        "--data",
        &shared("genrm/rm_correct_batch00_first100.jsonl"),
        "--mode",
        "direct",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("context is 256"));
}

#[test]
fn quickstart_smoke_runs_every_stage_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    for run in ["a", "b"] {
        let dir = tmp.path().join(run);
        let report = stdout_json(&ferrotune(&[
            "quickstart",
            "--smoke",
            "--output-dir",
            dir.to_str().unwrap(),
            "--json",
        ]));
        for key in [
            "pretrain_loss",
            "sft_accuracy",
            "dpo_accuracy",
            "verifier_auc",
            "bon_fixed_k32_accuracy",
            "bon_adaptive_accuracy",
            "adaptive_mean_k",
            "majority_vote_accuracy",
            "dpo_vs_sft_win_rate",
            "seconds_per_stage",
            "dpo_preference_accuracy",
            "rm_pairwise_accuracy",
            "genrm_policy_accuracy",
            "win_rate_vs_base",
            "tokens_sampled",
            "bon_weighted_vote_accuracy",
            "pass_at_n",
        ] {
            assert!(report.get(key).is_some(), "report.json lacks {key}");
        }
        for stage in ["pretrain", "sft", "dpo", "genrm", "rm"] {
            assert!(
                dir.join("runs")
                    .join(stage)
                    .join("final/config.json")
                    .exists(),
                "{stage} model dir"
            );
            assert!(report["seconds_per_stage"].get(stage).is_some());
        }
        for png in ["loss_curves.png", "bon_accuracy_vs_compute.png"] {
            let bytes = std::fs::read(dir.join(png)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png} is a PNG");
            assert!(bytes.len() > 1000);
        }
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.contains("ferrotune sft --config configs/quickstart/sft.toml"));
        let mut numbers = report.clone();
        let obj = numbers.as_object_mut().unwrap();
        obj.remove("seconds_per_stage");
        obj.remove("models");
        obj.remove("commands");
        reports.push(numbers);
    }
    assert_eq!(
        reports[0], reports[1],
        "two runs with one seed give the same numbers"
    );
}

#[test]
fn genrm_training_and_best_of_n_on_a_small_world() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    let r = ferrotune(&[
        "data",
        "synth",
        "--out",
        world.to_str().unwrap(),
        "--seed",
        "3",
        "--n",
        "64",
        "--n-test",
        "4",
        "--difficulty",
        "easy",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let model = fixtures().join("qwen2-tiny");
    let out = tmp.path().join("genrm");
    let summary = stdout_json(&ferrotune(&[
        "genrm",
        "--model",
        model.to_str().unwrap(),
        "--data",
        world.join("genrm_verify.jsonl").to_str().unwrap(),
        "--correct-data",
        world.join("genrm_correct.jsonl").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "200",
        "--lambda",
        "0.1",
        "--num-sanity-val-steps",
        "0",
        "--json",
    ]));
    for key in [
        "loss",
        "loss_verify",
        "loss_correct",
        "verifier_score_correct",
        "verifier_score_incorrect",
        "verifier_auc",
    ] {
        assert!(
            summary["eval"].get(key).is_some(),
            "genrm eval lacks {key}: {summary}"
        );
    }
    let l = &summary["eval"];
    let mixed = l["loss_verify"].as_f64().unwrap() + 0.1 * l["loss_correct"].as_f64().unwrap();
    assert!(
        (l["loss"].as_f64().unwrap() - mixed).abs() < 1e-4,
        "L = L_verify + λ·L_correct: {l}"
    );
    let report = stdout_json(&ferrotune(&[
        "best-of-n",
        "--policy",
        model.to_str().unwrap(),
        "--verifier",
        out.join("final").to_str().unwrap(),
        "--data",
        world.join("test.jsonl").to_str().unwrap(),
        "--n",
        "3",
        "--k-min",
        "2",
        "--k-step",
        "2",
        "--k-max",
        "4",
        "--format",
        "terse",
        "--max-new-tokens",
        "12",
        "--verifier-max-new-tokens",
        "12",
        "--json",
    ]));
    for key in [
        "n",
        "first_sample_accuracy",
        "majority_vote_accuracy",
        "fixed",
        "adaptive",
        "policy_tokens",
    ] {
        assert!(report.get(key).is_some(), "best-of-n lacks {key}");
    }
    assert_eq!(report["fixed"]["k"], 4.0);
    let mean_k = report["adaptive"]["k"].as_f64().unwrap();
    assert!((2.0..=4.0).contains(&mean_k));
    assert!(
        report["adaptive"]["verifier_tokens"].as_u64().unwrap()
            <= report["fixed"]["verifier_tokens"].as_u64().unwrap()
    );
}

#[test]
fn prepare_genrm_turns_the_release_layout_into_data_genrm_trains_on() {
    let tmp = tempfile::tempdir().unwrap();
    // The in-repo sample of the release (the first lines of ../shared/data/genrm's files).
    let release = fixtures().join("data/genrm");
    let prepared = tmp.path().join("prepared");
    let manifest = stdout_json(&ferrotune(&[
        "data",
        "prepare-genrm",
        "--path",
        release.to_str().unwrap(),
        "--out",
        prepared.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(manifest["format"], "ferrotune-genrm-prepared");
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 6, "{manifest}");
    assert!(files.iter().all(|f| f["rows"] == 4));
    let verify = jsonl(&prepared.join("verify.jsonl"));
    let correct = jsonl(&prepared.join("correct.jsonl"));
    assert_eq!(
        verify.len() as u64,
        manifest["verify"]["rows"].as_u64().unwrap()
    );
    assert_eq!(
        correct.len() as u64,
        manifest["correct"]["rows"].as_u64().unwrap()
    );
    let cot = verify.iter().filter(|r| r["mode"] == "cot").count() as u64;
    assert_eq!(cot, manifest["verify"]["cot"].as_u64().unwrap());
    assert!(cot > 0 && cot < verify.len() as u64);
    let yes = verify.iter().filter(|r| r["label"] == 1).count() as u64;
    assert_eq!(yes, manifest["verify"]["correct"].as_u64().unwrap());
    assert!(verify.iter().all(|r| {
        let t = r["targets"].as_str().unwrap();
        t.ends_with(if r["label"] == 1 { " Yes" } else { " No" })
    }));
    assert!(correct.iter().all(|r| r["inputs"]
        .as_str()
        .unwrap()
        .ends_with("A: Let's think step by step.\n")));

    // The folder is `genrm --data`: D_verify from verify.jsonl, D_correct from correct.jsonl.
    let model = long_context_model(tmp.path());
    let run = tmp.path().join("run");
    let summary = stdout_json(&ferrotune(&[
        "genrm",
        "--model",
        &model,
        "--data",
        prepared.to_str().unwrap(),
        "--output-dir",
        run.to_str().unwrap(),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "768",
        "--truncation",
        "left",
        "--num-sanity-val-steps",
        "0",
        "--json",
    ]));
    assert_eq!(summary["steps"], 2);
    let eval = &summary["eval"];
    for key in ["loss_verify", "loss_correct"] {
        let v = eval[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key}: {summary}");
    }
    for key in [
        "verifier_score_correct",
        "verifier_score_incorrect",
        "verifier_auc",
    ] {
        assert!(eval.get(key).is_some(), "genrm eval lacks {key}: {summary}");
    }
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("prepared"), "{config}");

    // Bad input: the file, the line and the field; with --skip-bad-rows, counted.
    let bad_dir = tmp.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let good = std::fs::read_to_string(release.join("rm_correct_batch00_first100.jsonl")).unwrap();
    let mut text: String = good.lines().take(2).map(|l| format!("{l}\n")).collect();
    text.push_str(
        "{\"inputs\": \"Q: 1+1=?\\nA: 2\\nVerification: Is the answer correct (Yes/No)?\"}\n",
    );
    std::fs::write(bad_dir.join("rows.jsonl"), text).unwrap();
    let r = ferrotune(&[
        "data",
        "prepare-genrm",
        "--path",
        bad_dir.to_str().unwrap(),
        "--out",
        tmp.path().join("bad_out").to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("rows.jsonl:3: field `targets`: missing"),
        "{err}"
    );
    let m = stdout_json(&ferrotune(&[
        "data",
        "prepare-genrm",
        "--path",
        bad_dir.to_str().unwrap(),
        "--out",
        tmp.path().join("bad_out").to_str().unwrap(),
        "--skip-bad-rows",
        "--json",
    ]));
    assert_eq!(m["verify"]["rows"], 2);
    assert_eq!(m["skipped"]["reasons"]["bad row"], 1);
}
