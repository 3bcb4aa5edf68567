//! Log lines of a multi-process job (`mpirun -np N ferrotune …`): rank 0 logs as a single
//! process does; the other ranks log warnings and errors only, each line prefixed with
//! `[rank R/N]`, so N copies of every info line do not drown the one that matters.

use std::io::Write;

/// Buffers one log event and writes it, prefixed, to stderr in one piece when dropped
/// (tracing-subscriber makes one writer per event), so lines of several ranks never interleave
/// mid-line.
struct PrefixedStderr {
    prefix: &'static str,
    line: Vec<u8>,
}

impl Write for PrefixedStderr {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for PrefixedStderr {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let mut out = Vec::with_capacity(self.prefix.len() + self.line.len());
            out.extend_from_slice(self.prefix.as_bytes());
            out.extend_from_slice(&self.line);
            let _ = std::io::stderr().lock().write_all(&out);
        }
    }
}

/// Installs the global tracing subscriber for this process's rank.
pub fn init(world: &ferrotune::dist::World) {
    let builder = tracing_subscriber::fmt();
    if world.is_main() {
        builder
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .init();
    } else {
        let prefix: &'static str = Box::leak(world.log_prefix().into_boxed_str());
        builder
            .with_writer(move || PrefixedStderr {
                prefix,
                line: Vec::new(),
            })
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .init();
    }
}
