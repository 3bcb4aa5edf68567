//! From a resolved config to tokenized train/eval examples: load the dataset(s), select rows
//! (percentiles, caps, seeded sampling, held-out split, sanity-train), tokenize through the
//! model's chat template with the configured truncation.

use crate::data::{
    load_dataset, pack_texts, pad_id, select, tokenize_pairs, tokenize_sequences, DataRow, Encoder,
    LoadOptions, Schema, Selection, TokenizeOptions, Truncation,
};
use crate::error::Result;
use crate::io::model_dir::load_config;
use crate::io::Tokenizer;
use crate::train::config::{Objective, TrainConfig};
use crate::train::trainer::{Examples, TrainInputs};

fn selection(config: &TrainConfig) -> Selection {
    let percent = |p: f64| (p < 100.0).then_some(p);
    Selection {
        train_percentile: percent(config.train_percentile),
        test_percentile: percent(config.test_percentile),
        train_dataset_length: config.train_dataset_length,
        test_dataset_length: config.test_dataset_length,
        dataset_random_sample: config.dataset_random_sample,
        sanity_train: config.sanity_train,
        seed: config.seed,
        ..Default::default()
    }
}

/// Loads, selects and tokenizes the data of a training run.
pub fn prepare(config: &TrainConfig) -> Result<TrainInputs> {
    // A `data prepare-genrm` folder stands for its verify.jsonl and correct.jsonl.
    let prepared;
    let config = match crate::data::genrm_prepare::prepared_files(&config.data) {
        Some((verify, correct)) if config.objective == Objective::Genrm => {
            prepared = TrainConfig {
                data: verify,
                correct_data: config.correct_data.clone().or(correct),
                ..config.clone()
            };
            &prepared
        }
        _ => config,
    };
    let model_config = load_config(&config.model)?;
    let tokenizer = Tokenizer::from_dir(&config.model, Some(&model_config.raw))?;
    let schema = config
        .schema
        .as_deref()
        .map(str::parse::<Schema>)
        .transpose()?;
    let options = LoadOptions {
        schema,
        split: None,
        skip_bad_rows: config.skip_bad_rows,
    };
    let train_rows: Vec<DataRow> = if config.data.as_os_str().is_empty() {
        Vec::new()
    } else {
        load_dataset(&config.data, &options)?.rows
    };
    let eval_rows = match &config.eval_data {
        Some(path) => Some(load_dataset(path, &options)?.rows),
        None => None,
    };
    let (mut train_rows, mut eval_rows) = select(train_rows, eval_rows, &selection(config))?;
    if config.sanity_train {
        eval_rows = train_rows.clone();
    }
    if config.eval_only && config.eval_data.is_none() && eval_rows.is_empty() {
        // Validating "the given model on the whole eval set": with no eval file, the data is it.
        eval_rows = std::mem::take(&mut train_rows);
    }
    let encoder = Encoder::new(&tokenizer)?;
    let max_length = config
        .max_length
        .unwrap_or(model_config.max_position_embeddings);
    let tokenize = TokenizeOptions {
        max_length: Some(max_length),
        truncation: config.truncation.parse::<Truncation>()?,
        skip_bad_rows: config.skip_bad_rows,
    };
    let correct_rows = match (&config.correct_data, config.objective) {
        (Some(path), Objective::Genrm) => {
            load_dataset(
                path,
                &LoadOptions {
                    schema: None,
                    ..options.clone()
                },
            )?
            .rows
        }
        (None, Objective::Genrm) => {
            tracing::warn!("genrm without --correct-data: the λ·L_correct term is empty");
            Vec::new()
        }
        _ => Vec::new(),
    };
    // D_correct is split like D_verify: a seeded held-out share for validation.
    let (correct_train, correct_eval) = if correct_rows.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        select(
            correct_rows,
            None,
            &Selection {
                sanity_train: false,
                ..selection(config)
            },
        )?
    };
    let build = |rows: &[DataRow], correct: &[DataRow]| -> Result<Examples> {
        Ok(match config.objective {
            Objective::Genrm => Examples::Genrm {
                verify: tokenize_sequences(&encoder, rows, &tokenize)?.0,
                correct: tokenize_sequences(&encoder, correct, &tokenize)?.0,
            },
            Objective::Dpo | Objective::Rm => {
                Examples::Pairs(tokenize_pairs(&encoder, rows, &tokenize)?.0)
            }
            Objective::Pretrain
                if rows
                    .first()
                    .is_some_and(|r| r.example.schema() == Schema::Text) =>
            {
                Examples::Sequences(pack_texts(&encoder, rows, max_length)?.0)
            }
            Objective::Pretrain | Objective::Sft => {
                Examples::Sequences(tokenize_sequences(&encoder, rows, &tokenize)?.0)
            }
        })
    };
    let win_rate_prompts = crate::train::win_rate_eval::prompts(config, &eval_rows, &correct_eval);
    let train = build(&train_rows, &correct_train)?;
    let eval = build(&eval_rows, &correct_eval)?;
    tracing::info!("{} training and {} eval examples", train.len(), eval.len());
    Ok(TrainInputs {
        train,
        eval,
        tokenizer_dir: config.model.clone(),
        pad_id: pad_id(&tokenizer)?,
        verdict_ids: crate::infer::verify::verdict_ids(&tokenizer).ok(),
        stop_ids: tokenizer.stop_token_ids.clone(),
        win_rate_prompts,
    })
}
