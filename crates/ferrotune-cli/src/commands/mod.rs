//! One module per subcommand, plus the few helpers they share.

pub mod bench;
pub mod best_of_n;
pub mod chat_template;
pub mod data;
pub mod generate;
pub mod init_model;
pub mod inspect;
pub mod quickstart;
pub mod reward;
pub mod score;
pub mod serve;
pub mod synth;
pub mod train;
pub mod verify;
pub mod winrate;

use candle_core::Device;

/// The device commands compute on: CUDA 0 when built with the `cuda` feature and a GPU is
/// present, else the CPU; `FERROTUNE_DEVICE` overrides it (see `ferrotune::device`).
pub fn device() -> anyhow::Result<Device> {
    Ok(ferrotune::device::select()?)
}

/// Prints one JSON object on stdout (the `--json` contract).
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string(value).expect("serialisable JSON")
    );
}
