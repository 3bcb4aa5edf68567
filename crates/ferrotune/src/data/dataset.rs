//! Loading a dataset path into typed rows: read (reader.rs), detect or take the schema, parse
//! every row (schema.rs), and apply the bad-row policy.
//!
//! Bad-row policy (CONTRACTS "Datasets"): by default the first bad row stops the load with its
//! error (file, line, field). With `skip_bad_rows` it is skipped and counted, and the first
//! [`MAX_REPORTED_BAD_ROWS`] locations are kept for the report. Only row errors are skippable:
//! a file that cannot be opened or a corrupt parquet file always stops.
//!
//! The schema is detected from the first row that is a JSON object (bad JSON before it can be
//! skipped); when no schema fits that row's fields the load stops even with `skip_bad_rows`,
//! since the file is most likely not the dataset that was meant.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::reader::{RawRow, Rows};
use super::schema::{parse_row, DataRow, Schema};
use crate::error::{Error, Result};

/// How many bad-row locations a report keeps.
pub const MAX_REPORTED_BAD_ROWS: usize = 5;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Force a schema instead of detecting it from the first row.
    pub schema: Option<Schema>,
    /// Which split of a folder (or key of a `.json` object) to read; see `reader::dataset_files`.
    pub split: Option<String>,
    /// Skip and count bad rows instead of stopping at the first.
    pub skip_bad_rows: bool,
}

/// Bad rows met so far: how many, and the first few as `file:line: field `f`: message`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BadRows {
    pub count: usize,
    pub locations: Vec<String>,
}

impl BadRows {
    /// Counts a bad row, keeping its message when it is among the first few.
    pub fn record(&mut self, error: &Error) {
        self.count += 1;
        if self.locations.len() < MAX_REPORTED_BAD_ROWS {
            self.locations.push(error.to_string());
            tracing::warn!("skipping bad row: {error}");
        }
    }

    /// Applies the policy: a row error is recorded when skipping (returns `Ok(())`), otherwise
    /// returned. Other errors are always returned.
    pub fn handle(&mut self, error: Error, skip_bad_rows: bool) -> Result<()> {
        if skip_bad_rows && matches!(error, Error::Row { .. }) {
            self.record(&error);
            Ok(())
        } else {
            Err(error)
        }
    }
}

/// A loaded dataset: typed rows in file order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub schema: Schema,
    pub rows: Vec<DataRow>,
    pub bad_rows: BadRows,
    pub files: Vec<PathBuf>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Typed rows streamed from a dataset path, with the schema fixed from the first good row
/// (or forced). Iterating yields `Err` for bad rows; [`load_dataset`] applies the policy.
pub struct ExampleRows {
    rows: Rows,
    schema: Option<Schema>,
    /// A first row read ahead to detect the schema.
    peeked: Option<RawRow>,
}

impl ExampleRows {
    pub fn open(path: &Path, options: &LoadOptions) -> Result<(Self, Vec<PathBuf>)> {
        let (rows, files) = Rows::open(path, options.split.as_deref())?;
        Ok((
            ExampleRows {
                rows,
                schema: options.schema,
                peeked: None,
            },
            files,
        ))
    }

    /// The schema, reading ahead to the first row that is an object when it is not forced.
    /// Row errors met before it are handled by `bad` (so they can be skipped and counted).
    pub fn schema(&mut self, mut bad: impl FnMut(Error) -> Result<()>) -> Result<Option<Schema>> {
        while self.schema.is_none() {
            match self.rows.next() {
                None => return Ok(None),
                Some(Err(e)) => bad(e)?,
                Some(Ok(row)) => {
                    let schema = Schema::detect(&row.value).ok_or_else(|| {
                        let fields: Vec<&String> =
                            row.value.as_object().map(|o| o.keys().collect()).unwrap_or_default();
                        Error::row(
                            &row.source.path,
                            row.source.line,
                            "(row)",
                            format!(
                                "no schema fits this row's fields {fields:?} (see CONTRACTS \"Datasets\"; pass a schema to force one)"
                            ),
                        )
                    })?;
                    self.schema = Some(schema);
                    self.peeked = Some(row);
                }
            }
        }
        Ok(self.schema)
    }
}

impl Iterator for ExampleRows {
    type Item = Result<DataRow>;

    fn next(&mut self) -> Option<Self::Item> {
        let schema = match self.schema {
            Some(s) => s,
            None => match self.schema(Err) {
                Ok(Some(s)) => s,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            },
        };
        let row = match self.peeked.take() {
            Some(row) => row,
            None => match self.rows.next()? {
                Ok(row) => row,
                Err(e) => return Some(Err(e)),
            },
        };
        Some(parse_row(&row, schema))
    }
}

/// Reads, parses and validates every row of a dataset path (see the module docs for the
/// bad-row policy). An empty dataset is an error: nothing can be trained or evaluated on it.
pub fn load_dataset(path: &Path, options: &LoadOptions) -> Result<Dataset> {
    let (mut examples, files) = ExampleRows::open(path, options)?;
    let mut bad_rows = BadRows::default();
    let skip = options.skip_bad_rows;
    let schema = examples.schema(|e| bad_rows.handle(e, skip))?;
    let Some(schema) = schema else {
        return Err(Error::file(
            path,
            if bad_rows.count > 0 {
                format!("every row is bad ({} skipped)", bad_rows.count)
            } else {
                "dataset has no rows".to_string()
            },
        ));
    };
    let mut rows = Vec::new();
    for row in examples {
        match row {
            Ok(row) => rows.push(row),
            Err(e) => bad_rows.handle(e, skip)?,
        }
    }
    if bad_rows.count > 0 {
        tracing::warn!(
            "{}: skipped {} bad rows (first: {})",
            path.display(),
            bad_rows.count,
            bad_rows.locations.first().map(String::as_str).unwrap_or("")
        );
    }
    if rows.is_empty() {
        return Err(Error::file(path, "every row is bad"));
    }
    Ok(Dataset {
        schema,
        rows,
        bad_rows,
        files,
    })
}
