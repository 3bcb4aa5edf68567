//! Parquet rows as JSON values, through the `parquet` crate's row (record) API — no arrow.
//!
//! The reader holds one row group's column chunks at a time, so a file much larger than memory
//! streams. Values convert to JSON the way `datasets` / pandas would show them: strings, numbers
//! and booleans as themselves, lists (`list<struct<content, role>>` message lists included) as
//! arrays, structs as objects, maps as objects keyed by the key's string form, binary as a string
//! when it is UTF-8 (else a list of byte values), dates and timestamps as numbers (days /
//! milliseconds / microseconds since the epoch), decimals as numbers. Non-finite floats become
//! `null` (JSON has no NaN).
//!
//! Codecs compiled in: snappy (pyarrow's and `datasets`' default) and zstd (polars' default).
//! A file using another codec fails with an error that says which.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use serde_json::{Map, Number, Value};

use super::reader::{RawRow, Source};
use crate::error::{Error, Result};

/// Rows of one `.parquet` file, streamed row group by row group.
pub struct ParquetRows {
    rows: RowIter<'static>,
    path: Arc<Path>,
    row: usize,
    done: bool,
}

fn parquet_error(path: &Path, e: parquet::errors::ParquetError) -> Error {
    let full = e.to_string();
    let message = full.strip_prefix("Parquet error: ").unwrap_or(&full);
    let hint = if message.contains("Disabled feature") || message.contains("codec") {
        " (ferrotune reads parquet compressed with snappy, zstd or uncompressed; rewrite the file with one of those)"
    } else {
        ""
    };
    Error::file(path, format!("parquet: {message}{hint}"))
}

impl ParquetRows {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = SerializedFileReader::new(file).map_err(|e| parquet_error(path, e))?;
        let reader: Box<dyn FileReader> = Box::new(reader);
        Ok(ParquetRows {
            rows: RowIter::from_file_into(reader),
            path: Arc::from(path),
            row: 0,
            done: false,
        })
    }
}

impl Iterator for ParquetRows {
    type Item = Result<RawRow>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.rows.next()? {
            Ok(row) => {
                self.row += 1;
                Some(Ok(RawRow {
                    value: row_to_json(&row),
                    source: Source {
                        path: self.path.clone(),
                        line: self.row,
                    },
                }))
            }
            // A decoding failure leaves the column readers in an unknown state: stop here.
            Err(e) => {
                self.done = true;
                Some(Err(parquet_error(&self.path, e)))
            }
        }
    }
}

/// A parquet row (a struct of columns) as a JSON object, column order kept.
pub fn row_to_json(row: &Row) -> Value {
    let mut object = Map::new();
    for (name, field) in row.get_column_iter() {
        object.insert(name.clone(), field_to_json(field));
    }
    Value::Object(object)
}

fn float(value: f64) -> Value {
    Number::from_f64(value).map_or(Value::Null, Value::Number)
}

/// One parquet value as JSON (see the module docs for the mapping).
pub fn field_to_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(v) => Value::from(*v),
        Field::Short(v) => Value::from(*v),
        Field::Int(v) => Value::from(*v),
        Field::Long(v) => Value::from(*v),
        Field::UByte(v) => Value::from(*v),
        Field::UShort(v) => Value::from(*v),
        Field::UInt(v) => Value::from(*v),
        Field::ULong(v) => Value::from(*v),
        Field::Float16(v) => float(f64::from(v.to_f32())),
        Field::Float(v) => float(f64::from(*v)),
        Field::Double(v) => float(*v),
        Field::Decimal(d) => decimal_to_json(d),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Array(b.data().iter().map(|&x| Value::from(x)).collect()),
        },
        Field::Date(days) => Value::from(*days),
        Field::TimeMillis(v) => Value::from(*v),
        Field::TimeMicros(v) => Value::from(*v),
        Field::TimestampMillis(v) => Value::from(*v),
        Field::TimestampMicros(v) => Value::from(*v),
        Field::Group(row) => row_to_json(row),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => {
            let mut object = Map::new();
            for (key, value) in map.entries() {
                let key = match field_to_json(key) {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                object.insert(key, field_to_json(value));
            }
            Value::Object(object)
        }
    }
}

/// A decimal's big-endian two's-complement unscaled value over 10^scale, as an f64.
fn decimal_to_json(decimal: &parquet::data_type::Decimal) -> Value {
    let bytes = decimal.data();
    if bytes.is_empty() || bytes.len() > 16 {
        return Value::Null;
    }
    let negative = bytes[0] & 0x80 != 0;
    let mut unscaled: i128 = if negative { -1 } else { 0 };
    for &b in bytes {
        unscaled = (unscaled << 8) | i128::from(b);
    }
    float(unscaled as f64 / 10f64.powi(decimal.scale()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::data_type::Decimal;

    #[test]
    fn decimals_are_scaled() {
        // 12345 with scale 2, as 4 big-endian bytes; and -5 with scale 1.
        let d = Decimal::from_bytes(12345i32.to_be_bytes().to_vec().into(), 9, 2);
        assert_eq!(decimal_to_json(&d), serde_json::json!(123.45));
        let d = Decimal::from_bytes((-5i64).to_be_bytes().to_vec().into(), 9, 1);
        assert_eq!(decimal_to_json(&d), serde_json::json!(-0.5));
    }

    #[test]
    fn scalars_and_non_finite_floats() {
        assert_eq!(
            field_to_json(&Field::Str("x".into())),
            serde_json::json!("x")
        );
        assert_eq!(field_to_json(&Field::Long(-3)), serde_json::json!(-3));
        assert_eq!(field_to_json(&Field::Double(f64::NAN)), Value::Null);
        assert_eq!(field_to_json(&Field::Bool(true)), serde_json::json!(true));
    }
}
