//! The data module on the public samples in ../shared/data (see their READMEs), the committed
//! fixtures in tests/fixtures/data (scripts/fixtures/make_data_fixtures.py) and the
//! transformers-made masks in tests/fixtures/sft_masks.json (make_sft_mask_fixtures.py).

use std::path::{Path, PathBuf};

use ferrotune::data::{
    answers_match, extract_answer, inspect, load_dataset, pack_texts, pad_pairs, read_rows, select,
    tokenize_pairs, tokenize_sequences, DataRow, Encoder, Example, InspectOptions, LoadOptions,
    Message, Schema, Selection, TokenizeOptions, TokenizedSequence, Truncation,
};
use ferrotune::io::{ChatTemplate, Tokenizer};
use serde_json::Value;

use super::{fixtures, read_fixture_json};

fn shared_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn data_fixture(name: &str) -> PathBuf {
    fixtures().join("data").join(name)
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("tokenizer"), None).expect("fixture tokenizer")
}

fn load(path: &Path) -> ferrotune::data::Dataset {
    load_dataset(path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write_temp(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn messages(pairs: &[(&str, &str)]) -> Vec<Message> {
    pairs.iter().map(|(r, c)| Message::new(r, *c)).collect()
}

/// Runs of consecutive target tokens, decoded.
fn target_runs(tok: &Tokenizer, seq: &TokenizedSequence) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (&id, &t) in seq.input_ids.iter().zip(&seq.targets) {
        if t {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(tok.decode(&current, false).unwrap());
            current.clear();
        }
    }
    if !current.is_empty() {
        runs.push(tok.decode(&current, false).unwrap());
    }
    runs
}

#[test]
fn shared_data_files_load_with_their_schema_and_row_count() {
    let expected: &[(&str, Schema, usize)] = &[
        (
            "chat/llamafactory_dpo_en_demo_chat.jsonl",
            Schema::Chat,
            197,
        ),
        (
            "preference/ultrafeedback_binarized_h4schema.jsonl",
            Schema::Preference,
            200,
        ),
        ("gsm8k/train_first500.jsonl", Schema::Qa, 500),
        ("genrm/cot_correct_val_qidmod5_01.jsonl", Schema::Genrm, 49),
        (
            "genrm/cot_incorrect_val_qidmod5_01.jsonl",
            Schema::Genrm,
            58,
        ),
        (
            "genrm/rm_correct_batch00_first100.jsonl",
            Schema::Genrm,
            100,
        ),
        (
            "genrm/rm_incorrect_batch00_first100.jsonl",
            Schema::Genrm,
            100,
        ),
        (
            "genrm/data_collection_critique_gen_correct_r0s0_300.jsonl",
            Schema::Solution,
            300,
        ),
        (
            "genrm/data_collection_critique_gen_incorrect_r0s0_300.jsonl",
            Schema::Solution,
            300,
        ),
    ];
    // Every data file of the four folders is listed above (a new file must be added here).
    let mut on_disk = Vec::new();
    for folder in ["chat", "preference", "gsm8k", "genrm"] {
        for entry in std::fs::read_dir(shared_data().join(folder)).expect("../shared/data") {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            if name.ends_with(".jsonl") {
                on_disk.push(format!("{folder}/{name}"));
            }
        }
    }
    on_disk.sort();
    let mut listed: Vec<String> = expected.iter().map(|(f, _, _)| f.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);

    for (file, schema, rows) in expected {
        let data = load(&shared_data().join(file));
        assert_eq!(data.schema, *schema, "{file}");
        assert_eq!(data.len(), *rows, "{file}");
        assert_eq!(data.bad_rows.count, 0, "{file}");
        assert!(data.rows.iter().all(|r| r.example.schema() == *schema));
        assert_eq!(
            data.rows.last().unwrap().source.line,
            *rows,
            "{file}: lines numbered from 1"
        );
    }

    // The parsed values, spot-checked.
    let chat = load(&shared_data().join("chat/llamafactory_dpo_en_demo_chat.jsonl"));
    let with_system = chat
        .rows
        .iter()
        .filter(
            |r| matches!(&r.example, Example::Chat { messages } if messages[0].role == "system"),
        )
        .count();
    assert_eq!(
        with_system, 56,
        "chat README: 56 rows start with a system turn"
    );
    let preference = load(&shared_data().join("preference/ultrafeedback_binarized_h4schema.jsonl"));
    match &preference.rows[0].example {
        Example::Preference {
            prompt,
            chosen,
            rejected,
        } => {
            assert_eq!(
                prompt,
                &vec![Message::user("how to cook t-bone in the oven")]
            );
            assert_eq!(chosen.role, "assistant");
            assert!(chosen
                .content
                .starts_with("To cook a delicious T-bone steak"));
            assert_ne!(chosen, rejected);
        }
        other => panic!("{other:?}"),
    }
    let solutions =
        load(&shared_data().join("genrm/data_collection_critique_gen_incorrect_r0s0_300.jsonl"));
    assert!(solutions.rows.iter().all(|r| matches!(
        r.example,
        Example::Solution {
            label: Some(false),
            ..
        }
    )));
}

#[test]
fn answers_extract_from_gsm8k_and_genrm_critiques() {
    let gsm8k = load(&shared_data().join("gsm8k/train_first500.jsonl"));
    let answers: Vec<f64> = gsm8k
        .rows
        .iter()
        .map(|r| match &r.example {
            Example::Qa { answer, .. } => extract_answer(answer)
                .unwrap_or_else(|| panic!("{}: no answer in {answer:?}", r.source)),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(answers[..4], [72.0, 10.0, 5.0, 42.0]);

    // data_collection rows: the extracted answer of the solution against the gold `target` agrees
    // with `correctness` on every row that states an answer, except one whose stored
    // extracted_answer is garbled ("66.theansweris66") though the solution says 66 = target.
    for (file, disagreements) in [
        ("data_collection_critique_gen_correct_r0s0_300.jsonl", 0),
        ("data_collection_critique_gen_incorrect_r0s0_300.jsonl", 1),
    ] {
        let path = shared_data().join("genrm").join(file);
        let mut found = 0;
        let mut disagree = Vec::new();
        for row in read_rows(&path, None).unwrap() {
            let row = row.unwrap();
            let target: f64 = row.value["target"].as_str().unwrap().parse().unwrap();
            let correct = row.value["correctness"] == 1;
            let Some(answer) = extract_answer(row.value["model_output"].as_str().unwrap()) else {
                continue;
            };
            found += 1;
            if answers_match(answer, target) != correct {
                disagree.push(row.value["extracted_answer"].as_str().unwrap().to_string());
            }
        }
        assert!(found >= 295, "{file}: {found}");
        assert_eq!(disagree.len(), disagreements, "{file}: {disagree:?}");
        if disagreements == 1 {
            assert_eq!(disagree[0], "66.theansweris66");
        }
    }
}

#[test]
fn a_bad_row_stops_the_load_with_file_line_and_field_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let path = write_temp(
        dir.path(),
        "chat.jsonl",
        &[
            good,
            r#"{"messages": [{"role": "user", "content": "hi"}"#,
            r#"{"messages": [{"role": "user"}]}"#,
            r#"{"text": "no messages here"}"#,
            good,
        ],
    );
    let err = load_dataset(&path, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with(&format!("{}:2: ", path.display())), "{err}");
    assert!(err.contains("invalid JSON"), "{err}");

    let data = load_dataset(
        &path,
        &LoadOptions {
            skip_bad_rows: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data.rows[1].source.line, 5);
    assert_eq!(data.bad_rows.count, 3);
    let locations = &data.bad_rows.locations;
    assert!(locations[0].contains("chat.jsonl:2:"), "{locations:?}");
    assert!(
        locations[1].contains("chat.jsonl:3: field `messages[0].content`: missing"),
        "{locations:?}"
    );
    assert!(
        locations[2].contains("chat.jsonl:4: field `messages`: missing"),
        "{locations:?}"
    );

    // A missing field stops the load too, naming it.
    let path = write_temp(
        dir.path(),
        "qa.jsonl",
        &[
            r#"{"question": "q", "answer": "a"}"#,
            r#"{"question": "q2"}"#,
        ],
    );
    let err = load_dataset(&path, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("qa.jsonl:2: field `answer`: missing"), "{err}");

    // A forced schema applies to every row.
    let forced = load_dataset(
        &path,
        &LoadOptions {
            schema: Some(Schema::Prompts),
            ..Default::default()
        },
    );
    assert!(forced
        .unwrap_err()
        .to_string()
        .contains("qa.jsonl:1: field `prompt`"));
}

#[test]
fn sft_targets_are_each_assistant_content_and_its_end_of_turn() {
    let tok = tokenizer();
    let encoder = Encoder::new(&tok).unwrap();
    let conversation = messages(&[
        ("system", "You are terse."),
        ("user", "What is 2+2?"),
        ("assistant", "4."),
        ("user", "And times 3?"),
        ("assistant", "It is 12.\nDone"),
    ]);
    let seq = encoder.chat(&conversation).unwrap();
    assert_eq!(seq.input_ids.len(), seq.targets.len());
    assert_eq!(
        target_runs(&tok, &seq),
        ["4.<|im_end|>", "It is 12.\nDone<|im_end|>"]
    );
    // The token after each <|im_end|> target is "\n", not a target; the full render round-trips.
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let newline = tok.encode("\n", false).unwrap();
    for (k, &id) in seq.input_ids.iter().enumerate() {
        if id == im_end && seq.targets[k] {
            assert_eq!(seq.input_ids[k + 1..k + 2], newline[..]);
            assert!(!seq.targets[k + 1]);
        }
    }
    let text = encoder.render(&conversation, false).unwrap();
    assert_eq!(tok.decode(&seq.input_ids, false).unwrap(), text);
    assert_eq!(
        seq.input_ids,
        tok.encode(&text, false).unwrap(),
        "the full render, tokenized once"
    );

    // Without a system turn the template adds its default one; it is not a target either.
    let seq = encoder
        .chat(&messages(&[("user", "hi"), ("assistant", "hello")]))
        .unwrap();
    assert_eq!(target_runs(&tok, &seq), ["hello<|im_end|>"]);
    assert!(tok
        .decode(&seq.input_ids, false)
        .unwrap()
        .contains("You are a helpful assistant."));

    // A conversation without an assistant turn has no targets; tokenize_sequences drops and counts it.
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(
        dir.path(),
        "c.jsonl",
        &[
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
        ],
    );
    let rows = load(&path).rows;
    let (out, stats) = tokenize_sequences(&encoder, &rows, &TokenizeOptions::default()).unwrap();
    assert_eq!((out.len(), stats.no_target_rows), (1, 1));
}

#[test]
fn sft_targets_on_every_shared_chat_row() {
    let tok = tokenizer();
    let encoder = Encoder::new(&tok).unwrap();
    let chat = load(&shared_data().join("chat/llamafactory_dpo_en_demo_chat.jsonl"));
    let (mut multi_turn, mut with_system) = (0, 0);
    for row in &chat.rows {
        let Example::Chat { messages } = &row.example else {
            unreachable!()
        };
        let seq = encoder.chat(messages).unwrap();
        let expected: Vec<String> = messages
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| format!("{}<|im_end|>", m.content))
            .collect();
        // Each run of targets is exactly one assistant turn: its content and <|im_end|>.
        assert_eq!(target_runs(&tok, &seq), expected, "{}", row.source);
        multi_turn += usize::from(expected.len() > 1);
        with_system += usize::from(messages[0].role == "system");
    }
    assert_eq!((multi_turn, with_system), (62, 56), "chat README's counts");
}

#[test]
fn sft_masks_match_the_transformers_fixture() {
    let path = fixtures().join("sft_masks.json");
    if !path.exists() {
        eprintln!("tests/fixtures/sft_masks.json not present; skipped");
        return;
    }
    let fixture = read_fixture_json("sft_masks.json");
    let tok = Tokenizer::from_dir(
        &fixtures().join(
            fixture["tokenizer"]
                .as_str()
                .unwrap()
                .trim_start_matches("tests/fixtures/"),
        ),
        None,
    )
    .unwrap();
    let encoder = Encoder::new(&tok).unwrap();
    let cases = fixture["chat"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        assert_eq!(
            encoder.render(&messages, false).unwrap(),
            case["text"].as_str().unwrap(),
            "{name}"
        );
        let seq = encoder.chat(&messages).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let targets: Vec<bool> = serde_json::from_value(case["targets"].clone()).unwrap();
        assert_eq!(seq.input_ids, ids, "{name}");
        assert_eq!(seq.targets, targets, "{name}");
    }

    let cases = fixture["preference"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        // The row goes through the schema parser, which must find the same prompt messages.
        let raw = ferrotune::data::RawRow {
            value: case["row"].clone(),
            source: ferrotune::data::Source {
                path: Path::new("sft_masks.json").into(),
                line: 1,
            },
        };
        let row = ferrotune::data::parse_row(&raw, Schema::Preference).unwrap();
        let Example::Preference {
            prompt,
            chosen,
            rejected,
        } = &row.example
        else {
            unreachable!()
        };
        let expected_prompt: Vec<Message> =
            serde_json::from_value(case["prompt_messages"].clone()).unwrap();
        assert_eq!(prompt, &expected_prompt, "{name}");
        let pair = encoder.pair(prompt, chosen, rejected).unwrap();
        let prompt_ids: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(pair.prompt_len, prompt_ids.len(), "{name}");
        for (side, seq) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
            let ids: Vec<u32> =
                serde_json::from_value(case[format!("{side}_ids")].clone()).unwrap();
            let targets: Vec<bool> =
                serde_json::from_value(case[format!("{side}_targets")].clone()).unwrap();
            assert_eq!(
                seq.input_ids[..pair.prompt_len],
                prompt_ids[..],
                "{name} {side}"
            );
            assert_eq!(seq.input_ids[pair.prompt_len..], ids[..], "{name} {side}");
            assert!(
                seq.targets[..pair.prompt_len].iter().all(|t| !t),
                "{name} {side}"
            );
            assert_eq!(seq.targets[pair.prompt_len..], targets[..], "{name} {side}");
        }
    }
}

#[test]
fn preference_pairs_share_the_prompt_tokens_and_do_not_merge_the_seam() {
    let mut tok = tokenizer();
    let encoder = Encoder::new(&tok).unwrap();
    let data = load(&shared_data().join("preference/ultrafeedback_binarized_h4schema.jsonl"));
    let (pairs, stats) =
        tokenize_pairs(&encoder, &data.rows[..30], &TokenizeOptions::default()).unwrap();
    assert_eq!((pairs.len(), stats.no_target_rows), (30, 0));
    let system = tok.encode("<|im_start|>system", false).unwrap();
    for (pair, row) in pairs.iter().zip(&data.rows) {
        let Example::Preference {
            prompt,
            chosen,
            rejected,
        } = &row.example
        else {
            unreachable!()
        };
        let prompt_text = encoder.render(prompt, true).unwrap();
        let prompt_ids = tok.encode(&prompt_text, false).unwrap();
        assert_eq!(pair.prompt_len, prompt_ids.len());
        assert_eq!(pair.chosen.input_ids[..pair.prompt_len], prompt_ids[..]);
        assert_eq!(pair.rejected.input_ids[..pair.prompt_len], prompt_ids[..]);
        let runs = target_runs(&tok, &pair.chosen);
        assert_eq!(runs, [format!("{}<|im_end|>", chosen.content)]);
        assert_eq!(
            target_runs(&tok, &pair.rejected),
            [format!("{}<|im_end|>", rejected.content)]
        );
        // One system prompt, not two.
        let count = pair
            .chosen
            .input_ids
            .windows(system.len())
            .filter(|w| **w == system[..])
            .count();
        assert_eq!(count, 1);
    }

    // A template whose generation prompt ends in a space: tokenizing prompt + answer jointly
    // would merge the space into the answer's first word; the pair keeps them apart.
    drop(encoder);
    tok.chat_template = Some(
        ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}",
        )
        .unwrap(),
    );
    let encoder = Encoder::new(&tok).unwrap();
    let prompt = vec![Message::user("Say hi")];
    let pair = encoder
        .pair(
            &prompt,
            &Message::assistant("hi there"),
            &Message::assistant("bye"),
        )
        .unwrap();
    let prompt_text = "User: Say hi\nAssistant: ";
    let mut expected = tok.encode(prompt_text, false).unwrap();
    expected.extend(tok.encode("hi there<|im_end|>\n", false).unwrap());
    assert_eq!(pair.chosen.input_ids, expected);
    let joint = tok
        .encode(&format!("{prompt_text}hi there<|im_end|>\n"), false)
        .unwrap();
    assert_ne!(
        joint, expected,
        "the joint tokenization merges across the seam"
    );
    assert_eq!(target_runs(&tok, &pair.chosen), ["hi there<|im_end|>"]);
    assert_eq!(
        pair.chosen.input_ids[..pair.prompt_len],
        pair.rejected.input_ids[..pair.prompt_len]
    );
}

#[test]
fn a_template_that_rewrites_earlier_turns_is_a_clear_error() {
    let mut tok = tokenizer();
    let source = std::fs::read_to_string(fixtures().join("templates/qwen3.jinja")).unwrap();
    tok.chat_template = Some(ChatTemplate::new(source).unwrap());
    let encoder = Encoder::new(&tok).unwrap();
    // One turn works (the think block belongs to the last assistant turn in both renders).
    let one = encoder
        .chat(&messages(&[("user", "hi"), ("assistant", "hello")]))
        .unwrap();
    assert_eq!(
        target_runs(&tok, &one),
        ["<think>\n\n</think>\n\nhello<|im_end|>"]
    );
    let err = encoder
        .chat(&messages(&[
            ("user", "a"),
            ("assistant", "b"),
            ("user", "c"),
            ("assistant", "d"),
        ]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("message 1") && err.contains("prefix"), "{err}");
}

#[test]
fn parquet_fixtures_load_equal_to_the_same_rows_in_jsonl() {
    for name in ["chat", "preference"] {
        let parquet: Vec<_> = read_rows(&data_fixture(&format!("{name}.parquet")), None)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let jsonl: Vec<_> = read_rows(&data_fixture(&format!("{name}.jsonl")), None)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(parquet.len(), jsonl.len(), "{name}");
        for (p, j) in parquet.iter().zip(&jsonl) {
            assert_eq!(p.value, j.value, "{name} row {}", p.source.line);
            assert_eq!(p.source.line, j.source.line);
        }
        let p = load(&data_fixture(&format!("{name}.parquet")));
        let j = load(&data_fixture(&format!("{name}.jsonl")));
        assert_eq!(p.schema, j.schema);
        let examples = |d: &ferrotune::data::Dataset| {
            d.rows.iter().map(|r| r.example.clone()).collect::<Vec<_>>()
        };
        assert_eq!(examples(&p), examples(&j), "{name}");
    }
    let chat = load(&data_fixture("chat.parquet"));
    assert_eq!((chat.schema, chat.len()), (Schema::Chat, 7));
    // Rows were compared across row-group boundaries: the fixture has groups of 3, 3 and 1.
    use parquet::file::reader::FileReader;
    let file = std::fs::File::open(data_fixture("chat.parquet")).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    assert_eq!(reader.metadata().num_row_groups(), 3);
    let preference = load(&data_fixture("preference.parquet"));
    assert_eq!(
        (preference.schema, preference.len()),
        (Schema::Preference, 4)
    );
    assert!(matches!(
        read_rows(&data_fixture("preference.parquet"), None)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .value["score_chosen"],
        Value::Number(_)
    ));
}

#[test]
fn a_snapshot_folder_reads_its_train_split_by_default_and_others_by_name() {
    let snapshot = data_fixture("snapshot");
    let train = load(&snapshot);
    assert_eq!(train.files.len(), 1);
    assert!(train.files[0].ends_with("data/train-00000-of-00001.parquet"));
    assert_eq!((train.schema, train.len()), (Schema::Qa, 8));
    let train_jsonl = load(&data_fixture("gsm8k_train.jsonl"));
    let examples =
        |d: &ferrotune::data::Dataset| d.rows.iter().map(|r| r.example.clone()).collect::<Vec<_>>();
    assert_eq!(examples(&train), examples(&train_jsonl));

    // The test split is zstd-compressed.
    let test = load_dataset(
        &snapshot,
        &LoadOptions {
            split: Some("test".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        examples(&test),
        examples(&load(&data_fixture("gsm8k_test.jsonl")))
    );
    let missing = load_dataset(
        &snapshot,
        &LoadOptions {
            split: Some("validation".into()),
            ..Default::default()
        },
    );
    assert!(missing
        .unwrap_err()
        .to_string()
        .contains("no files of split `validation`"));
}

#[test]
fn selection_on_real_rows_is_deterministic_and_counts_are_exact() {
    let rows = load(&shared_data().join("gsm8k/train_first500.jsonl")).rows;
    let selection = Selection {
        train_percentile: Some(10.0),
        test_percentile: Some(20.0),
        dataset_random_sample: true,
        seed: 1234,
        ..Default::default()
    };
    let (train, eval) = select(rows.clone(), None, &selection).unwrap();
    // 500 rows: 25 held out (5 %), 475 train; 10 % of 475 = 47, 20 % of 25 = 5.
    assert_eq!((train.len(), eval.len()), (47, 5));
    let lines = |rows: &[DataRow]| rows.iter().map(|r| r.source.line).collect::<Vec<_>>();
    let (train2, eval2) = select(rows.clone(), None, &selection).unwrap();
    assert_eq!(
        (lines(&train), lines(&eval)),
        (lines(&train2), lines(&eval2))
    );
    assert!(
        lines(&train).iter().all(|l| !lines(&eval).contains(l)),
        "no eval row trains"
    );
    let (train3, _) = select(
        rows.clone(),
        None,
        &Selection {
            seed: 1235,
            ..selection.clone()
        },
    )
    .unwrap();
    assert_ne!(lines(&train), lines(&train3));

    let sanity = Selection {
        sanity_train: true,
        train_dataset_length: Some(16),
        ..Default::default()
    };
    let (train, eval) = select(rows, None, &sanity).unwrap();
    assert_eq!(lines(&train), (1..=16).collect::<Vec<_>>());
    assert_eq!(lines(&eval), lines(&train));
}

#[test]
fn truncation_policies_on_tokenized_rows() {
    let tok = tokenizer();
    let encoder = Encoder::new(&tok).unwrap();
    let rows = load(&shared_data().join("gsm8k/train_first500.jsonl")).rows[..40].to_vec();
    let full: Vec<TokenizedSequence> = rows
        .iter()
        .map(|r| encoder.sequence(&r.example).unwrap())
        .collect();
    let mut lengths: Vec<usize> = full.iter().map(TokenizedSequence::len).collect();
    lengths.sort();
    let max_length = lengths[lengths.len() / 2];
    let long = full.iter().filter(|s| s.len() > max_length).count();
    assert!(
        long > 0 && long < full.len(),
        "the cut falls inside the length range: {long}"
    );
    let options = |truncation| TokenizeOptions {
        max_length: Some(max_length),
        truncation,
        skip_bad_rows: false,
    };

    let (right, stats) = tokenize_sequences(&encoder, &rows, &options(Truncation::Right)).unwrap();
    assert_eq!((right.len(), stats.truncated, stats.dropped), (40, long, 0));
    for (cut, whole) in right.iter().zip(&full) {
        assert!(cut.len() <= max_length);
        assert_eq!(
            cut.input_ids[..],
            whole.input_ids[..cut.len()],
            "right keeps the start"
        );
    }

    let (left, stats) = tokenize_sequences(&encoder, &rows, &options(Truncation::Left)).unwrap();
    assert_eq!((left.len(), stats.truncated), (40, long));
    for (cut, whole) in left.iter().zip(&full) {
        assert_eq!(
            cut.input_ids[..],
            whole.input_ids[whole.len() - cut.len()..],
            "left keeps the end"
        );
        assert!(!cut.targets[0]);
    }

    let (kept, stats) = tokenize_sequences(&encoder, &rows, &options(Truncation::Drop)).unwrap();
    assert_eq!(
        (kept.len(), stats.dropped, stats.truncated),
        (40 - long, long, 0)
    );
    assert!(kept.iter().all(|s| s.len() <= max_length));

    // Pairs: the prompt is cut from the left, completions from the right; both sides agree.
    let prefs = load(&shared_data().join("preference/ultrafeedback_binarized_h4schema.jsonl")).rows
        [..20]
        .to_vec();
    let (untruncated, _) = tokenize_pairs(&encoder, &prefs, &TokenizeOptions::default()).unwrap();
    let (pairs, stats) = tokenize_pairs(&encoder, &prefs, &options(Truncation::Right)).unwrap();
    assert_eq!(
        stats.truncated,
        untruncated
            .iter()
            .filter(|p| p.max_len() > max_length)
            .count()
    );
    assert!(stats.truncated > 0);
    for (cut, whole) in pairs.iter().zip(&untruncated) {
        assert!(cut.max_len() <= max_length);
        assert_eq!(
            cut.chosen.input_ids[..cut.prompt_len],
            cut.rejected.input_ids[..cut.prompt_len]
        );
        let dropped = whole.prompt_len - cut.prompt_len;
        assert_eq!(
            cut.chosen.input_ids[..],
            whole.chosen.input_ids[dropped..dropped + cut.chosen.len()]
        );
    }
    let (kept, stats) = tokenize_pairs(&encoder, &prefs, &options(Truncation::Drop)).unwrap();
    assert_eq!(kept.len() + stats.dropped, 20);
}

#[test]
fn genrm_text_and_batches() {
    let tok = tokenizer();
    let encoder = Encoder::new(&tok).unwrap();
    let rows = load(&shared_data().join("genrm/rm_correct_batch00_first100.jsonl")).rows;
    let (seqs, _) = tokenize_sequences(&encoder, &rows[..5], &TokenizeOptions::default()).unwrap();
    for (seq, row) in seqs.iter().zip(&rows) {
        let Example::Genrm { inputs, targets } = &row.example else {
            unreachable!()
        };
        assert_eq!(target_runs(&tok, seq), [format!("{targets}<|im_end|>")]);
        let input_ids = tok.encode(inputs, false).unwrap();
        assert_eq!(seq.input_ids[..input_ids.len()], input_ids[..]);
    }

    // Text rows: packed into sequences of exactly max_length, eos between documents.
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(
        dir.path(),
        "t.jsonl",
        &[
            r#"{"text": "The cat sat on the mat."}"#,
            r#"{"text": "A dog ran in the park, then it slept."}"#,
            r#"{"text": "Birds sing."}"#,
        ],
    );
    let texts = load(&path).rows;
    let (packed, stats) = pack_texts(&encoder, &texts, 8).unwrap();
    assert_eq!(stats.documents, 3);
    assert_eq!(stats.sequences, stats.tokens / 8);
    assert_eq!(stats.dropped_tail_tokens, stats.tokens % 8);
    assert!(packed
        .iter()
        .all(|s| s.len() == 8 && !s.targets[0] && s.targets[1..].iter().all(|&t| t)));
    let eos = tok.eos_token_id.unwrap();
    let all: Vec<u32> = packed.iter().flat_map(|s| s.input_ids.clone()).collect();
    assert!(all.iter().filter(|&&id| id == eos).count() >= 2);

    // Pairs batch as chosen rows then rejected rows, right-padded with the pad id.
    let prefs = load(&data_fixture("preference.jsonl")).rows;
    let (pairs, _) = tokenize_pairs(&encoder, &prefs, &TokenizeOptions::default()).unwrap();
    let pad = ferrotune::data::pad_id(&tok).unwrap();
    assert_eq!(Some(pad), tok.token_to_id("<|endoftext|>"));
    let batch = pad_pairs(&pairs[..2], pad);
    assert_eq!(batch.len(), 4);
    assert_eq!(
        batch.lengths,
        [
            pairs[0].chosen.len(),
            pairs[1].chosen.len(),
            pairs[0].rejected.len(),
            pairs[1].rejected.len()
        ]
    );
    let width = batch.width();
    for (row, &len) in batch.input_ids.iter().zip(&batch.lengths) {
        assert_eq!(row.len(), width);
        assert!(row[len..].iter().all(|&id| id == pad));
    }
}

#[test]
fn inspect_reports_rows_lengths_and_bad_rows() {
    let tok = tokenizer();
    let report = inspect(
        &shared_data().join("chat/llamafactory_dpo_en_demo_chat.jsonl"),
        &InspectOptions {
            tokenizer: Some(&tok),
            max_length: Some(256),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        (report.schema, report.rows, report.bad_rows),
        (Schema::Chat, 197, 0)
    );
    let tokens = report.tokens.as_ref().unwrap();
    assert!(tokens.min <= tokens.p50 && tokens.p50 <= tokens.p95 && tokens.p95 <= tokens.max);
    let encoder = Encoder::new(&tok).unwrap();
    let rows = load(&shared_data().join("chat/llamafactory_dpo_en_demo_chat.jsonl")).rows;
    let lengths: Vec<usize> = rows
        .iter()
        .map(|r| encoder.sequence(&r.example).unwrap().len())
        .collect();
    assert_eq!(tokens.max, *lengths.iter().max().unwrap());
    assert_eq!(
        report.truncated,
        Some(lengths.iter().filter(|&&l| l > 256).count())
    );
    assert_eq!(report.no_target_rows, Some(0));
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "schema",
        "rows",
        "bad_rows",
        "bad_row_locations",
        "files",
        "tokens",
        "truncated",
        "no_target_rows",
    ] {
        assert!(json.get(key).is_some(), "{key}");
    }
    assert_eq!(json["schema"], "chat");

    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(
        dir.path(),
        "q.jsonl",
        &[
            r#"{"question": "q", "answer": "a"}"#,
            "{oops",
            r#"{"question": "q"}"#,
        ],
    );
    let options = InspectOptions {
        load: LoadOptions {
            skip_bad_rows: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let report = inspect(&path, &options).unwrap();
    assert_eq!((report.rows, report.bad_rows), (1, 2));
    assert!(report.bad_row_locations[1].contains("q.jsonl:3: field `answer`"));
    assert!(report.tokens.is_none());
    assert!(inspect(&path, &InspectOptions::default())
        .unwrap_err()
        .to_string()
        .contains("q.jsonl:2:"));
}

#[test]
fn targets_survive_a_post_processor_that_trims_offsets() {
    // GPT-2-style tokenizer.json files carry a ByteLevel post-processor with trim_offsets, which
    // empties the offsets of whitespace tokens; masks must not depend on it.
    let dir = tempfile::tempdir().unwrap();
    let mut json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer/tokenizer.json")).unwrap(),
    )
    .unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::copy(
        fixtures().join("tokenizer/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path(), None).unwrap();
    let offsets = tok
        .inner()
        .encode("a    b", false)
        .unwrap()
        .get_offsets()
        .to_vec();
    assert!(
        offsets.iter().any(|(s, e)| s == e),
        "this post-processor empties some offsets: {offsets:?}"
    );
    let encoder = Encoder::new(&tok).unwrap();
    let content = "x    y\n\n   z  ";
    let seq = encoder
        .chat(&messages(&[("user", "hi"), ("assistant", content)]))
        .unwrap();
    assert_eq!(target_runs(&tok, &seq), [format!("{content}<|im_end|>")]);
}

#[test]
fn unreadable_parquet_files_are_clear_errors() {
    let err = load_dataset(&data_fixture("gzip.parquet"), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gzip.parquet") && err.contains("snappy, zstd"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.parquet");
    std::fs::write(&path, b"PAR1 this is not a parquet file PAR1").unwrap();
    let err = load_dataset(
        &path,
        &LoadOptions {
            skip_bad_rows: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("broken.parquet") && err.contains("parquet"),
        "{err}"
    );
}
