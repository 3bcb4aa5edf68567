//! Metric sinks: `metrics.jsonl` (one JSON object per event: `step`, `split`, `epoch`, names)
//! and TensorBoard scalars named `split/name`. On resume, rows past the checkpoint's step are
//! dropped so the file continues exactly where the checkpoint left off. In a multi-process run
//! only rank 0 writes: the other ranks' writers discard what they are given.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::tensorboard::TensorBoardWriter;
use crate::error::{Error, Result};

pub struct MetricsWriter {
    path: PathBuf,
    /// The file and the TensorBoard events; `None` on ranks other than 0.
    sinks: Option<(File, TensorBoardWriter)>,
}

impl MetricsWriter {
    /// Opens `run_dir/metrics.jsonl` for appending. With `resume_step`, keeps only the rows at
    /// or before that step; without it, starts a fresh file.
    pub fn open(run_dir: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        if !crate::dist::world().is_main() {
            return Ok(MetricsWriter { path, sinks: None });
        }
        match resume_step {
            Some(step) if path.exists() => {
                let text = crate::error::read_to_string(&path)?;
                let kept: Vec<&str> = text
                    .lines()
                    .filter(|line| {
                        serde_json::from_str::<Value>(line)
                            .ok()
                            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .collect();
                let mut body = kept.join("\n");
                if !body.is_empty() {
                    body.push('\n');
                }
                crate::io::checkpoint::write_atomic(&path, body.as_bytes())?;
            }
            _ => {
                std::fs::write(&path, b"").map_err(|e| Error::io(&path, e))?;
            }
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsWriter {
            path,
            sinks: Some((file, TensorBoardWriter::create(run_dir)?)),
        })
    }

    pub fn log(
        &mut self,
        step: usize,
        split: &str,
        epoch: usize,
        metrics: &[(&str, f64)],
    ) -> Result<()> {
        let Some((file, tensorboard)) = &mut self.sinks else {
            return Ok(());
        };
        let mut row = Map::new();
        row.insert("step".into(), step.into());
        row.insert("split".into(), split.into());
        row.insert("epoch".into(), epoch.into());
        for (name, value) in metrics {
            let v = serde_json::Number::from_f64(*value)
                .map(Value::Number)
                .unwrap_or(Value::Null);
            row.insert((*name).into(), v);
            tensorboard.scalar(&format!("{split}/{name}"), *value, step as u64)?;
        }
        let line = serde_json::to_string(&Value::Object(row)).expect("JSON row");
        writeln!(file, "{line}")
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}
