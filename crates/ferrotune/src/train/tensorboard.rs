//! A minimal TensorBoard event-file writer for scalars: TFRecord framing (length, masked
//! CRC-32C, payload, masked CRC-32C) around hand-encoded `Event` protobufs. Enough for
//! `tensorboard --logdir RUN_DIR` to plot `split/metric` curves; no protobuf dependency.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

fn crc32c(data: &[u8]) -> u32 {
    // Castagnoli polynomial, reflected; bitwise is fast enough for a few records per step.
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

pub struct TensorBoardWriter {
    file: File,
}

impl TensorBoardWriter {
    /// Creates `events.out.tfevents.<time>.ferrotune` in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = dir.join(format!(
            "events.out.tfevents.{now}.ferrotune.{}",
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = TensorBoardWriter { file };
        // The first event names the file format version.
        let mut event = Vec::new();
        event.push(0x09); // field 1 (wall_time), 64-bit
        event.extend_from_slice(&(now as f64).to_le_bytes());
        field_bytes(3, b"brain.Event:2", &mut event);
        w.write_record(&event)?;
        Ok(w)
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let mut v = Vec::new();
        field_bytes(1, tag.as_bytes(), &mut v);
        v.push(0x15); // field 2 (simple_value), 32-bit float
        v.extend_from_slice(&(value as f32).to_le_bytes());
        let mut summary = Vec::new();
        field_bytes(1, &v, &mut summary);
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut event = Vec::new();
        event.push(0x09);
        event.extend_from_slice(&wall.to_le_bytes());
        event.push(0x10); // field 2 (step), varint
        varint(step, &mut event);
        field_bytes(5, &summary, &mut event);
        self.write_record(&event)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&record)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::invalid(format!("writing TensorBoard events: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // RFC 3720 test vector: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
