//! SwiGLU and the rotary embedding as one op each way on a GPU (cuda/kernels.cu), f32 math over
//! f32 or bf16 storage.
//!
//! Composed on candle's CUDA backend, SwiGLU is two tensors forward and about seven backward
//! (silu's derivative alone is several), and the rotary embedding seven each way (narrows, a
//! negation, a concatenation, two broadcast products, a sum), each a pass over `[B, T, I]` or
//! `[B, H, T, D]` activations. Here each is one elementwise pass: SwiGLU's backward writes both
//! gradients into one buffer (`[2, …]`, split into two views), recomputing the sigmoid; the
//! rotary embedding reads its input through the strides of the decoder's transposed projection
//! (no copy) and its backward applies the transposed rotation.
//!
//! The CPU trains through its own fused f32 ops ([`super::fused_swiglu`], [`super::fused_rope`]);
//! the CPU forwards here run those ops' arithmetic on the values read as f32, so the tests can
//! check these ops' graphs, shapes and gradients against the composed reference (the kernels'
//! own arithmetic is checked under emulation, tests/integration/cuda_emulation.rs).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::fused::{f32_values, stored_like};
use super::fused_rope::Rotary;
use super::fused_swiglu::Swiglu as CpuSwiglu;
use crate::error::Result;

fn kernel_type(t: &Tensor) -> bool {
    crate::device::kernel_dtype(t.dtype())
}

/// Whether [`swiglu`] takes these: one shape, not empty, one f32 or bf16 type.
pub fn swiglu_fits(gate: &Tensor, up: &Tensor) -> bool {
    gate.elem_count() > 0
        && kernel_type(gate)
        && up.dtype() == gate.dtype()
        && up.dims() == gate.dims()
}

/// `silu(gate) ⊙ up`, differentiable in both (see [`swiglu_fits`]).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)?)
}

/// Whether [`rope`] takes these: x [B, H, T, D] not empty with D even, cos and sin
/// [B, 1, T, D], one f32 or bf16 type.
pub fn rope_fits(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    let Ok((b, _, t, d)) = x.dims4() else {
        return false;
    };
    x.elem_count() > 0
        && kernel_type(x)
        && d % 2 == 0
        && [cos, sin]
            .iter()
            .all(|s| s.dtype() == x.dtype() && s.dims() == [b, 1, t, d])
}

/// `x·cos + rotate_half(x)·sin` (the HF convention), differentiable in `x` (see [`rope_fits`]).
/// `x` is read through its strides (the decoder's transposed projection is not copied) unless
/// its last dimension is strided.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, h, t, d) = x.dims4()?;
    let op = Rope(Rotary {
        heads: h,
        positions: t,
        dim: d,
    });
    let x = if x.stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    Ok(x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)?)
}

struct Swiglu;

/// (gate, up, dy) → [2, …]: d gate, then d up.
struct SwigluGrad;

/// The CPU op's arithmetic with libm's exps (the f32 path's).
const CPU_SWIGLU: CpuSwiglu = CpuSwiglu { fast_exp: false };

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu-gpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = CPU_SWIGLU.forward(&f32_values(s1, l1)?, &f32_values(s2, l2)?);
        Ok((stored_like(s1, y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda_ops::swiglu((s1, l1), (s2, l2), None)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = gate.apply_op3_no_bwd(up, &dy.contiguous()?, &SwigluGrad)?;
        Ok((Some(grads.get(0)?), Some(grads.get(1)?)))
    }
}

fn with_leading_two(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    Shape::from(dims)
}

impl CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "swiglu-gpu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u, dy) = (
            f32_values(s1, l1)?,
            f32_values(s2, l2)?,
            f32_values(s3, l3)?,
        );
        let (mut out, d_up) = CPU_SWIGLU.backward(&g, &u, &dy);
        out.extend(d_up);
        Ok((stored_like(s1, out), with_leading_two(l1.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let grads = super::cuda_ops::swiglu((s1, l1), (s2, l2), Some((s3, l3)))?;
        Ok((grads, with_leading_two(l1.shape())))
    }
}

#[derive(Clone, Copy)]
struct Rope(Rotary);

/// The transposed rotation, applied to the output's gradient: (dy, cos, sin) → dx.
struct RopeGrad(Rope);

impl Rope {
    /// The rotation (or with `transpose` its transpose, the backward) of `x` read as f32.
    fn cpu(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
        transpose: bool,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, c, s) = (
            f32_values(s1, l1)?,
            f32_values(s2, l2)?,
            f32_values(s3, l3)?,
        );
        let Rotary {
            heads,
            positions,
            dim,
        } = self.0;
        let y = if transpose {
            self.0.backward(&x, &c, &s)
        } else {
            // `f32_values` gave x in logical order: contiguous [B, H, T, D] strides.
            let strides = [heads * positions * dim, positions * dim, dim];
            self.0.forward(&x, 0, strides, &c, &s)
        };
        Ok((stored_like(s1, y), l1.shape().clone()))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope-gpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), (s3, l3), false)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda_ops::rope((s1, l1), (s2, l2), (s3, l3), false)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &RopeGrad(*self))?;
        Ok((Some(dx), None, None))
    }
}

impl CustomOp3 for RopeGrad {
    fn name(&self) -> &'static str {
        "rope-gpu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.cpu((s1, l1), (s2, l2), (s3, l3), true)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dx = super::cuda_ops::rope((s1, l1), (s2, l2), (s3, l3), true)?;
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::ops;
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::{DType, Var};

    #[test]
    fn swiglu_matches_the_composed_values_and_gradients() {
        let gate = Var::from_tensor(&random(&[2, 3, 40], 21, 8.0)).unwrap();
        let up = Var::from_tensor(&random(&[2, 3, 40], 22, 2.0)).unwrap();
        assert!(swiglu_fits(gate.as_tensor(), up.as_tensor()));
        let got = swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        let want = ops::swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        assert_same_gradients(&got, &want, &[&gate, &up], 23, 1e-5, Some(1e-2));
    }

    /// x as the decoder makes it (a transposed view), tables per batch row.
    #[test]
    fn rope_matches_the_composed_values_and_gradients() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let base = Var::from_tensor(&random(&[b, t, h, d], 31, 2.0)).unwrap();
        let x = base.transpose(1, 2).unwrap();
        let angles = random(&[b, 1, t, d], 32, 3.0);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        assert!(rope_fits(&x, &cos, &sin));
        let got = rope(&x, &cos, &sin).unwrap();
        let want = ops::apply_rotary(&x, &cos, &sin).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        assert_same_gradients(&got, &want, &[&base], 33, 1e-5, Some(1e-2));
    }

    #[test]
    fn bf16_storage_and_what_does_not_fit() {
        let gate = random(&[4, 16], 1, 4.0);
        let up = random(&[4, 16], 2, 1.0);
        let want = ops::swiglu(&gate, &up).unwrap();
        let (g, u) = (
            gate.to_dtype(DType::BF16).unwrap(),
            up.to_dtype(DType::BF16).unwrap(),
        );
        let got = swiglu(&g, &u).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert!(max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want) < 0.05);
        assert!(!swiglu_fits(&gate, &u));
        assert!(!swiglu_fits(&gate, &up.narrow(1, 0, 8).unwrap()));
        let x = random(&[1, 2, 3, 5], 3, 1.0);
        let table = random(&[1, 1, 3, 5], 4, 1.0);
        assert!(!rope_fits(&x, &table, &table), "odd head dimension");
    }
}
