//! The CUDA kernels of `cuda/kernels.cu`, run on the CPU: `cuda/emulate/harness.cpp` compiles
//! them as C++ under `cuda/emulate/cuda_emulate.h` (each CUDA thread an OS thread, blocks in
//! turn, `__syncthreads` a barrier) and compares every kernel with a double-precision reference.
//! This checks the kernels' arithmetic, indexing and block reductions where there is no GPU; the
//! launch code in `model/cuda_ops.rs` is checked on a GPU by scripts/gpu/check.sh.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn cuda_kernels_match_the_reference_under_cpu_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("harness");
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let built = Command::new(&compiler)
        .args(["-std=c++17", "-O1", "-pthread", "-I"])
        .arg(root.join("emulate"))
        .args(["-include", "cuda_emulate.h"])
        .arg(root.join("emulate/harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{compiler}` (set CXX): {e}"));
    assert!(
        built.status.success(),
        "harness does not compile:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}");
    // Every kernel was checked.
    for kernel in [
        "masked_softmax_fwd_f32",
        "masked_softmax_bwd_f32",
        "masked_softmax_fwd_bf16",
        "masked_softmax_bwd_bf16",
        "token_logprob_fwd_f32",
        "token_logprob_bwd_f32",
        "token_logprob_fwd_bf16",
        "token_logprob_bwd_bf16",
        "rms_norm_f32",
        "rms_norm_bf16",
        "swiglu_rope_f32",
        "swiglu_rope_bf16",
        "argmax_rows_f32",
        "argmax_rows_bf16",
        "embedding_bwd_f32",
        "embedding_bwd_bf16",
        "adamw_moment_f32 adamw_apply_f32",
    ] {
        assert!(
            stdout.contains(&format!("ok {kernel}\n")),
            "{kernel}: {stdout}"
        );
    }
}
