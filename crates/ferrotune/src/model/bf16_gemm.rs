//! CPU matrix product with bf16 inputs and f32 accumulation: `C[M,N] (+)= A[M,K] · B[K,N]`,
//! every operand f32 in memory, A and B rounded to bf16 (round to nearest even) on the way in.
//!
//! This is what PyTorch's CPU bf16 autocast computes for a linear layer, and on a CPU with
//! AVX-512 BF16 it runs at about twice the f32 rate: one `vdpbf16ps` multiplies 32 bf16 pairs
//! and adds them into 16 f32 lanes, where an f32 FMA does 16.
//!
//! # Kernel design
//!
//! - **Operands.** Each of A and B is described by where its element (index, depth) lives:
//!   [`Operand::DepthInner`] (the depth is contiguous, e.g. `x [tokens, K]` or a weight
//!   `[N, K]` used as `wᵀ`) or [`Operand::DepthOuter`] (the index is contiguous, e.g. a weight
//!   used as is, or `dyᵀ`). The three products of a linear layer (`y = x·wᵀ`, `dx = dy·w`,
//!   `dw = dyᵀ·x`) are all one of these, so no transpose is ever materialised.
//! - **Packing.** `vdpbf16ps` wants pairs of consecutive depths side by side in one 32-bit
//!   lane. Both operands are packed once per product into panels of `MR` (A) or `NR` (B)
//!   indices; inside a panel, depth pair `p` of index `w` is the u32 at `p * width + w`
//!   (low half = even depth), zero-padded past the matrix edge and past an odd K. Packing
//!   converts with `vcvtne2ps2bf16` (RNE), and is O(MK + NK) against O(MNK) for the product.
//!   A depth-inner source gives 16 pairs of one index per conversion; 16 indices' worth are
//!   transposed in registers so each pair row of the panel is one vector store. A depth-outer
//!   source gives one pair row for 16 indices at once, interleaved with a single 16-bit
//!   permute, and is walked row by row across all panels (whole cache lines, read once). A B
//!   used by several products is packed once ([`PackedB`]): the LM head across the chunks of
//!   a pass, and each weight across decode steps (the decoder keeps its weights' panels for
//!   `forward_step`, half the bytes of the f32 weights).
//! - **Microkernel.** `MR × NR = 12 × 32` f32 accumulators in 24 of the 32 zmm registers: per
//!   depth pair, two B vectors are loaded and each of the 12 A pairs is broadcast from memory
//!   into two `vdpbf16ps`. 24 independent accumulators cover the instruction's latency. The
//!   kernel is generic in its row count, so a short last panel (decode's single row) does
//!   only its own rows; a narrow last column panel goes through a scratch tile.
//! - **Blocking.** The depth is walked in blocks of `KC_PAIRS` pairs, so one B micro-panel
//!   (`KC_PAIRS · NR · 4` bytes = 16 KB) stays in L1 while every A micro-panel of the block
//!   streams past it from L2; C tiles are loaded and stored once per depth block.
//! - **Threads.** C is cut into blocks of whole panels; `threads` workers of rayon's pool take
//!   blocks from a shared counter (a descheduled worker on a shared machine delays one
//!   block, not a fixed share). Packing is spread the same way, in tasks of whole panels
//!   (depth-inner sources) or of 16 depth pairs across every panel (depth-outer sources).
//!   `threads <= 1` runs on the calling thread alone.
//! - **Fallback.** Without AVX-512 BF16 the inputs are rounded to bf16 (as f32 values) and
//!   multiplied by the `gemm` crate in f32: the products of bf16 values are exact in f32, so
//!   the result differs from the AVX-512 path only in the order of the additions (and in
//!   denormal inputs, which `vdpbf16ps` treats as zero).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Rows of A per microkernel tile.
const MR: usize = 12;
/// Columns of B per microkernel tile (two zmm registers of f32).
const NR: usize = 32;
/// Depth pairs per cache block.
const KC_PAIRS: usize = 128;

/// How one operand is stored. For A the index runs over the M rows, for B over the N columns;
/// the depth runs over K.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    /// Element (index, depth) at `data[index * ld + depth]`.
    DepthInner { data: &'a [f32], ld: usize },
    /// Element (index, depth) at `data[depth * ld + index]`.
    DepthOuter { data: &'a [f32], ld: usize },
}

impl Operand<'_> {
    /// Panics unless every element of a `count × depth` operand lies inside `data`: the
    /// packers read through raw pointers on the strength of this check.
    fn check(&self, count: usize, depth: usize, what: &str) {
        let (data, ld, outer, inner) = match *self {
            Operand::DepthInner { data, ld } => (data, ld, count, depth),
            Operand::DepthOuter { data, ld } => (data, ld, depth, count),
        };
        if outer == 0 || inner == 0 {
            return;
        }
        assert!(
            ld >= inner && (outer - 1) * ld + inner <= data.len(),
            "bf16 gemm: operand {what} ({count} x {depth}, ld {ld}) does not fit its {} values",
            data.len()
        );
    }
}

/// Which implementation runs (tests force each one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Avx512,
    Fallback,
}

fn detected_path() -> Path {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            return Path::Avx512;
        }
    }
    Path::Fallback
}

/// Whether this CPU runs the native bf16 kernel (else the f32 fallback).
pub fn native_bf16() -> bool {
    detected_path() == Path::Avx512
}

/// Products smaller than this many multiply-adds, whose B is also small enough to stay in
/// cache, run on the calling thread: handing half of a few microseconds of work to another
/// thread and waiting for it costs more than it saves (decode of a small model is all such
/// products). A large B is split even at one row, where the cores' combined bandwidth pays.
const SERIAL_MACS: usize = 1 << 20;
const SERIAL_B_ELEMENTS: usize = 1 << 19;

/// The workers a product of these dimensions gets out of `threads`, for its packing and its
/// tiles (results do not depend on it: every tile sums its depth blocks in the same order
/// however the tiles are shared).
fn threads_for((m, n, k): (usize, usize, usize), threads: usize) -> usize {
    if m * n * k < SERIAL_MACS && n * k < SERIAL_B_ELEMENTS {
        1
    } else {
        threads
    }
}

/// `c[m×n] = (accumulate ? c : 0) + bf16(a)[m×k] · bf16(b)[k×n]`, accumulated in f32. `c` is
/// row-major with `n` columns. `threads` workers share the work (1: the calling thread).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    matmul_on(detected_path(), (m, n, k), a, b, c, accumulate, threads)
}

#[allow(clippy::too_many_arguments)]
fn matmul_on(
    path: Path,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    let packed = PackedB::new_on(path, b, (n, k), threads_for((m, n, k), threads));
    matmul_packed(m, a, &packed, c, accumulate, threads);
}

/// B of `C = A · B` packed once for several products (the LM head across the chunks of one
/// pass): bf16 panels on the native path, rounded f32 values on the fallback.
pub struct PackedB {
    n: usize,
    k: usize,
    data: PackedData,
}

enum PackedData {
    #[cfg(target_arch = "x86_64")]
    Native(Aligned),
    Rounded {
        values: Vec<f32>,
        inner: bool,
        ld: usize,
    },
}

impl PackedB {
    /// Packs the `n × k` operand `b` (as in [`matmul`]) with `threads` workers.
    pub fn new(b: Operand, (n, k): (usize, usize), threads: usize) -> Self {
        Self::new_on(detected_path(), b, (n, k), threads)
    }

    fn new_on(path: Path, b: Operand, (n, k): (usize, usize), threads: usize) -> Self {
        b.check(n, k, "B");
        let data = match path {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => PackedData::Native(avx512::pack_b(b, n, k, threads)),
            _ => {
                let (values, inner, ld) = rounded(b);
                PackedData::Rounded { values, inner, ld }
            }
        };
        PackedB { n, k, data }
    }
}

/// `c[m×n] = (accumulate ? c : 0) + bf16(a)[m×k] · b`, with `b` packed by [`PackedB::new`]
/// (`n` and `k` are its dimensions).
pub fn matmul_packed(
    m: usize,
    a: Operand,
    b: &PackedB,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    // SAFETY: `MaybeUninit<f32>` has f32's layout, every element is initialised (so
    // `accumulate` may read them), and only initialised values are written back.
    unsafe {
        let c = &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]);
        matmul_packed_into(m, a, b, c, accumulate, threads)
    }
}

/// `bf16(a)[m×k] · bf16(b)[k×n]` into a new row-major vector: [`matmul`] without first
/// zero-filling a destination that the product overwrites anyway.
pub fn matmul_to_vec(
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    threads: usize,
) -> Vec<f32> {
    let packed = PackedB::new(b, (n, k), threads_for((m, n, k), threads));
    matmul_packed_to_vec(m, a, &packed, threads)
}

/// `c[m×n] = bf16(a)[m×k] · bf16(b)[k×n]` into a destination that may be uninitialised (a
/// new vector's spare capacity): on return its first `m × n` elements are initialised.
pub fn matmul_uninit(
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: &mut [MaybeUninit<f32>],
    threads: usize,
) {
    let packed = PackedB::new(b, (n, k), threads_for((m, n, k), threads));
    // SAFETY: without `accumulate` nothing in `c` is read before it is written.
    unsafe { matmul_packed_into(m, a, &packed, c, false, threads) }
}

/// [`matmul_packed`] into a new row-major `m × n` vector (no zero fill first).
pub fn matmul_packed_to_vec(m: usize, a: Operand, b: &PackedB, threads: usize) -> Vec<f32> {
    let len = m * b.n;
    let mut c = Vec::with_capacity(len);
    // SAFETY: without `accumulate` the product writes every one of the `len` elements before
    // `set_len` exposes them, and reads none of them first.
    unsafe {
        matmul_packed_into(m, a, b, &mut c.spare_capacity_mut()[..len], false, threads);
        c.set_len(len);
    }
    c
}

/// [`matmul_packed`] on a destination that may be uninitialised: on return all `m × n`
/// elements of `c` are initialised.
///
/// # Safety
/// With `accumulate`, the first `m × n` elements of `c` must be initialised.
unsafe fn matmul_packed_into(
    m: usize,
    a: Operand,
    b: &PackedB,
    c: &mut [MaybeUninit<f32>],
    accumulate: bool,
    threads: usize,
) {
    let (n, k) = (b.n, b.k);
    a.check(m, k, "A");
    assert!(c.len() >= m * n, "bf16 gemm: destination too small");
    let threads = threads_for((m, n, k), threads);
    let c = &mut c[..m * n];
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(MaybeUninit::new(0.0));
        }
        return;
    }
    match &b.data {
        #[cfg(target_arch = "x86_64")]
        PackedData::Native(panels) => {
            // SAFETY: native panels exist only on a CPU with the features (pack_b checks),
            // packed for this n and k; A's extent is checked above. The kernel reads C only
            // with `accumulate` (initialised by the caller's promise) or after its own tile
            // stored it (a later depth block).
            unsafe {
                avx512::matmul_packed(
                    (m, n, k),
                    a,
                    panels,
                    c.as_mut_ptr().cast(),
                    accumulate,
                    threads,
                )
            }
        }
        PackedData::Rounded { values, inner, ld } => {
            if !accumulate {
                c.fill(MaybeUninit::new(0.0));
            }
            // SAFETY: initialised, by the caller (accumulate) or just above.
            let c = unsafe { &mut *(c as *mut [MaybeUninit<f32>] as *mut [f32]) };
            let (a, a_inner, lda) = rounded(a);
            let a = as_operand(&a, a_inner, lda);
            let b = as_operand(values, *inner, *ld);
            matmul_f32((m, n, k), a, b, c, accumulate, threads);
        }
    }
}

fn as_operand(data: &[f32], inner: bool, ld: usize) -> Operand<'_> {
    if inner {
        Operand::DepthInner { data, ld }
    } else {
        Operand::DepthOuter { data, ld }
    }
}

/// Rounds to the nearest bf16 (ties to even), returned as the f32 it stands for.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn rounded(op: Operand) -> (Vec<f32>, bool, usize) {
    match op {
        Operand::DepthInner { data, ld } => {
            (data.iter().map(|&x| round_bf16(x)).collect(), true, ld)
        }
        Operand::DepthOuter { data, ld } => {
            (data.iter().map(|&x| round_bf16(x)).collect(), false, ld)
        }
    }
}

/// The same product in plain f32 through the `gemm` crate (no rounding): the fallback's
/// engine, and the baseline the benchmark compares against.
pub fn matmul_f32(
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    a.check(m, k, "A");
    b.check(n, k, "B");
    assert!(c.len() >= m * n, "f32 gemm: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    // gemm's strides: lhs (row = index, col = depth), rhs (row = depth, col = index).
    let (a_ptr, a_cs, a_rs) = match a {
        Operand::DepthInner { data, ld } => (data.as_ptr(), 1, ld as isize),
        Operand::DepthOuter { data, ld } => (data.as_ptr(), ld as isize, 1),
    };
    let (b_ptr, b_cs, b_rs) = match b {
        Operand::DepthInner { data, ld } => (data.as_ptr(), ld as isize, 1),
        Operand::DepthOuter { data, ld } => (data.as_ptr(), 1, ld as isize),
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `check` above bounds every element the strides address; `c` holds m×n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate && k > 0,
            a_ptr,
            a_cs,
            a_rs,
            b_ptr,
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Runs `task(0..tasks)` on up to `threads` workers that take tasks from a shared counter.
fn for_each_task(threads: usize, tasks: usize, task: impl Fn(usize) + Sync) {
    let workers = threads.min(tasks);
    if workers <= 1 {
        (0..tasks).for_each(task);
        return;
    }
    let next = AtomicUsize::new(0);
    rayon::scope(|s| {
        for _ in 0..workers {
            s.spawn(|_| loop {
                let t = next.fetch_add(1, Ordering::Relaxed);
                if t >= tasks {
                    break;
                }
                task(t);
            });
        }
    });
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every user writes only the part of the buffer its task owns.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Through a method, so closures capture the wrapper (Sync), not its raw field.
    fn get(self) -> *mut T {
        self.0
    }
}

/// A u32 buffer whose usable part starts on a 64-byte boundary (whole zmm loads never
/// straddle cache lines). Its contents start uninitialised: the packers write every element,
/// padding included, so no zero fill (and no first-touch page zeroing) is paid for.
struct Aligned {
    buf: Vec<MaybeUninit<u32>>,
    start: usize,
}

impl Aligned {
    fn uninit(len: usize) -> Self {
        let mut buf: Vec<MaybeUninit<u32>> = Vec::with_capacity(len + 16);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { buf.set_len(len + 16) };
        let start = buf.as_ptr().align_offset(64).min(16);
        Aligned { buf, start }
    }

    fn ptr(&self) -> *const u32 {
        self.buf[self.start..].as_ptr().cast()
    }

    fn ptr_mut(&mut self) -> *mut u32 {
        self.buf[self.start..].as_mut_ptr().cast()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::fast_exp::lanes;
    use super::*;
    use std::arch::x86_64::*;

    /// Packs `count` indices of `op` (depth `depth`) into panels of `width`: see the module
    /// header for the layout. Returns the buffer; panel `p` starts at `p * width * pairs`.
    /// Every element is written, the zero padding included.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack(
        op: Operand,
        count: usize,
        depth: usize,
        width: usize,
        threads: usize,
    ) -> Aligned {
        let pairs = depth.div_ceil(2);
        let panels = count.div_ceil(width);
        let panel_len = width * pairs;
        let mut out = Aligned::uninit(panels * panel_len);
        let dst = SharedMut(out.ptr_mut());
        match op {
            Operand::DepthInner { data, ld } => for_each_task(threads, panels, |p| {
                // SAFETY: panel p owns dst[p*panel_len..(p+1)*panel_len]; the source is
                // checked by the caller.
                unsafe {
                    let first = p * width;
                    let live = width.min(count - first);
                    let panel = dst.get().add(p * panel_len);
                    pack_depth_inner(data.as_ptr(), ld, first, live, depth, width, panel)
                }
            }),
            // Tasks own a range of depth pairs across every panel, so each reads whole source
            // rows front to back (a task per panel read a narrow strided column of them,
            // each cache line fetched again for the next panel).
            Operand::DepthOuter { data, ld } => {
                const CHUNK: usize = 16;
                for_each_task(threads, pairs.div_ceil(CHUNK), |t| {
                    let rows = t * CHUNK..((t + 1) * CHUNK).min(pairs);
                    // SAFETY: this task alone writes pairs `rows` of every panel; the source
                    // is checked by the caller.
                    unsafe {
                        pack_depth_outer(data.as_ptr(), ld, count, depth, width, rows, dst.get())
                    }
                })
            }
        }
        out
    }

    /// Pairs of 32 consecutive f32 (`n` of them valid, the rest read as zero) as 16 u32 lanes
    /// of two bf16 each, even element in the low half.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs_of(src: *const f32, n: usize) -> __m512i {
        let lo = _mm512_maskz_loadu_ps(lanes(n), src);
        // wrapping: past a short tail this address is never dereferenced (all lanes masked).
        let hi = _mm512_maskz_loadu_ps(lanes(n.saturating_sub(16)), src.wrapping_add(16));
        // The second argument fills the low 16 bf16: lo's elements, in order.
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// Transposes 16 × 16 u32: on return `v[j]` lane `i` holds what `v[i]` lane `j` held.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(v: &mut [__m512i; 16]) {
        // Interleave rows 2i and 2i+1 by 32-bit element within each 128-bit lane.
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        // c[4g + k] lane L: column 4L + k of rows 4g..4g+4.
        let mut c = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let (a01, b01, a23, b23) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            c[4 * g] = _mm512_unpacklo_epi64(a01, a23);
            c[4 * g + 1] = _mm512_unpackhi_epi64(a01, a23);
            c[4 * g + 2] = _mm512_unpacklo_epi64(b01, b23);
            c[4 * g + 3] = _mm512_unpackhi_epi64(b01, b23);
        }
        // Column 4L + k gathers lane L of c[k], c[4 + k], c[8 + k], c[12 + k].
        for k in 0..4 {
            let x0 = _mm512_shuffle_i32x4::<0x44>(c[k], c[4 + k]);
            let x1 = _mm512_shuffle_i32x4::<0xEE>(c[k], c[4 + k]);
            let y0 = _mm512_shuffle_i32x4::<0x44>(c[8 + k], c[12 + k]);
            let y1 = _mm512_shuffle_i32x4::<0xEE>(c[8 + k], c[12 + k]);
            v[k] = _mm512_shuffle_i32x4::<0x88>(x0, y0);
            v[4 + k] = _mm512_shuffle_i32x4::<0xDD>(x0, y0);
            v[8 + k] = _mm512_shuffle_i32x4::<0x88>(x1, y1);
            v[12 + k] = _mm512_shuffle_i32x4::<0xDD>(x1, y1);
        }
    }

    /// Depth-contiguous source, one panel: 16 indices at a time, each row's next 32 depths
    /// are converted to 16 pairs, the 16 × 16 block transposed in registers, and each pair
    /// row of the panel written with one vector store (rows past `live` are zeros).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_depth_inner(
        src: *const f32,
        ld: usize,
        first: usize,
        live: usize,
        depth: usize,
        width: usize,
        panel: *mut u32,
    ) {
        for g in (0..width).step_by(16) {
            let rows = live.saturating_sub(g).min(16);
            let store = lanes(width - g);
            let mut d = 0;
            while d < depth {
                let n = (depth - d).min(32);
                let mut v = [_mm512_setzero_si512(); 16];
                for (r, row) in v.iter_mut().enumerate().take(rows) {
                    *row = pairs_of(src.add((first + g + r) * ld + d), n);
                }
                transpose16(&mut v);
                let p0 = d / 2;
                for (j, row) in v.iter().enumerate().take(n.div_ceil(2)) {
                    _mm512_mask_storeu_epi32(panel.add((p0 + j) * width + g).cast(), store, *row);
                }
                d += 32;
            }
        }
    }

    /// Index-contiguous source, depth pairs `rows` of every panel: for each pair, the even
    /// and odd source rows are converted together 16 indices at a time and interleaved into
    /// 16 pairs (indices past `count` and a missing odd row are zeros).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_depth_outer(
        src: *const f32,
        ld: usize,
        count: usize,
        depth: usize,
        width: usize,
        rows: std::ops::Range<usize>,
        out: *mut u32,
    ) {
        // bf16 j of the even row sits at 16-bit lane j, of the odd row at lane 16 + j.
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        let zero = _mm512_setzero_ps();
        let panel_len = width * depth.div_ceil(2);
        for p in rows {
            let even = src.add(2 * p * ld);
            let has_odd = 2 * p + 1 < depth;
            for first in (0..count).step_by(width) {
                let live = width.min(count - first);
                let dst = out.add(first / width * panel_len + p * width);
                for c in (0..width).step_by(16) {
                    // wrapping: with no live lane the address is never dereferenced.
                    let mask = lanes(live.saturating_sub(c));
                    let lo = _mm512_maskz_loadu_ps(mask, even.wrapping_add(first + c));
                    let hi = if has_odd {
                        _mm512_maskz_loadu_ps(mask, even.wrapping_add(ld + first + c))
                    } else {
                        zero
                    };
                    let bf = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                    let pairs = _mm512_permutexvar_epi16(interleave, bf);
                    _mm512_mask_storeu_epi32(dst.add(c).cast(), lanes(width - c), pairs);
                }
            }
        }
    }

    /// One `R × NR` tile (R ≤ MR rows of an A panel) over `pairs` depth pairs:
    /// `c (+)= a_panel · b_panel`. Generic in R so that a short last panel (and decode's single
    /// row) runs only the rows it has.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const R: usize>(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if load {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(r * ldc));
                row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
            }
        }
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_load_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_load_si512(b.add(p * NR + 16).cast()));
            let ap = a.add(p * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), row[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
        }
    }

    /// [`kernel`] for `rows` rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel_rows(
        rows: usize,
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        match rows {
            1 => kernel::<1>(pairs, a, b, c, ldc, load),
            2 => kernel::<2>(pairs, a, b, c, ldc, load),
            3 => kernel::<3>(pairs, a, b, c, ldc, load),
            4 => kernel::<4>(pairs, a, b, c, ldc, load),
            5 => kernel::<5>(pairs, a, b, c, ldc, load),
            6 => kernel::<6>(pairs, a, b, c, ldc, load),
            7 => kernel::<7>(pairs, a, b, c, ldc, load),
            8 => kernel::<8>(pairs, a, b, c, ldc, load),
            9 => kernel::<9>(pairs, a, b, c, ldc, load),
            10 => kernel::<10>(pairs, a, b, c, ldc, load),
            11 => kernel::<11>(pairs, a, b, c, ldc, load),
            _ => kernel::<MR>(pairs, a, b, c, ldc, load),
        }
    }

    /// A tile that may hit the edge of C: full-width tiles run in place (with only the rows
    /// they have), a narrow last column panel through a scratch tile, so the kernel never
    /// reads or writes outside C.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load: bool,
    ) {
        if cols == NR {
            kernel_rows(rows, pairs, a, b, c, ldc, load);
            return;
        }
        let mut scratch = [0f32; MR * NR];
        if load {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(
                    c.add(r * ldc),
                    scratch.as_mut_ptr().add(r * NR),
                    cols,
                );
            }
        }
        kernel_rows(rows, pairs, a, b, scratch.as_mut_ptr(), NR, load);
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * NR), c.add(r * ldc), cols);
        }
    }

    /// B packed into `NR`-wide panels, for [`matmul_packed`].
    pub(super) fn pack_b(b: Operand, n: usize, k: usize, threads: usize) -> Aligned {
        assert!(
            native_bf16(),
            "bf16 gemm: AVX-512 BF16 path on a CPU without it"
        );
        // SAFETY: the CPU has the features (checked above); the caller checked the extents.
        unsafe { pack(b, n, k, NR, threads) }
    }

    /// `c` (row-major `m × n`, writable for the whole call) `= (accumulate ? c : 0) + a · b`;
    /// C is read only with `accumulate` or where this call already stored it.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn matmul_packed(
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b_packed: &Aligned,
        c: *mut f32,
        accumulate: bool,
        threads: usize,
    ) {
        let pairs = k.div_ceil(2);
        let a_packed = pack(a, m, k, MR, threads);
        let (m_panels, n_panels) = (m.div_ceil(MR), n.div_ceil(NR));
        // Blocks of C: as large as keeps A's block in L2, cut smaller until every worker has
        // a few to take (decode has one row of panels).
        let (mut mc, mut nc) = (8, 8);
        let blocks = |mc: usize, nc: usize| m_panels.div_ceil(mc) * n_panels.div_ceil(nc);
        while blocks(mc, nc) < 4 * threads && (mc > 1 || nc > 1) {
            if nc >= mc && nc > 1 {
                nc /= 2;
            } else {
                mc /= 2;
            }
        }
        let m_blocks = m_panels.div_ceil(mc);
        let c_ptr = SharedMut(c);
        let (ap, bp) = (
            SharedMut(a_packed.ptr() as *mut u32),
            SharedMut(b_packed.ptr() as *mut u32),
        );
        for_each_task(threads, blocks(mc, nc), |block| {
            let (ib, jb) = (block % m_blocks, block / m_blocks);
            let i_panels = ib * mc..((ib + 1) * mc).min(m_panels);
            let j_panels = jb * nc..((jb + 1) * nc).min(n_panels);
            // SAFETY: the panels hold `pairs` pairs each; tile (ip, jp) of C belongs to this
            // block alone.
            let run = |ip: usize, jp: usize, p0: usize, kc: usize| unsafe {
                tile(
                    kc,
                    ap.get().add(ip * MR * pairs + p0 * MR),
                    bp.get().add(jp * NR * pairs + p0 * NR),
                    c_ptr.get().add(ip * MR * n + jp * NR),
                    n,
                    MR.min(m - ip * MR),
                    NR.min(n - jp * NR),
                    accumulate || p0 > 0,
                )
            };
            let chunks = || {
                (0..pairs)
                    .step_by(KC_PAIRS)
                    .map(|p0| (p0, KC_PAIRS.min(pairs - p0)))
            };
            if i_panels.len() == 1 {
                // One panel of rows (decode): each B panel is streamed start to end, one
                // sequential read, while A's few rows stay in L1.
                for jp in j_panels {
                    for (p0, kc) in chunks() {
                        run(i_panels.start, jp, p0, kc);
                    }
                }
            } else {
                // Depth chunks outermost: a B tile is reused by every row panel of the block
                // and the block's A chunk by every column panel, both from cache.
                for (p0, kc) in chunks() {
                    for jp in j_panels.clone() {
                        for ip in i_panels.clone() {
                            run(ip, jp, p0, kc);
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The operand stored either way, with a leading dimension wider than needed.
    fn store(values: &[f32], count: usize, depth: usize, inner: bool) -> (Vec<f32>, usize) {
        let ld = if inner { depth + 3 } else { count + 5 };
        let outer = if inner { count } else { depth };
        let mut data = vec![f32::NAN; outer * ld];
        for i in 0..count {
            for d in 0..depth {
                let at = if inner { i * ld + d } else { d * ld + i };
                data[at] = values[i * depth + d];
            }
        }
        (data, ld)
    }

    fn operand(data: &[f32], ld: usize, inner: bool) -> Operand<'_> {
        if inner {
            Operand::DepthInner { data, ld }
        } else {
            Operand::DepthOuter { data, ld }
        }
    }

    /// Checks one product on `path` against f64 sums of the bf16-rounded inputs (tight: only
    /// f32 accumulation error) and against the unrounded f32 product (loose: bf16 rounding).
    fn check(path: Path, (m, n, k): (usize, usize, usize), inners: (bool, bool), seed: u64) {
        let a_vals = random(m * k, seed);
        let b_vals = random(n * k, seed + 1);
        let (a_data, lda) = store(&a_vals, m, k, inners.0);
        let (b_data, ldb) = store(&b_vals, n, k, inners.1);
        let a = operand(&a_data, lda, inners.0);
        let b = operand(&b_data, ldb, inners.1);
        let init = random(m * n, seed + 2);
        for accumulate in [false, true] {
            let mut c = init.clone();
            matmul_on(path, (m, n, k), a, b, &mut c, accumulate, 2);
            for i in 0..m {
                for j in 0..n {
                    let base = if accumulate {
                        init[i * n + j] as f64
                    } else {
                        0.0
                    };
                    let (mut exact, mut plain, mut magnitude) = (base, base, base.abs());
                    for d in 0..k {
                        let (x, y) = (get(&a, i, d), get(&b, j, d));
                        exact += round_bf16(x) as f64 * round_bf16(y) as f64;
                        plain += x as f64 * y as f64;
                        magnitude += (x as f64 * y as f64).abs();
                    }
                    let got = c[i * n + j] as f64;
                    let what =
                        format!("{path:?} {m}x{n}x{k} {inners:?} acc={accumulate} ({i},{j})");
                    // Worst-case f32 summation error of k + 1 terms.
                    let tight = (k + 1) as f64 * f32::EPSILON as f64 * magnitude + 1e-30;
                    assert!((got - exact).abs() <= tight, "{what}: {got} vs {exact}");
                    // Each bf16 input is within 2^-9 relative of the f32 one.
                    assert!(
                        (got - plain).abs() <= 8e-3 * magnitude + 1e-6,
                        "{what}: {got} vs {plain}"
                    );
                }
            }
        }
    }

    fn get(op: &Operand, index: usize, depth: usize) -> f32 {
        match *op {
            Operand::DepthInner { data, ld } => data[index * ld + depth],
            Operand::DepthOuter { data, ld } => data[depth * ld + index],
        }
    }

    fn paths() -> Vec<Path> {
        if native_bf16() {
            vec![Path::Avx512, Path::Fallback]
        } else {
            vec![Path::Fallback]
        }
    }

    #[test]
    fn odd_shapes_match_references_in_every_layout() {
        // Not multiples of MR, NR, 16 or the depth block; K odd; M = 1; one deeper than a block.
        let shapes = [
            (1, 37, 19),
            (13, 33, 7),
            (25, 70, 1),
            (5, 3, 300),
            (30, 65, 258),
            // One row panel (decode's loop order) over several column panels and depth chunks.
            (8, 70, 600),
        ];
        for path in paths() {
            for (s, &shape) in shapes.iter().enumerate() {
                for inners in [(true, true), (true, false), (false, true), (false, false)] {
                    check(path, shape, inners, 10 * s as u64);
                }
            }
        }
    }

    /// Products large enough to be shared (above `SERIAL_MACS`): packing and tiles on two
    /// workers give the reference's values and the one-worker run's bits, in every layout.
    #[test]
    fn shared_products_match_one_worker_bit_for_bit() {
        let (m, n, k) = (70, 97, 300);
        assert_eq!(threads_for((m, n, k), 2), 2);
        for path in paths() {
            for inners in [(true, true), (true, false), (false, true), (false, false)] {
                check(path, (m, n, k), inners, 60);
                let a_vals = random(m * k, 61);
                let b_vals = random(n * k, 62);
                let (a_data, lda) = store(&a_vals, m, k, inners.0);
                let (b_data, ldb) = store(&b_vals, n, k, inners.1);
                let a = operand(&a_data, lda, inners.0);
                let b = operand(&b_data, ldb, inners.1);
                let (mut one, mut two) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_on(path, (m, n, k), a, b, &mut one, false, 1);
                matmul_on(path, (m, n, k), a, b, &mut two, false, 2);
                assert_eq!(one, two, "{path:?} {inners:?}");
            }
        }
    }

    /// One packed B serves several products with different A (and row counts from 1 up,
    /// which run the row-generic kernel), with the same results as packing each time.
    #[test]
    fn packed_b_serves_several_products() {
        let (n, k) = (45, 33);
        let b_vals = random(n * k, 40);
        for path in paths() {
            let b = Operand::DepthOuter {
                data: &b_vals,
                ld: n,
            };
            let packed = PackedB::new_on(path, b, (n, k), 2);
            for (s, m) in [1usize, 5, 12, 14].into_iter().enumerate() {
                let a_vals = random(m * k, 41 + s as u64);
                let a = Operand::DepthInner {
                    data: &a_vals,
                    ld: k,
                };
                let (mut once, mut each) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_packed(m, a, &packed, &mut once, false, 2);
                matmul_on(path, (m, n, k), a, b, &mut each, false, 1);
                assert_eq!(once, each, "{path:?} m={m}");
                check(path, (m, n, k), (true, false), 50 + s as u64);
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (1.0);
        // just above halfway rounds up.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(
            round_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0),
            1.0 + 2.0 / 256.0
        );
        // The native kernel rounds the same way while packing: a 1×1×1 product is exact.
        for path in paths() {
            for x in [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.71234f32, 1e-3] {
                let mut c = [0f32];
                let one = [1f32];
                matmul_on(
                    path,
                    (1, 1, 1),
                    Operand::DepthInner { data: &[x], ld: 1 },
                    Operand::DepthInner { data: &one, ld: 1 },
                    &mut c,
                    false,
                    1,
                );
                assert_eq!(c[0], round_bf16(x), "{path:?} {x}");
            }
        }
    }

    #[test]
    fn empty_depth_gives_zeros_or_keeps_c() {
        for path in paths() {
            let mut c = vec![5f32; 6];
            let a = Operand::DepthInner { data: &[], ld: 0 };
            matmul_on(path, (2, 3, 0), a, a, &mut c, true, 1);
            assert_eq!(c, vec![5.0; 6]);
            matmul_on(path, (2, 3, 0), a, a, &mut c, false, 1);
            assert_eq!(c, vec![0.0; 6]);
        }
    }
}
