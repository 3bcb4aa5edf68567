//! Launches of the CUDA kernels in `cuda/kernels.cu` (PTX built by build.rs): the CUDA forward
//! passes of [`super::fused_softmax`]'s masked softmax and its backward, of
//! [`super::token_logprob`]'s next-token log-probability and its backward, of the optimizer's
//! in-place AdamW updates, of [`super::rms_norm_gpu`]'s RMSNorm and [`super::elementwise_gpu`]'s
//! SwiGLU and rotary embedding each way, and of greedy decoding's argmax
//! (`infer::sampler::argmax_rows`).
//!
//! Every function takes contiguous storages (checked) and returns a fresh one; the kernels'
//! arithmetic is tested on the CPU under emulation (tests/integration/cuda_emulation.rs), the
//! launches here on a GPU by scripts/gpu/check.sh.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "ferrotune_train";
/// Threads per block of the row kernels; must match cuda/kernels.cu.
const SOFTMAX_BLOCK: u32 = 256;
const VOCAB_BLOCK: u32 = 1024;
/// Threads per block and the most blocks of the elementwise (grid-stride) kernels.
const ELEMENTWISE_BLOCK: u32 = 256;
const ELEMENTWISE_GRID: usize = 4096;

fn error(message: String) -> candle_core::Error {
    candle_core::Error::Cuda(message.into())
}

fn launch_rows(rows: usize, block: u32) -> Result<LaunchConfig> {
    let rows = u32::try_from(rows)
        .ok()
        .filter(|&r| r > 0 && r < i32::MAX as u32)
        .ok_or_else(|| error(format!("{rows} rows do not fit one CUDA grid")))?;
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| error(format!("{what} {n} does not fit a 32-bit kernel argument")))
}

/// The contiguous elements of a storage as a view of `T`.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| error(format!("{what} must be contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// The name of kernel `{name}_{f32|bf16}` for the storage's type.
fn typed(name: &str, dtype: DType) -> Result<String> {
    match dtype {
        DType::F32 => Ok(format!("{name}_f32")),
        DType::BF16 => Ok(format!("{name}_bf16")),
        other => Err(error(format!("{name}: no kernel for {other:?}"))),
    }
}

/// `softmax(scale · scores + mask)` per row: scores [B, H, T, S], mask [B, 1, T, S] of the
/// same type (f32 or bf16).
pub fn masked_softmax_fwd(
    (scores, sl): (&CudaStorage, &Layout),
    (mask, ml): (&CudaStorage, &Layout),
    (heads, queries, keys): (usize, usize, usize),
    scale: f32,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (scores, sl): (&CudaStorage, &Layout),
        (mask, ml): (&CudaStorage, &Layout),
        (heads, queries, keys): (usize, usize, usize),
        scale: f32,
    ) -> Result<CudaStorage> {
        let n = sl.shape().elem_count();
        if keys == 0 || n % keys != 0 || ml.shape().elem_count() * heads != n {
            return Err(error(format!(
                "masked_softmax: {n} scores, {} mask values, {heads} heads of {keys} keys",
                ml.shape().elem_count()
            )));
        }
        let x = view::<T>(scores, sl, "masked_softmax scores")?;
        let m = view::<T>(mask, ml, "masked_softmax mask")?;
        // SAFETY: the kernel writes every element (one block per row, all keys of the row).
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
        let (h, t, s) = (
            int(heads, "heads")?,
            int(queries, "queries")?,
            int(keys, "keys")?,
        );
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&x)
            .arg(&m)
            .arg(&mut out)
            .arg(&h)
            .arg(&t)
            .arg(&s)
            .arg(&scale);
        // SAFETY: argument types and order are those of masked_softmax_fwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / keys.max(1), SOFTMAX_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = scores.device();
    let func = &typed("masked_softmax_fwd", scores.dtype())?;
    let args = ((scores, sl), (mask, ml), (heads, queries, keys), scale);
    match scores.dtype() {
        DType::BF16 => run::<bf16>(dev, func, args.0, args.1, args.2, args.3),
        _ => run::<f32>(dev, func, args.0, args.1, args.2, args.3),
    }
}

/// `scale · p ⊙ (g − Σ_row p ⊙ g)` per row of `keys`: the masked softmax's backward.
pub fn masked_softmax_bwd(
    (probs, pl): (&CudaStorage, &Layout),
    (grad, gl): (&CudaStorage, &Layout),
    keys: usize,
    scale: f32,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (probs, pl): (&CudaStorage, &Layout),
        (grad, gl): (&CudaStorage, &Layout),
        keys: usize,
        scale: f32,
    ) -> Result<CudaStorage> {
        let n = pl.shape().elem_count();
        if keys == 0 || n % keys != 0 || gl.shape().elem_count() != n {
            return Err(error(format!(
                "masked_softmax backward: {n} probabilities, {} gradients, rows of {keys}",
                gl.shape().elem_count()
            )));
        }
        let p = view::<T>(probs, pl, "masked_softmax probs")?;
        let g = view::<T>(grad, gl, "masked_softmax gradient")?;
        // SAFETY: the kernel writes every element.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
        let s = int(keys, "keys")?;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&p).arg(&g).arg(&mut out).arg(&s).arg(&scale);
        // SAFETY: argument types and order are those of masked_softmax_bwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / keys.max(1), SOFTMAX_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
    if probs.dtype() != grad.dtype() {
        return Err(error(format!(
            "masked_softmax backward: probabilities {:?}, gradient {:?}",
            probs.dtype(),
            grad.dtype()
        )));
    }
    let dev = probs.device();
    let func = &typed("masked_softmax_bwd", probs.dtype())?;
    match probs.dtype() {
        DType::BF16 => run::<bf16>(dev, func, (probs, pl), (grad, gl), keys, scale),
        _ => run::<f32>(dev, func, (probs, pl), (grad, gl), keys, scale),
    }
}

/// Logits of `rows` rows of `vocab`, or an error (the kernels index by both).
fn check_rows(logits: &Layout, vocab: usize, rows: usize) -> Result<()> {
    if vocab == 0 || logits.shape().elem_count() != rows * vocab {
        return Err(error(format!(
            "token_logprob: {} logits are not {rows} rows of {vocab}",
            logits.shape().elem_count()
        )));
    }
    Ok(())
}

/// Per row of logits [N, V]: f32 [2, N] holding `logits[row, target] − logsumexp(row)`, then
/// the logsumexp. Targets (u32 [N]) must be below V.
pub fn token_logprob_fwd(
    (logits, ll): (&CudaStorage, &Layout),
    (targets, tl): (&CudaStorage, &Layout),
    vocab: usize,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (logits, ll): (&CudaStorage, &Layout),
        (targets, tl): (&CudaStorage, &Layout),
        vocab: usize,
    ) -> Result<CudaStorage> {
        let rows = ll.shape().elem_count() / vocab.max(1);
        check_rows(ll, vocab, tl.shape().elem_count())?;
        let x = view::<T>(logits, ll, "token_logprob logits")?;
        let t = view::<u32>(targets, tl, "token_logprob targets")?;
        // SAFETY: thread 0 of every row's block writes both of the row's outputs.
        let mut out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(2 * rows)? };
        let v = int(vocab, "vocabulary")?;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&x).arg(&t).arg(&mut out).arg(&v);
        // SAFETY: argument types and order are those of token_logprob_fwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(rows, VOCAB_BLOCK)?) }.w()?;
        Ok(f32::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = logits.device();
    let func = &typed("token_logprob_fwd", logits.dtype())?;
    match logits.dtype() {
        DType::BF16 => run::<bf16>(dev, func, (logits, ll), (targets, tl), vocab),
        _ => run::<f32>(dev, func, (logits, ll), (targets, tl), vocab),
    }
}

/// d logits [N, V] of the log-probs, from `stats` f32 [2, N]: the log-probs' gradients, then the
/// forward's logsumexps.
pub fn token_logprob_bwd(
    (logits, ll): (&CudaStorage, &Layout),
    (targets, tl): (&CudaStorage, &Layout),
    (stats, sl): (&CudaStorage, &Layout),
    vocab: usize,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (logits, ll): (&CudaStorage, &Layout),
        (targets, tl): (&CudaStorage, &Layout),
        (stats, sl): (&CudaStorage, &Layout),
        vocab: usize,
    ) -> Result<CudaStorage> {
        let n = ll.shape().elem_count();
        let rows = tl.shape().elem_count();
        check_rows(ll, vocab, rows)?;
        if sl.shape().elem_count() != 2 * rows {
            return Err(error(format!(
                "token_logprob backward: stats for {rows} rows must be [2, {rows}]"
            )));
        }
        let x = view::<T>(logits, ll, "token_logprob logits")?;
        let t = view::<u32>(targets, tl, "token_logprob targets")?;
        let st = view::<f32>(stats, sl, "token_logprob stats")?;
        // SAFETY: every row's block writes all of the row.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
        let v = int(vocab, "vocabulary")?;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&x).arg(&t).arg(&st).arg(&mut out).arg(&v);
        // SAFETY: argument types and order are those of token_logprob_bwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / vocab.max(1), VOCAB_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = logits.device();
    let func = &typed("token_logprob_bwd", logits.dtype())?;
    let args = ((logits, ll), (targets, tl), (stats, sl));
    match logits.dtype() {
        DType::BF16 => run::<bf16>(dev, func, args.0, args.1, args.2, vocab),
        _ => run::<f32>(dev, func, args.0, args.1, args.2, vocab),
    }
}

/// The first maximum's index of every row of x [N, V] (f32 or bf16): u32 [N].
pub fn argmax_rows((x, xl): (&CudaStorage, &Layout), cols: usize) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (x, xl): (&CudaStorage, &Layout),
        cols: usize,
    ) -> Result<CudaStorage> {
        let rows = xl.shape().elem_count() / cols.max(1);
        let v = view::<T>(x, xl, "argmax rows")?;
        // SAFETY: thread 0 of every row's block writes the row's id.
        let mut out: CudaSlice<u32> = unsafe { dev.alloc::<u32>(rows)? };
        let c = int(cols, "columns")?;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&v).arg(&mut out).arg(&c);
        // SAFETY: argument types and order are those of argmax_rows_* in kernels.cu.
        unsafe { b.launch(launch_rows(rows, VOCAB_BLOCK)?) }.w()?;
        Ok(u32::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = x.device();
    let func = &typed("argmax_rows", x.dtype())?;
    match x.dtype() {
        DType::BF16 => run::<bf16>(dev, func, (x, xl), cols),
        _ => run::<f32>(dev, func, (x, xl), cols),
    }
}

/// RMSNorm forward: y = x · rsqrt(mean(x²) + eps) · w per row of `hidden` (x and w of one type).
pub fn rms_norm_fwd(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    hidden: usize,
    eps: f32,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        hidden: usize,
        eps: f32,
    ) -> Result<CudaStorage> {
        let n = xl.shape().elem_count();
        if hidden == 0 || n % hidden != 0 || wl.shape().elem_count() != hidden {
            return Err(error(format!(
                "rms_norm: {n} values, weight of {}",
                wl.shape().elem_count()
            )));
        }
        let xv = view::<T>(x, xl, "rms_norm x")?;
        let wv = view::<T>(w, wl, "rms_norm weight")?;
        // SAFETY: every row's block writes all of the row.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
        let h = int(hidden, "hidden size")?;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&mut out).arg(&h).arg(&eps);
        // SAFETY: argument types and order are those of rms_norm_fwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / hidden.max(1), SOFTMAX_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = x.device();
    let func = &typed("rms_norm_fwd", x.dtype())?;
    match x.dtype() {
        DType::BF16 => run::<bf16>(dev, func, (x, xl), (w, wl), hidden, eps),
        _ => run::<f32>(dev, func, (x, xl), (w, wl), hidden, eps),
    }
}

/// RMSNorm's `x` gradient per row: r · (w ⊙ dy − x · r² · Σ w ⊙ dy ⊙ x / H).
pub fn rms_norm_bwd_x(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (dy, dl): (&CudaStorage, &Layout),
    hidden: usize,
    eps: f32,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        (dy, dl): (&CudaStorage, &Layout),
        (hidden, eps): (usize, f32),
    ) -> Result<CudaStorage> {
        let n = xl.shape().elem_count();
        if dl.shape().elem_count() != n || wl.shape().elem_count() != hidden {
            return Err(error(
                "rms_norm backward: x, weight and gradient sizes differ".into(),
            ));
        }
        let xv = view::<T>(x, xl, "rms_norm x")?;
        let wv = view::<T>(w, wl, "rms_norm weight")?;
        let gv = view::<T>(dy, dl, "rms_norm gradient")?;
        // SAFETY: every row's block writes all of the row.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
        let h = int(hidden, "hidden size")?;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&gv).arg(&mut out).arg(&h).arg(&eps);
        // SAFETY: argument types and order are those of rms_norm_bwd_x_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / hidden.max(1), SOFTMAX_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = x.device();
    let func = &typed("rms_norm_bwd_x", x.dtype())?;
    let args = ((x, xl), (w, wl), (dy, dl), (hidden, eps));
    match x.dtype() {
        DType::BF16 => run::<bf16>(dev, func, args.0, args.1, args.2, args.3),
        _ => run::<f32>(dev, func, args.0, args.1, args.2, args.3),
    }
}

/// RMSNorm's weight gradient in parts: f32 [ceil(rows / rows_per_block), hidden], part b the sum
/// of dy ⊙ x · r over its rows. `hidden` at most RMS_MAX_HIDDEN (8192).
pub fn rms_norm_bwd_w(
    (x, xl): (&CudaStorage, &Layout),
    (dy, dl): (&CudaStorage, &Layout),
    (hidden, rows_per_block): (usize, usize),
    eps: f32,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (x, xl): (&CudaStorage, &Layout),
        (dy, dl): (&CudaStorage, &Layout),
        (hidden, rows_per_block): (usize, usize),
        eps: f32,
    ) -> Result<CudaStorage> {
        if hidden > super::rms_norm_gpu::MAX_HIDDEN {
            return Err(error(format!(
                "rms_norm: hidden size {hidden} over the kernel's 8192"
            )));
        }
        let rows = xl.shape().elem_count() / hidden.max(1);
        if dl.shape().elem_count() != xl.shape().elem_count() {
            return Err(error(
                "rms_norm backward: x and gradient sizes differ".into(),
            ));
        }
        let blocks = rows.div_ceil(rows_per_block.max(1));
        let xv = view::<T>(x, xl, "rms_norm x")?;
        let gv = view::<T>(dy, dl, "rms_norm gradient")?;
        // SAFETY: every block writes all `hidden` columns of its part.
        let mut out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(blocks * hidden)? };
        let (r, h) = (int(rows, "rows")?, int(hidden, "hidden size")?);
        let per = int(rows_per_block, "rows per block")?;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv)
            .arg(&gv)
            .arg(&mut out)
            .arg(&r)
            .arg(&h)
            .arg(&per)
            .arg(&eps);
        // SAFETY: argument types and order are those of rms_norm_bwd_w_* in kernels.cu.
        unsafe { b.launch(launch_rows(blocks, SOFTMAX_BLOCK)?) }.w()?;
        Ok(f32::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = x.device();
    let func = &typed("rms_norm_bwd_w", x.dtype())?;
    match x.dtype() {
        DType::BF16 => run::<bf16>(dev, func, (x, xl), (dy, dl), (hidden, rows_per_block), eps),
        _ => run::<f32>(dev, func, (x, xl), (dy, dl), (hidden, rows_per_block), eps),
    }
}

/// SwiGLU forward `silu(gate) ⊙ up` (`backward` false: one output of n) or its backward (`dy`
/// given: d gate then d up in one output of 2n), elementwise, all of one type.
pub fn swiglu(
    (gate, gl): (&CudaStorage, &Layout),
    (up, ul): (&CudaStorage, &Layout),
    dy: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (gate, gl): (&CudaStorage, &Layout),
        (up, ul): (&CudaStorage, &Layout),
        dy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let n = gl.shape().elem_count();
        let same =
            ul.shape().elem_count() == n && dy.is_none_or(|(_, dl)| dl.shape().elem_count() == n);
        if !same {
            return Err(error("swiglu: gate, up and gradient sizes differ".into()));
        }
        let g = view::<T>(gate, gl, "swiglu gate")?;
        let u = view::<T>(up, ul, "swiglu up")?;
        let d = dy
            .map(|(s, l)| view::<T>(s, l, "swiglu gradient"))
            .transpose()?;
        let outputs = if d.is_some() { 2 * n } else { n };
        // SAFETY: the grid-stride loop writes every element (both halves backward).
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(outputs)? };
        let len = n as i64;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&g).arg(&u);
        if let Some(d) = &d {
            b.arg(d);
        }
        b.arg(&mut out).arg(&len);
        // SAFETY: argument types and order are those of swiglu_{fwd,bwd}_* in kernels.cu.
        unsafe { b.launch(elementwise(n)) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = gate.device();
    let name = if dy.is_some() {
        "swiglu_bwd"
    } else {
        "swiglu_fwd"
    };
    let func = &typed(name, gate.dtype())?;
    match gate.dtype() {
        DType::BF16 => run::<bf16>(dev, func, (gate, gl), (up, ul), dy),
        _ => run::<f32>(dev, func, (gate, gl), (up, ul), dy),
    }
}

/// The rotary embedding of x [B, H, T, D] with tables cos, sin [B, 1, T, D] (all of one type),
/// or with `backward` the transpose of that map applied to x (then a gradient).
pub fn rope(
    (x, xl): (&CudaStorage, &Layout),
    (cos, cl): (&CudaStorage, &Layout),
    (sin, sl): (&CudaStorage, &Layout),
    (heads, positions, dim): (usize, usize, usize),
    backward: bool,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: &str,
        (x, xl): (&CudaStorage, &Layout),
        (cos, cl): (&CudaStorage, &Layout),
        (sin, sl): (&CudaStorage, &Layout),
        (heads, positions, dim): (usize, usize, usize),
    ) -> Result<CudaStorage> {
        let n = xl.shape().elem_count();
        let table = cl.shape().elem_count();
        if dim == 0 || dim % 2 != 0 || table * heads != n || sl.shape().elem_count() != table {
            return Err(error(format!(
                "rope: {n} values, tables of {table}, {heads} heads of dimension {dim}"
            )));
        }
        let xv = view::<T>(x, xl, "rope x")?;
        let cv = view::<T>(cos, cl, "rope cos")?;
        let sv = view::<T>(sin, sl, "rope sin")?;
        // SAFETY: the grid-stride loop writes every element.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
        let (h, t, d) = (
            int(heads, "heads")?,
            int(positions, "positions")?,
            int(dim, "dim")?,
        );
        let len = n as i64;
        let func = dev.get_or_load_custom_func(func, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&cv).arg(&sv).arg(&mut out);
        b.arg(&h).arg(&t).arg(&d).arg(&len);
        // SAFETY: argument types and order are those of rope_{fwd,bwd}_* in kernels.cu.
        unsafe { b.launch(elementwise(n)) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = x.device();
    let func = &typed(if backward { "rope_bwd" } else { "rope_fwd" }, x.dtype())?;
    let args = ((x, xl), (cos, cl), (sin, sl), (heads, positions, dim));
    match x.dtype() {
        DType::BF16 => run::<bf16>(dev, func, args.0, args.1, args.2, args.3),
        _ => run::<f32>(dev, func, args.0, args.1, args.2, args.3),
    }
}

fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(ELEMENTWISE_BLOCK as usize)
        .clamp(1, ELEMENTWISE_GRID);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The mutable f32 elements of a storage (contiguous, all of its layout).
fn f32_mut<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| error(format!("{what} must be contiguous")))?;
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(start..end))
}

/// `m ← beta·m + one_minus_beta·g` (or `g²` with `squared`), in place.
pub fn adamw_moment(
    (m, ml): (&mut CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    (beta, one_minus_beta, squared): (f32, f32, bool),
) -> Result<()> {
    let n = ml.shape().elem_count();
    if gl.shape().elem_count() != n {
        return Err(error(
            "adamw moment: gradient and moment sizes differ".into(),
        ));
    }
    let dev = m.device().clone();
    let func = dev.get_or_load_custom_func("adamw_moment_f32", MODULE, PTX)?;
    let g = view::<f32>(g, gl, "adamw gradient")?;
    let mut m = f32_mut(m, ml, "adamw moment")?;
    let (len, squared) = (n as i64, i32::from(squared));
    let mut b = func.builder();
    b.arg(&mut m)
        .arg(&g)
        .arg(&len)
        .arg(&beta)
        .arg(&one_minus_beta)
        .arg(&squared);
    // SAFETY: argument types and order are those of adamw_moment_f32 in kernels.cu.
    unsafe { b.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// `w ← w·decay − step · m / (√v · inv_bias2_sqrt + epsilon)`, in place.
pub fn adamw_apply(
    (w, wl): (&mut CudaStorage, &Layout),
    (m, ml): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    [decay, step, inv_bias2_sqrt, epsilon]: [f32; 4],
) -> Result<()> {
    let n = wl.shape().elem_count();
    if ml.shape().elem_count() != n || vl.shape().elem_count() != n {
        return Err(error("adamw update: weight and moment sizes differ".into()));
    }
    let dev = w.device().clone();
    let func = dev.get_or_load_custom_func("adamw_apply_f32", MODULE, PTX)?;
    let m = view::<f32>(m, ml, "adamw first moment")?;
    let v = view::<f32>(v, vl, "adamw second moment")?;
    let mut w = f32_mut(w, wl, "adamw weight")?;
    let len = n as i64;
    let mut b = func.builder();
    b.arg(&mut w).arg(&m).arg(&v).arg(&len);
    b.arg(&decay).arg(&step).arg(&inv_bias2_sqrt).arg(&epsilon);
    // SAFETY: argument types and order are those of adamw_apply_f32 in kernels.cu.
    unsafe { b.launch(elementwise(n)) }.w()?;
    Ok(())
}
