//! Launches of the CUDA kernels in `cuda/kernels.cu` (PTX built by build.rs): the CUDA forward
//! passes of [`super::fused_softmax`]'s masked softmax and its backward, of
//! [`super::token_logprob`]'s next-token log-probability and its backward, of the optimizer's
//! in-place AdamW updates, of [`super::rms_norm_gpu`]'s RMSNorm and [`super::elementwise_gpu`]'s
//! SwiGLU and rotary embedding each way, of [`super::embedding_gpu`]'s table gradient, and of
//! greedy decoding's argmax (`infer::sampler::argmax_rows`).
//!
//! Every function checks its sizes, takes contiguous storages (the rotary's input may be
//! strided) and returns a fresh one. The kernels' arithmetic is tested on the CPU under
//! emulation (tests/integration/cuda_emulation.rs), the launches here on a GPU by
//! scripts/gpu/check.sh.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "ferrotune_kernels";
/// Threads per block of the row kernels; must match cuda/kernels.cu.
const SOFTMAX_BLOCK: u32 = 256;
const VOCAB_BLOCK: u32 = 1024;
/// Threads per block and the most blocks of the elementwise (grid-stride) kernels.
const ELEMENTWISE_BLOCK: u32 = 256;
const ELEMENTWISE_GRID: usize = 4096;

/// Runs `$body` with `$t` the element type of `$dtype` (f32 or bf16) and `$name` the matching
/// kernel's name (`{base}_f32` or `{base}_bf16`); any other type is an error.
macro_rules! by_type {
    ($dtype:expr, $base:expr, |$t:ident, $name:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                let $name = format!("{}_f32", $base);
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                let $name = format!("{}_bf16", $base);
                $body
            }
            other => Err(error(format!("{}: no kernel for {other:?}", $base))),
        }
    };
}

fn error(message: String) -> candle_core::Error {
    candle_core::Error::Cuda(message.into())
}

fn check(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(error(message()))
    }
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

/// [`view`] for an in-place op's f32 destination.
fn f32_mut<'a>(s: &'a mut CudaStorage, l: &Layout, what: &str) -> Result<CudaViewMut<'a, f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| error(format!("{what} must be contiguous")))?;
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(start..end))
}

/// A fresh output of `n` elements: every kernel below writes all of its output.
fn output<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: uninitialised device memory, written in full by the launch that follows (each
    // kernel's comment in kernels.cu says which threads write what).
    unsafe { dev.alloc::<T>(n) }
}

/// `softmax(scale · scores + mask)` per row: scores [B, H, T, S], mask [B, 1, T, S] of the
/// same type (f32 or bf16).
pub fn masked_softmax_fwd(
    (scores, sl): (&CudaStorage, &Layout),
    (mask, ml): (&CudaStorage, &Layout),
    (heads, queries, keys): (usize, usize, usize),
    scale: f32,
) -> Result<CudaStorage> {
    let n = sl.shape().elem_count();
    let masks = ml.shape().elem_count();
    check(keys > 0 && n % keys == 0 && masks * heads == n, || {
        format!("masked_softmax: {n} scores, {masks} mask values, {heads} heads of {keys} keys")
    })?;
    let dev = scores.device();
    by_type!(scores.dtype(), "masked_softmax_fwd", |T, name| {
        let x = view::<T>(scores, sl, "masked_softmax scores")?;
        let m = view::<T>(mask, ml, "masked_softmax mask")?;
        let mut out = output::<T>(dev, n)?;
        let (h, t, s) = (
            int(heads, "heads")?,
            int(queries, "queries")?,
            int(keys, "keys")?,
        );
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&x)
            .arg(&m)
            .arg(&mut out)
            .arg(&h)
            .arg(&t)
            .arg(&s)
            .arg(&scale);
        // SAFETY: argument types and order are those of masked_softmax_fwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / keys, SOFTMAX_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    })
}

/// `scale · p ⊙ (g − Σ_row p ⊙ g)` per row of `keys`: the masked softmax's backward.
pub fn masked_softmax_bwd(
    (probs, pl): (&CudaStorage, &Layout),
    (grad, gl): (&CudaStorage, &Layout),
    keys: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let n = pl.shape().elem_count();
    let grads = gl.shape().elem_count();
    check(keys > 0 && n % keys == 0 && grads == n, || {
        format!("masked_softmax backward: {n} probabilities, {grads} gradients, rows of {keys}")
    })?;
    check(probs.dtype() == grad.dtype(), || {
        format!(
            "masked_softmax backward: probabilities {:?}, gradient {:?}",
            probs.dtype(),
            grad.dtype()
        )
    })?;
    let dev = probs.device();
    by_type!(probs.dtype(), "masked_softmax_bwd", |T, name| {
        let p = view::<T>(probs, pl, "masked_softmax probs")?;
        let g = view::<T>(grad, gl, "masked_softmax gradient")?;
        let mut out = output::<T>(dev, n)?;
        let s = int(keys, "keys")?;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&p).arg(&g).arg(&mut out).arg(&s).arg(&scale);
        // SAFETY: argument types and order are those of masked_softmax_bwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / keys, SOFTMAX_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    })
}

/// Logits of `rows` rows of `vocab`, or an error (the kernels index by both).
fn check_rows(logits: &Layout, vocab: usize, rows: usize) -> Result<()> {
    let n = logits.shape().elem_count();
    check(vocab > 0 && rows > 0 && n == rows * vocab, || {
        format!("token_logprob: {n} logits are not {rows} rows of {vocab}")
    })
}

/// Per row of logits [N, V]: f32 [2, N] holding `logits[row, target] − logsumexp(row)` (NaN for
/// a target outside the vocabulary), then the logsumexp.
pub fn token_logprob_fwd(
    (logits, ll): (&CudaStorage, &Layout),
    (targets, tl): (&CudaStorage, &Layout),
    vocab: usize,
) -> Result<CudaStorage> {
    let rows = tl.shape().elem_count();
    check_rows(ll, vocab, rows)?;
    let dev = logits.device();
    by_type!(logits.dtype(), "token_logprob_fwd", |T, name| {
        let x = view::<T>(logits, ll, "token_logprob logits")?;
        let t = view::<u32>(targets, tl, "token_logprob targets")?;
        let mut out = output::<f32>(dev, 2 * rows)?;
        let v = int(vocab, "vocabulary")?;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&x).arg(&t).arg(&mut out).arg(&v);
        // SAFETY: argument types and order are those of token_logprob_fwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(rows, VOCAB_BLOCK)?) }.w()?;
        Ok(f32::wrap_cuda_slice(out, dev.clone()))
    })
}

/// d logits [N, V] of the log-probs, from `stats` f32 [2, N]: the log-probs' gradients, then the
/// forward's logsumexps.
pub fn token_logprob_bwd(
    (logits, ll): (&CudaStorage, &Layout),
    (targets, tl): (&CudaStorage, &Layout),
    (stats, sl): (&CudaStorage, &Layout),
    vocab: usize,
) -> Result<CudaStorage> {
    let rows = tl.shape().elem_count();
    check_rows(ll, vocab, rows)?;
    check(sl.shape().elem_count() == 2 * rows, || {
        format!("token_logprob backward: stats for {rows} rows must be [2, {rows}]")
    })?;
    let dev = logits.device();
    by_type!(logits.dtype(), "token_logprob_bwd", |T, name| {
        let x = view::<T>(logits, ll, "token_logprob logits")?;
        let t = view::<u32>(targets, tl, "token_logprob targets")?;
        let st = view::<f32>(stats, sl, "token_logprob stats")?;
        let mut out = output::<T>(dev, rows * vocab)?;
        let v = int(vocab, "vocabulary")?;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&x).arg(&t).arg(&st).arg(&mut out).arg(&v);
        // SAFETY: argument types and order are those of token_logprob_bwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(rows, VOCAB_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    })
}

/// The first maximum's index of every row of x [N, V] (f32 or bf16): u32 [N].
pub fn argmax_rows((x, xl): (&CudaStorage, &Layout), cols: usize) -> Result<CudaStorage> {
    let n = xl.shape().elem_count();
    check(cols > 0 && n > 0 && n % cols == 0, || {
        format!("argmax rows: {n} values in rows of {cols}")
    })?;
    let rows = n / cols;
    let dev = x.device();
    by_type!(x.dtype(), "argmax_rows", |T, name| {
        let v = view::<T>(x, xl, "argmax rows")?;
        let mut out = output::<u32>(dev, rows)?;
        let c = int(cols, "columns")?;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&v).arg(&mut out).arg(&c);
        // SAFETY: argument types and order are those of argmax_rows_* in kernels.cu.
        unsafe { b.launch(launch_rows(rows, VOCAB_BLOCK)?) }.w()?;
        Ok(u32::wrap_cuda_slice(out, dev.clone()))
    })
}

/// RMSNorm forward: y = x · rsqrt(mean(x²) + eps) · w per row of `hidden` (x and w of one type).
pub fn rms_norm_fwd(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    hidden: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let n = xl.shape().elem_count();
    let weights = wl.shape().elem_count();
    check(hidden > 0 && n % hidden == 0 && weights == hidden, || {
        format!("rms_norm: {n} values, weight of {weights}, rows of {hidden}")
    })?;
    let dev = x.device();
    by_type!(x.dtype(), "rms_norm_fwd", |T, name| {
        let xv = view::<T>(x, xl, "rms_norm x")?;
        let wv = view::<T>(w, wl, "rms_norm weight")?;
        let mut out = output::<T>(dev, n)?;
        let h = int(hidden, "hidden size")?;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&mut out).arg(&h).arg(&eps);
        // SAFETY: argument types and order are those of rms_norm_fwd_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / hidden, SOFTMAX_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    })
}

/// RMSNorm's `x` gradient per row: r · (w ⊙ dy − x · r² · Σ w ⊙ dy ⊙ x / H).
pub fn rms_norm_bwd_x(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (dy, dl): (&CudaStorage, &Layout),
    hidden: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let n = xl.shape().elem_count();
    check(
        hidden > 0
            && n % hidden == 0
            && dl.shape().elem_count() == n
            && wl.shape().elem_count() == hidden,
        || "rms_norm backward: x, weight and gradient sizes differ".into(),
    )?;
    let dev = x.device();
    by_type!(x.dtype(), "rms_norm_bwd_x", |T, name| {
        let xv = view::<T>(x, xl, "rms_norm x")?;
        let wv = view::<T>(w, wl, "rms_norm weight")?;
        let gv = view::<T>(dy, dl, "rms_norm gradient")?;
        let mut out = output::<T>(dev, n)?;
        let h = int(hidden, "hidden size")?;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&gv).arg(&mut out).arg(&h).arg(&eps);
        // SAFETY: argument types and order are those of rms_norm_bwd_x_* in kernels.cu.
        unsafe { b.launch(launch_rows(n / hidden, SOFTMAX_BLOCK)?) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    })
}

/// RMSNorm's weight gradient in parts: f32 [ceil(rows / rows_per_part), hidden], part b the sum
/// of dy ⊙ x · r over its rows. `hidden` at most RMS_MAX_HIDDEN (8192).
pub fn rms_norm_bwd_w(
    (x, xl): (&CudaStorage, &Layout),
    (dy, dl): (&CudaStorage, &Layout),
    (hidden, rows_per_part): (usize, usize),
    eps: f32,
) -> Result<CudaStorage> {
    let n = xl.shape().elem_count();
    check(
        (1..=super::rms_norm_gpu::MAX_HIDDEN).contains(&hidden)
            && n % hidden == 0
            && dl.shape().elem_count() == n
            && rows_per_part > 0,
        || format!("rms_norm backward: {n} values in rows of {hidden} (at most 8192)"),
    )?;
    let rows = n / hidden;
    let parts = rows.div_ceil(rows_per_part);
    let dev = x.device();
    by_type!(x.dtype(), "rms_norm_bwd_w", |T, name| {
        let xv = view::<T>(x, xl, "rms_norm x")?;
        let gv = view::<T>(dy, dl, "rms_norm gradient")?;
        let mut out = output::<f32>(dev, parts * hidden)?;
        let (r, h) = (int(rows, "rows")?, int(hidden, "hidden size")?);
        let per = int(rows_per_part, "rows per part")?;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv)
            .arg(&gv)
            .arg(&mut out)
            .arg(&r)
            .arg(&h)
            .arg(&per)
            .arg(&eps);
        // SAFETY: argument types and order are those of rms_norm_bwd_w_* in kernels.cu.
        unsafe { b.launch(launch_rows(parts, SOFTMAX_BLOCK)?) }.w()?;
        Ok(f32::wrap_cuda_slice(out, dev.clone()))
    })
}

/// SwiGLU forward `silu(gate) ⊙ up` (no `dy`: an output of n) or its backward (`dy` given:
/// d gate then d up in one output of 2n), elementwise, all of one type.
pub fn swiglu(
    (gate, gl): (&CudaStorage, &Layout),
    (up, ul): (&CudaStorage, &Layout),
    dy: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let n = gl.shape().elem_count();
    let same =
        ul.shape().elem_count() == n && dy.is_none_or(|(_, dl)| dl.shape().elem_count() == n);
    check(n > 0 && same, || {
        "swiglu: gate, up and gradient sizes differ".into()
    })?;
    let dev = gate.device();
    let base = if dy.is_some() {
        "swiglu_bwd"
    } else {
        "swiglu_fwd"
    };
    by_type!(gate.dtype(), base, |T, name| {
        let g = view::<T>(gate, gl, "swiglu gate")?;
        let u = view::<T>(up, ul, "swiglu up")?;
        let d = dy
            .map(|(s, l)| view::<T>(s, l, "swiglu gradient"))
            .transpose()?;
        let mut out = output::<T>(dev, if d.is_some() { 2 * n } else { n })?;
        let len = n as i64;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&g).arg(&u);
        if let Some(d) = &d {
            b.arg(d);
        }
        b.arg(&mut out).arg(&len);
        // SAFETY: argument types and order are those of swiglu_{fwd,bwd}_* in kernels.cu.
        unsafe { b.launch(elementwise(n)) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    })
}

/// The rotary embedding of x [B, H, T, D] (any strides, unit stride in D) with tables cos, sin
/// [B, 1, T, D] (contiguous, all of one type), or with `transpose` the transposed map (the
/// backward, applied to a gradient). The output is contiguous.
pub fn rope(
    (x, xl): (&CudaStorage, &Layout),
    (cos, cl): (&CudaStorage, &Layout),
    (sin, sl): (&CudaStorage, &Layout),
    transpose: bool,
) -> Result<CudaStorage> {
    let (dims, strides) = (xl.dims(), xl.stride());
    check(dims.len() == 4 && strides[3] == 1, || {
        format!("rope: x {dims:?} with strides {strides:?} is not [B, H, T, D] with unit D")
    })?;
    let (b_, h_, t_, d_) = (dims[0], dims[1], dims[2], dims[3]);
    let n = b_ * h_ * t_ * d_;
    let table = b_ * t_ * d_;
    check(
        n > 0
            && d_ % 2 == 0
            && cl.shape().elem_count() == table
            && sl.shape().elem_count() == table,
        || format!("rope: x {dims:?}, tables of {}", cl.shape().elem_count()),
    )?;
    // x's last element, from its first: the view must hold it, and 32-bit indices must reach it.
    let span = (b_ - 1) * strides[0] + (h_ - 1) * strides[1] + (t_ - 1) * strides[2] + d_;
    let small = i32::from(span.max(n) < i32::MAX as usize);
    let dev = x.device();
    by_type!(x.dtype(), "rope", |T, name| {
        let all = x.as_cuda_slice::<T>()?;
        let start = xl.start_offset();
        check(start + span <= all.len(), || {
            "rope: x's strides reach past its storage".into()
        })?;
        let xv = all.slice(start..start + span);
        let cv = view::<T>(cos, cl, "rope cos")?;
        let sv = view::<T>(sin, sl, "rope sin")?;
        let mut out = output::<T>(dev, n)?;
        let (h, t, d) = (int(h_, "heads")?, int(t_, "positions")?, int(d_, "dim")?);
        let pairs = (n / 2) as i64;
        let [sb, sh, st] = [strides[0], strides[1], strides[2]].map(|s| s as i64);
        let transpose = i32::from(transpose);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&cv).arg(&sv).arg(&mut out);
        b.arg(&h).arg(&t).arg(&d).arg(&pairs);
        b.arg(&sb).arg(&sh).arg(&st).arg(&transpose).arg(&small);
        // SAFETY: argument types and order are those of rope_* in kernels.cu.
        unsafe { b.launch(elementwise(n / 2)) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    })
}

/// The embedding table's gradient [vocab, width] from the lookup's gradient [N, width] (f32 or
/// bf16, the table's type): `segments` are the positions grouped by token
/// ([`super::embedding_gpu::Segments`]); rows of tokens no position looked up are zero.
pub fn embedding_bwd(
    (grad, gl): (&CudaStorage, &Layout),
    (ids, starts, order): (&[u32], &[u32], &[u32]),
    (vocab, width): (usize, usize),
) -> Result<CudaStorage> {
    let n = gl.shape().elem_count();
    check(
        width > 0
            && n == order.len() * width
            && starts.len() == ids.len() + 1
            && starts
                .last()
                .is_some_and(|&end| end as usize == order.len())
            && starts.windows(2).all(|w| w[0] <= w[1])
            && ids.iter().all(|&id| (id as usize) < vocab)
            && order.iter().all(|&p| (p as usize) < order.len()),
        || format!("embedding backward: {n} gradients in rows of {width}, segments do not fit"),
    )?;
    let dev = grad.device();
    by_type!(grad.dtype(), "embedding_bwd", |T, name| {
        let g = view::<T>(grad, gl, "embedding gradient")?;
        let (ids, starts, order) = (
            dev.clone_htod(ids)?,
            dev.clone_htod(starts)?,
            dev.clone_htod(order)?,
        );
        let mut out = dev.alloc_zeros::<T>(vocab * width)?;
        let pairs = ((starts.len() - 1) * width) as i64;
        let w = width as i64;
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&g).arg(&order).arg(&starts).arg(&ids).arg(&mut out);
        b.arg(&pairs).arg(&w);
        // SAFETY: argument types and order are those of embedding_bwd_* in kernels.cu; every
        // index the kernel reads was checked above.
        if pairs > 0 {
            unsafe { b.launch(elementwise(pairs as usize)) }.w()?;
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    })
}

/// `m ← beta·m + one_minus_beta·g` (or `g²` with `squared`), in place.
pub fn adamw_moment(
    (m, ml): (&mut CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    (beta, one_minus_beta, squared): (f32, f32, bool),
) -> Result<()> {
    let n = ml.shape().elem_count();
    check(gl.shape().elem_count() == n, || {
        "adamw moment: gradient and moment sizes differ".into()
    })?;
    let dev = m.device().clone();
    let func = dev.get_or_load_custom_func("adamw_moment_f32", MODULE, PTX)?;
    let g = view::<f32>(g, gl, "adamw gradient")?;
    let mut m = f32_mut(m, ml, "adamw moment")?;
    let (len, squared) = (n as i64, i32::from(squared));
    let mut b = func.builder();
    b.arg(&mut m).arg(&g).arg(&len);
    b.arg(&beta).arg(&one_minus_beta).arg(&squared);
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
    check(
        ml.shape().elem_count() == n && vl.shape().elem_count() == n,
        || "adamw update: weight and moment sizes differ".into(),
    )?;
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
