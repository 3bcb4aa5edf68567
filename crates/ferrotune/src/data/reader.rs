//! Raw rows from dataset files: `.jsonl`, `.json`, `.parquet`, or a folder of them (an HF dataset
//! snapshot). A row is a JSON object plus where it came from; what its fields mean is
//! `schema.rs`'s business, not this file's.
//!
//! - `.jsonl` streams line by line; `line` is the 1-based line number. Blank lines are skipped.
//! - `.parquet` streams row group by row group through the `parquet` crate's row API (see
//!   `parquet.rs`); `line` is the 1-based row number in the file.
//! - `.json` is read whole (JSON has no streaming boundary). It holds a top-level list of objects,
//!   or an object with the list under a key: the requested split's name when there is one, else the
//!   first of `data`, `train`, `rows`, `examples`, `instances`, else the object's only list
//!   value (a requested split that is not there, among several lists, is an error). `line` is
//!   the 1-based position in that list.
//! - A folder is searched recursively for those three extensions, files sorted by path; hidden
//!   entries and the `datasets` metadata files (`dataset_info.json`, `dataset_dict.json`,
//!   `state.json`, `dataset_infos.json`) are skipped. A split is chosen by file or folder name
//!   (see [`dataset_files`]).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::parquet::ParquetRows;
use crate::error::{Error, Result};

/// One row as read from a file, before any schema is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    pub value: Value,
    pub source: Source,
}

/// Where a row came from: the file and the 1-based line (jsonl) or row number (json, parquet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub path: Arc<Path>,
    pub line: usize,
}

impl Source {
    /// A bad-row error at this row.
    pub fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::row(&self.path, self.line, field, message)
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// The pseudo-field named in errors about a whole row (invalid JSON, not an object).
pub const ROW_FIELD: &str = "(row)";

const JSON_LIST_KEYS: &[&str] = &["data", "train", "rows", "examples", "instances"];
const METADATA_FILES: &[&str] = &[
    "dataset_info.json",
    "dataset_infos.json",
    "dataset_dict.json",
    "state.json",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jsonl,
    Json,
    Parquet,
}

fn format_of(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "jsonl" => Some(Format::Jsonl),
        "json" => Some(Format::Json),
        "parquet" => Some(Format::Parquet),
        _ => None,
    }
}

fn is_data_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    format_of(path).is_some() && !METADATA_FILES.contains(&name)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if is_data_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Whether `file` (relative to the dataset root) belongs to `split`: a folder on its path is
/// named `split` (`default/train/0000.parquet`), or its file stem is `split` (`train.jsonl`) or
/// starts with `split-` (`data/train-00000-of-00001.parquet`, the Hub's shard names).
fn in_split(relative: &Path, split: &str) -> bool {
    let stem = relative.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let dirs = relative.parent().into_iter().flat_map(|p| p.components());
    stem == split
        || stem.starts_with(&format!("{split}-"))
        || dirs.into_iter().any(|c| c.as_os_str() == split)
}

/// The data files of a dataset path, sorted by path.
///
/// A file is itself. A folder yields its data files recursively; with `split`, only those of
/// that split (an error if none are). Without `split`, a folder whose files include a `train`
/// split yields only those (so a snapshot with train and test files never mixes them);
/// otherwise all of its files.
pub fn dataset_files(path: &Path, split: Option<&str>) -> Result<Vec<PathBuf>> {
    if !path.exists() {
        return Err(Error::file(path, "dataset path does not exist"));
    }
    if !path.is_dir() {
        if format_of(path).is_none() {
            return Err(Error::file(
                path,
                "unknown dataset format: expected .jsonl, .json, .parquet or a folder of them",
            ));
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    walk(path, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::file(
            path,
            "folder holds no .jsonl, .json or .parquet files",
        ));
    }
    let relative = |f: &PathBuf| f.strip_prefix(path).unwrap_or(f).to_path_buf();
    let of_split = |s: &str| -> Vec<PathBuf> {
        files
            .iter()
            .filter(|f| in_split(&relative(f), s))
            .cloned()
            .collect()
    };
    match split {
        Some(s) => {
            let chosen = of_split(s);
            if chosen.is_empty() {
                let names: Vec<String> = files
                    .iter()
                    .map(|f| relative(f).display().to_string())
                    .collect();
                return Err(Error::file(
                    path,
                    format!("no files of split `{s}` among: {}", names.join(", ")),
                ));
            }
            Ok(chosen)
        }
        None => {
            let train = of_split("train");
            Ok(if train.is_empty() { files } else { train })
        }
    }
}

/// Rows of JSONL text, streamed line by line: a `.jsonl` file, or any reader (a zip member, a
/// gunzipped shard) named by `path` in errors. 1-based line numbers, blank lines skipped, a
/// UTF-8 BOM on line 1 dropped.
pub struct JsonlRows<R = BufReader<File>> {
    reader: R,
    path: Arc<Path>,
    line: usize,
    buffer: Vec<u8>,
    done: bool,
}

impl JsonlRows {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(JsonlRows::from_reader(BufReader::new(file), path))
    }
}

impl<R: BufRead> JsonlRows<R> {
    pub fn from_reader(reader: R, path: &Path) -> Self {
        JsonlRows {
            reader,
            path: Arc::from(path),
            line: 0,
            buffer: Vec::new(),
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for JsonlRows<R> {
    type Item = Result<RawRow>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            self.buffer.clear();
            match self.reader.read_until(b'\n', &mut self.buffer) {
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(Error::io(&self.path, e)));
                }
            }
            self.line += 1;
            let source = Source {
                path: self.path.clone(),
                line: self.line,
            };
            let mut bytes: &[u8] = &self.buffer;
            if self.line == 1 {
                bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let value = match serde_json::from_slice::<Value>(bytes) {
                Ok(v) => v,
                Err(e) => return Some(Err(source.error(ROW_FIELD, format!("invalid JSON: {e}")))),
            };
            return Some(object_row(value, source));
        }
    }
}

/// A parsed JSON value as a row, or an error naming the row when it is not an object.
pub fn object_row(value: Value, source: Source) -> Result<RawRow> {
    if !value.is_object() {
        return Err(source.error(
            ROW_FIELD,
            format!("expected a JSON object, found {}", kind_of(&value)),
        ));
    }
    Ok(RawRow { value, source })
}

/// The JSON type name of a value, for error messages.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Rows of one `.json` file (read whole; see the module docs for the accepted layouts).
pub fn json_rows(path: &Path, split: Option<&str>) -> Result<std::vec::IntoIter<Result<RawRow>>> {
    let value = crate::error::read_json(path)?;
    let list = match value {
        Value::Array(list) => list,
        Value::Object(mut object) => {
            let lists: Vec<String> = object
                .iter()
                .filter(|(_, v)| v.is_array())
                .map(|(k, _)| k.clone())
                .collect();
            let key = match split {
                Some(s) if lists.iter().any(|k| k == s) => Some(s.to_string()),
                // A split was asked for and the object holds several lists, none of that name:
                // falling back to another list would silently read the wrong split.
                Some(s) if lists.len() > 1 => {
                    return Err(Error::file(
                        path,
                        format!("no list under split `{s}`; the lists are under {lists:?}"),
                    ))
                }
                _ => JSON_LIST_KEYS
                    .iter()
                    .find(|k| lists.iter().any(|l| l == *k))
                    .map(|k| k.to_string())
                    .or_else(|| (lists.len() == 1).then(|| lists[0].clone())),
            };
            match key.and_then(|k| object.remove(&k)) {
                Some(Value::Array(list)) => list,
                _ => {
                    let names: Vec<&String> = object.keys().collect();
                    return Err(Error::file(
                        path,
                        format!(
                            "expected a list of rows, or an object with the list under one of {JSON_LIST_KEYS:?} (or its only list); found keys {names:?}"
                        ),
                    ));
                }
            }
        }
        other => {
            return Err(Error::file(
                path,
                format!("expected a list of rows, found {}", kind_of(&other)),
            ))
        }
    };
    let path: Arc<Path> = Arc::from(path);
    let rows: Vec<Result<RawRow>> = list
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            object_row(
                value,
                Source {
                    path: path.clone(),
                    line: i + 1,
                },
            )
        })
        .collect();
    Ok(rows.into_iter())
}

/// Rows of one file of any supported format.
pub fn file_rows(
    path: &Path,
    split: Option<&str>,
) -> Result<Box<dyn Iterator<Item = Result<RawRow>> + Send>> {
    match format_of(path) {
        Some(Format::Jsonl) => Ok(Box::new(JsonlRows::open(path)?)),
        Some(Format::Json) => Ok(Box::new(json_rows(path, split)?)),
        Some(Format::Parquet) => Ok(Box::new(ParquetRows::open(path)?)),
        None => Err(Error::file(path, "unknown dataset format")),
    }
}

/// Every row of a dataset path (file or folder), file after file, streamed: a file is opened
/// only when the previous one is exhausted.
pub struct Rows {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<Box<dyn Iterator<Item = Result<RawRow>> + Send>>,
    split: Option<String>,
}

impl Rows {
    pub fn open(path: &Path, split: Option<&str>) -> Result<(Self, Vec<PathBuf>)> {
        let files = dataset_files(path, split)?;
        let rows = Rows {
            files: files.clone().into_iter(),
            current: None,
            split: split.map(str::to_string),
        };
        Ok((rows, files))
    }
}

impl Iterator for Rows {
    type Item = Result<RawRow>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(current) = &mut self.current {
                if let Some(row) = current.next() {
                    return Some(row);
                }
                self.current = None;
            }
            let file = self.files.next()?;
            match file_rows(&file, self.split.as_deref()) {
                Ok(rows) => self.current = Some(rows),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Every row of a dataset path; see [`Rows`].
pub fn read_rows(path: &Path, split: Option<&str>) -> Result<Rows> {
    Ok(Rows::open(path, split)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn jsonl_lines_are_numbered_from_one_and_blank_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.jsonl",
            "\u{feff}{\"a\": 1}\n\n{\"a\": 2}\n{\"a\": 3}",
        );
        let rows: Vec<RawRow> = JsonlRows::open(&path)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let lines: Vec<usize> = rows.iter().map(|r| r.source.line).collect();
        assert_eq!(lines, [1, 3, 4]);
        assert_eq!(rows[2].value["a"], 3);
    }

    #[test]
    fn jsonl_bad_line_names_file_and_line_and_iteration_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.jsonl",
            "{\"a\": 1}\n{\"a\": \n[1]\n{\"a\": 4}\n",
        );
        let rows: Vec<Result<RawRow>> = JsonlRows::open(&path).unwrap().collect();
        assert_eq!(rows.len(), 4);
        let message = rows[1].as_ref().unwrap_err().to_string();
        assert!(message.contains("a.jsonl:2:"), "{message}");
        assert!(message.contains("invalid JSON"), "{message}");
        assert!(rows[2]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("a.jsonl:3:"));
        assert_eq!(rows[3].as_ref().unwrap().value["a"], 4);
    }

    #[test]
    fn json_list_or_object_with_list() {
        let dir = tempfile::tempdir().unwrap();
        let list = write(dir.path(), "list.json", r#"[{"a": 1}, {"a": 2}]"#);
        assert_eq!(json_rows(&list, None).unwrap().count(), 2);
        let keyed = write(
            dir.path(),
            "keyed.json",
            r#"{"version": 1, "train": [{"a": 1}], "test": [{"a": 2}, {"a": 3}]}"#,
        );
        assert_eq!(json_rows(&keyed, None).unwrap().count(), 1);
        assert_eq!(json_rows(&keyed, Some("test")).unwrap().count(), 2);
        let err = json_rows(&keyed, Some("validation"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no list under split `validation`"), "{err}");
        let single = write(dir.path(), "single.json", r#"{"items": [{"a": 1}]}"#);
        assert_eq!(json_rows(&single, None).unwrap().count(), 1);
        let bad = write(dir.path(), "bad.json", r#"{"x": [], "y": []}"#);
        assert!(json_rows(&bad, None).is_err());
    }

    #[test]
    fn folder_splits_by_file_and_folder_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "README.md", "");
        write(root, ".cache/x.jsonl", "{}\n");
        write(root, "data/train-00001-of-00002.jsonl", "{}\n");
        write(root, "data/train-00000-of-00002.jsonl", "{}\n");
        write(root, "data/test-00000-of-00001.jsonl", "{}\n");
        write(root, "data/train_prefs-00000-of-00001.jsonl", "{}\n");
        write(root, "dataset_info.json", "{}");
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files
                .iter()
                .map(|f| f.strip_prefix(root).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(
            names(dataset_files(root, None).unwrap()),
            [
                "data/train-00000-of-00002.jsonl",
                "data/train-00001-of-00002.jsonl"
            ]
        );
        assert_eq!(
            names(dataset_files(root, Some("test")).unwrap()),
            ["data/test-00000-of-00001.jsonl"]
        );
        assert_eq!(
            names(dataset_files(root, Some("train_prefs")).unwrap()),
            ["data/train_prefs-00000-of-00001.jsonl"]
        );
        let err = dataset_files(root, Some("validation"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("validation") && err.contains("test-00000"),
            "{err}"
        );

        let nested = tempfile::tempdir().unwrap();
        write(nested.path(), "default/train/0000.jsonl", "{}\n");
        write(nested.path(), "default/test/0000.jsonl", "{}\n");
        assert_eq!(dataset_files(nested.path(), Some("test")).unwrap().len(), 1);
        let (rows, files) = Rows::open(root, None).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(rows.count(), 2);
    }
}
