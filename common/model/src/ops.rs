//! Fused CPU kernels with backward passes for the hot spots of the decoder.
//!
//! candle-nn 0.11's fused `rms_norm` and `softmax_last_dim` have no backward
//! pass, and its `rope` has none either, so gradients silently stop at them.
//! Each op here is a candle custom op whose forward runs one pass over
//! contiguous rows (f32 or f64) and whose backward is a second fused op, so
//! training gets both the speed of a fused kernel and correct gradients.
//! Rows are split across the rayon pool that candle's matmul also uses.
//!
//! Not for: GPUs (only `cpu_fwd` is implemented) or half precision.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Rows of work below which a kernel stays on the calling thread, because
/// handing out fewer elements than this to the pool costs more than it saves.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// The float operations the kernels need, implemented for f32 and f64.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn exp(self) -> Self {
        fast_exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

/// Computes `e^x` for f32 in a form the compiler vectorizes (no libm call):
/// Cephes' range reduction `x = n ln 2 + r` and a degree-6 polynomial for
/// `e^r`. Inputs below -87.3 (including -inf) give exactly 0, inputs above
/// 88.72 (where f32 overflows) give +inf, and NaN stays NaN. The test
/// `fast_exp_matches_std` bounds the relative error on [-87, 88.7].
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Written with min/max and selects only, no branches, so loops over
    // slices that call it compile to SIMD code.
    #[allow(clippy::manual_clamp)] // clamp would branch on NaN and block SIMD.
    let clamped = x.max(-87.3).min(88.3);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let scale = f32::from_bits((n_bits.wrapping_add(127) << 23) as u32);
    let result = e_r * scale;
    let result = if x < -87.3 { 0.0 } else { result };
    let result = if x > 88.72 { f32::INFINITY } else { result };
    if x.is_nan() {
        x
    } else {
        result
    }
}

/// Lanes of the manual reductions below; independent partial sums let the
/// compiler vectorize loops that a single running sum would serialize.
const LANES: usize = 8;

/// `max_j scale * row[j]`.
fn scaled_max<T: Real>(row: &[T], scale: T) -> T {
    let mut lanes = [T::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for k in 0..LANES {
            let z = chunk[k] * scale;
            lanes[k] = if z > lanes[k] { z } else { lanes[k] };
        }
    }
    let mut max = T::NEG_INFINITY;
    for z in lanes.into_iter().chain(rest.iter().map(|&v| v * scale)) {
        if z > max {
            max = z;
        }
    }
    max
}

/// `sum_j row[j]`.
fn sum_values<T: Real>(row: &[T]) -> T {
    let mut lanes = [T::ZERO; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for k in 0..LANES {
            lanes[k] += chunk[k];
        }
    }
    let mut sum = T::ZERO;
    for v in lanes.into_iter().chain(rest.iter().copied()) {
        sum += v;
    }
    sum
}

/// `sum_j a[j] * b[j]`.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            lanes[k] += x[k] * y[k];
        }
    }
    let mut sum = T::ZERO;
    for v in lanes {
        sum += v;
    }
    for (&x, &y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!(
            "{op}: input must be contiguous, got strides {:?}",
            layout.stride()
        ),
    }
}

/// Runs `f(row_index, out_row)` over `out` split into rows of `width`,
/// in parallel when the output is large enough.
fn for_each_row<T: Send>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if width == 0 {
        return;
    }
    if out.len() >= PARALLEL_MIN_ELEMENTS {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        out.chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
}

/// Applies `$body` to the f32 or f64 slices of the listed storages, binding
/// them as slices with the given names, and wraps the `Vec` it returns.
macro_rules! float_dispatch {
    ($op:expr, [$($s:ident),+], $body:expr) => {{
        match ($($s,)+) {
            ($(CpuStorage::F32($s),)+) => CpuStorage::F32($body),
            ($(CpuStorage::F64($s),)+) => CpuStorage::F64($body),
            _ => bail!("{}: only f32 and f64 tensors of one dtype are supported", $op),
        }
    }};
}

fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1)
}

// ---------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w over the last dimension.

struct RmsNorm {
    eps: f64,
}

fn rms_norm_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::ZERO; x.len()];
    let (inv_d, eps) = (T::from_f64(1.0 / d as f64), T::from_f64(eps));
    for_each_row(&mut out, d, |i, row| {
        let xr = &x[i * d..(i + 1) * d];
        let r = T::ONE / (dot(xr, xr) * inv_d + eps).sqrt();
        for ((o, &v), &g) in row.iter_mut().zip(xr).zip(w) {
            *o = v * r * g;
        }
    });
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "troupe-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if last_dim(l1) != l2.shape().elem_count() {
            bail!(
                "rms_norm: weight has {} elements for rows of {}",
                l2.shape().elem_count(),
                last_dim(l1)
            );
        }
        let out = float_dispatch!(self.name(), [s1, s2], {
            rms_norm_fwd(
                contiguous(s1, l1, "rms_norm")?,
                contiguous(s2, l2, "rms_norm")?,
                self.eps,
            )
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormBackwardInput { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&grad, &RmsNormBackwardWeight { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBackwardInput {
    eps: f64,
}

impl CustomOp3 for RmsNormBackwardInput {
    fn name(&self) -> &'static str {
        "troupe-rms-norm-backward-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(self.name(), [s1, s2, s3], {
            rms_norm_input_grad(
                contiguous(s1, l1, "rms_norm backward")?,
                contiguous(s2, l2, "rms_norm backward")?,
                contiguous(s3, l3, "rms_norm backward")?,
                self.eps,
            )
        });
        Ok((out, l1.shape().clone()))
    }
}

fn rms_norm_input_grad<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let inv_d = T::from_f64(1.0 / d as f64);
    let eps = T::from_f64(eps);
    let mut dx = vec![T::ZERO; x.len()];
    for_each_row(&mut dx, d, |i, row| {
        let (xr, gr) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
        let (mut sum_sq, mut dot) = (T::ZERO, T::ZERO);
        for j in 0..d {
            sum_sq += xr[j] * xr[j];
            dot += gr[j] * w[j] * xr[j];
        }
        let r = T::ONE / (sum_sq * inv_d + eps).sqrt();
        // d/dx_j of sum_k g_k x_k r w_k is r g_j w_j - (r^3 / d) x_j sum_k g_k w_k x_k.
        let k = r * r * r * dot * inv_d;
        for j in 0..d {
            row[j] = r * gr[j] * w[j] - k * xr[j];
        }
    });
    dx
}

struct RmsNormBackwardWeight {
    eps: f64,
}

fn rms_norm_weight_grad<T: Real>(x: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
    let rows = x.len() / d.max(1);
    let inv_d = T::from_f64(1.0 / d as f64);
    let eps = T::from_f64(eps);
    let partial = |range: std::ops::Range<usize>| {
        let mut acc = vec![T::ZERO; d];
        for i in range {
            let (xr, gr) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            let mut sum_sq = T::ZERO;
            for &v in xr {
                sum_sq += v * v;
            }
            let r = T::ONE / (sum_sq * inv_d + eps).sqrt();
            for j in 0..d {
                acc[j] += gr[j] * xr[j] * r;
            }
        }
        acc
    };
    if x.len() < PARALLEL_MIN_ELEMENTS {
        return partial(0..rows);
    }
    let threads = rayon::current_num_threads().max(1);
    let per = rows.div_ceil(threads);
    (0..threads)
        .into_par_iter()
        .map(|k| partial(k * per..((k + 1) * per).min(rows)))
        .reduce(
            || vec![T::ZERO; d],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}

impl CustomOp2 for RmsNormBackwardWeight {
    fn name(&self) -> &'static str {
        "troupe-rms-norm-backward-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1);
        let out = float_dispatch!(self.name(), [s1, s2], {
            rms_norm_weight_grad(
                contiguous(s1, l1, "rms_norm backward")?,
                contiguous(s2, l2, "rms_norm backward")?,
                d,
                self.eps,
            )
        });
        Ok((out, Shape::from(d)))
    }
}

/// RMSNorm over the last dimension of `x` with a learned `weight`, differentiable in both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

// ---------------------------------------------------------------------------
// Masked, scaled softmax for attention scores.

/// Computes `softmax(scale * x + bias)` over the last dimension, where `x` is
/// `(b, m, s)` flattened from any head layout and row `r` of batch `i` uses
/// `bias[i, r % t]` from a `(b, t, s)` bias of 0 and -inf. A row whose keys are
/// all masked yields zeros instead of NaN.
struct MaskedSoftmax {
    scale: f64,
}

#[derive(Clone, Copy)]
struct SoftmaxShape {
    t: usize,
    s: usize,
    rows_per_batch: usize,
}

fn masked_softmax_fwd<T: Real>(x: &[T], bias: &[T], shape: SoftmaxShape, scale: f64) -> Vec<T> {
    let SoftmaxShape {
        t,
        s,
        rows_per_batch,
    } = shape;
    let scale = T::from_f64(scale);
    let mut y = vec![T::ZERO; x.len()];
    for_each_row(&mut y, s, |r, row| {
        let batch = r / rows_per_batch;
        let bias_row = batch * t + (r % rows_per_batch) % t;
        let (xr, br) = (
            &x[r * s..(r + 1) * s],
            &bias[bias_row * s..(bias_row + 1) * s],
        );
        for j in 0..s {
            row[j] = scale * xr[j] + br[j];
        }
        let max = scaled_max(row, T::ONE);
        if max == T::NEG_INFINITY {
            row.iter_mut().for_each(|v| *v = T::ZERO);
            return;
        }
        for v in row.iter_mut() {
            *v = (*v - max).exp();
        }
        let inv = T::ONE / sum_values(row);
        row.iter_mut().for_each(|v| *v = *v * inv);
    });
    y
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "troupe-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        let bias_dims = l2.dims();
        if bias_dims.len() != 3 || dims[0] != bias_dims[0] || last_dim(l1) != bias_dims[2] {
            bail!("masked_softmax: scores {dims:?} do not match bias {bias_dims:?}");
        }
        let (b, t, s) = (bias_dims[0], bias_dims[1], bias_dims[2]);
        let rows_per_batch = l1.shape().elem_count() / (b * s).max(1);
        if t == 0 || !rows_per_batch.is_multiple_of(t) {
            bail!("masked_softmax: {rows_per_batch} score rows per batch are not a multiple of {t} bias rows");
        }
        let shape = SoftmaxShape {
            t,
            s,
            rows_per_batch,
        };
        let out = float_dispatch!(self.name(), [s1, s2], {
            masked_softmax_fwd(
                contiguous(s1, l1, "masked_softmax")?,
                contiguous(s2, l2, "masked_softmax")?,
                shape,
                self.scale,
            )
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

struct SoftmaxBackward {
    scale: f64,
}

fn softmax_grad<T: Real>(y: &[T], g: &[T], s: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut dx = vec![T::ZERO; y.len()];
    for_each_row(&mut dx, s, |r, row| {
        let (yr, gr) = (&y[r * s..(r + 1) * s], &g[r * s..(r + 1) * s]);
        let dot = dot(yr, gr);
        for j in 0..s {
            row[j] = scale * yr[j] * (gr[j] - dot);
        }
    });
    dx
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "troupe-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = last_dim(l1);
        let out = float_dispatch!(self.name(), [s1, s2], {
            softmax_grad(
                contiguous(s1, l1, "softmax backward")?,
                contiguous(s2, l2, "softmax backward")?,
                s,
                self.scale,
            )
        });
        Ok((out, l1.shape().clone()))
    }
}

/// `softmax(scale * scores + bias)` over the last dimension; see [`MaskedSoftmax`].
/// `scores` is `(b, ..., s)` with a multiple of `t` rows per batch entry, `bias` is `(b, t, s)`.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    scores
        .contiguous()?
        .apply_op2(&bias.contiguous()?, MaskedSoftmax { scale })
}

// ---------------------------------------------------------------------------
// Rotary embedding fused with the (b, t, h*d) -> (b, h, t, d) head split.

/// Splits `x` of shape `(b, t, h*d)` into heads `(b, h, t, d)`. `x` may have
/// any strides with a unit last stride, such as a slice of a fused QKV
/// projection. When `rotate` is set, each head is rotated with the Hugging
/// Face Llama convention: the first and second halves of a head are the two
/// coordinates of each rotated pair.
struct RopeHeads {
    head_dim: usize,
    rotate: bool,
}

fn check_rope_tables(
    cos: &Layout,
    sin: &Layout,
    b: usize,
    t: usize,
    head_dim: usize,
) -> Result<()> {
    let expected = [b, t, head_dim / 2];
    if cos.dims() != expected || sin.dims() != expected {
        bail!(
            "rope: cos {:?} and sin {:?} must both be {expected:?}",
            cos.dims(),
            sin.dims()
        );
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct RopeGeometry {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    rotate: bool,
}

/// `x` is read at `start + bi * sb + ti * st + hi * d + i`, the layout of a
/// `(b, t, h*d)` tensor whose last dimension is contiguous.
fn rope_fwd<T: Real>(
    x: &[T],
    (start, sb, st): (usize, usize, usize),
    cos: &[T],
    sin: &[T],
    g: RopeGeometry,
) -> Vec<T> {
    let RopeGeometry { b, t, h, d, rotate } = g;
    let half = d / 2;
    let mut out = vec![T::ZERO; b * h * t * d];
    // One output row is one (batch, head, position) triple.
    for_each_row(&mut out, d, |r, row| {
        let (bi, hi, ti) = (r / (h * t), (r / t) % h, r % t);
        let src = &x[start + bi * sb + ti * st + hi * d..][..d];
        if !rotate {
            row.copy_from_slice(src);
            return;
        }
        let table = (bi * t + ti) * half;
        let (c, s) = (&cos[table..table + half], &sin[table..table + half]);
        for i in 0..half {
            let (x1, x2) = (src[i], src[i + half]);
            row[i] = x1 * c[i] - x2 * s[i];
            row[i + half] = x2 * c[i] + x1 * s[i];
        }
    });
    out
}

/// Applies the transpose of [`rope_fwd`], taking `(b, h, t, d)` gradients to `(b, t, h*d)`.
fn rope_bwd<T: Real>(g: &[T], cos: &[T], sin: &[T], geometry: RopeGeometry) -> Vec<T> {
    let RopeGeometry { b, t, h, d, rotate } = geometry;
    let half = d / 2;
    let mut dx = vec![T::ZERO; b * t * h * d];
    // One output row is one (batch, position, head) triple.
    for_each_row(&mut dx, d, |r, row| {
        let (bi, ti, hi) = (r / (t * h), (r / h) % t, r % h);
        let src = &g[((bi * h + hi) * t + ti) * d..][..d];
        if !rotate {
            row.copy_from_slice(src);
            return;
        }
        let table = (bi * t + ti) * half;
        let (c, s) = (&cos[table..table + half], &sin[table..table + half]);
        for i in 0..half {
            let (g1, g2) = (src[i], src[i + half]);
            row[i] = g1 * c[i] + g2 * s[i];
            row[i + half] = g2 * c[i] - g1 * s[i];
        }
    });
    dx
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "troupe-rope-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, width) = l1.shape().dims3()?;
        let d = self.head_dim;
        if d == 0 || !d.is_multiple_of(2) || width % d != 0 || l1.stride()[2] != 1 {
            bail!(
                "rope: cannot split width {width} (strides {:?}) into heads of {d}",
                l1.stride()
            );
        }
        check_rope_tables(l2, l3, b, t, d)?;
        let h = width / d;
        let geometry = RopeGeometry {
            b,
            t,
            h,
            d,
            rotate: self.rotate,
        };
        let strides = (l1.start_offset(), l1.stride()[0], l1.stride()[1]);
        let out = float_dispatch!(self.name(), [s1, s2, s3], {
            rope_fwd(
                s1,
                strides,
                contiguous(s2, l2, "rope")?,
                contiguous(s3, l3, "rope")?,
                geometry,
            )
        });
        Ok((out, Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &RopeHeadsBackward {
                rotate: self.rotate,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// The transpose of [`RopeHeads`]: `(b, h, t, d)` gradients back to `(b, t, h*d)`,
/// rotated by the inverse angle.
struct RopeHeadsBackward {
    rotate: bool,
}

impl CustomOp3 for RopeHeadsBackward {
    fn name(&self) -> &'static str {
        "troupe-rope-heads-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = l1.shape().dims4()?;
        check_rope_tables(l2, l3, b, t, d)?;
        let geometry = RopeGeometry {
            b,
            t,
            h,
            d,
            rotate: self.rotate,
        };
        let out = float_dispatch!(self.name(), [s1, s2, s3], {
            rope_bwd(
                contiguous(s1, l1, "rope backward")?,
                contiguous(s2, l2, "rope backward")?,
                contiguous(s3, l3, "rope backward")?,
                geometry,
            )
        });
        Ok((out, Shape::from((b, t, h * d))))
    }
}

/// Splits `(b, t, h*head_dim)` into `(b, h, t, head_dim)` heads and applies the
/// rotary embedding with `cos`/`sin` tables of shape `(b, t, head_dim / 2)`.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    x.apply_op3(
        cos,
        sin,
        RopeHeads {
            head_dim,
            rotate: true,
        },
    )
}

/// Splits `(b, t, h*head_dim)` into `(b, h, t, head_dim)` heads without rotating
/// them (for values); `cos` and `sin` only carry the batch and time sizes.
pub fn split_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    x.apply_op3(
        cos,
        sin,
        RopeHeads {
            head_dim,
            rotate: false,
        },
    )
}

// ---------------------------------------------------------------------------
// SwiGLU activation on a fused gate/up projection.

/// `silu(gate) * up` where the input rows are `[gate | up]`, halving the last dimension.
struct SiluMul;

fn sigmoid<T: Real>(v: T) -> T {
    T::ONE / (T::ONE + (-v).exp())
}

fn silu_mul_fwd<T: Real>(x: &[T], half: usize) -> Vec<T> {
    let width = 2 * half;
    let mut out = vec![T::ZERO; x.len() / 2];
    for_each_row(&mut out, half, |r, row| {
        let (gate, up) = x[r * width..(r + 1) * width].split_at(half);
        for i in 0..half {
            row[i] = gate[i] * sigmoid(gate[i]) * up[i];
        }
    });
    out
}

fn silu_mul_grad<T: Real>(x: &[T], g: &[T], half: usize) -> Vec<T> {
    let width = 2 * half;
    let mut dx = vec![T::ZERO; x.len()];
    for_each_row(&mut dx, width, |r, row| {
        let (gate, up) = x[r * width..(r + 1) * width].split_at(half);
        let gr = &g[r * half..(r + 1) * half];
        let (d_gate, d_up) = row.split_at_mut(half);
        for i in 0..half {
            let s = sigmoid(gate[i]);
            // silu'(a) = s * (1 + a * (1 - s)) with s = sigmoid(a).
            d_gate[i] = gr[i] * up[i] * s * (T::ONE + gate[i] * (T::ONE - s));
            d_up[i] = gr[i] * gate[i] * s;
        }
    });
    dx
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "troupe-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = last_dim(l1);
        if !width.is_multiple_of(2) {
            bail!("silu_mul: last dimension {width} is odd");
        }
        let half = width / 2;
        let out = float_dispatch!(
            self.name(),
            [s1],
            silu_mul_fwd(contiguous(s1, l1, "silu_mul")?, half)
        );
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = half;
        }
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &SiluMulBackward)?,
        ))
    }
}

struct SiluMulBackward;

impl CustomOp2 for SiluMulBackward {
    fn name(&self) -> &'static str {
        "troupe-silu-mul-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let half = last_dim(l1) / 2;
        let out = float_dispatch!(self.name(), [s1, s2], {
            silu_mul_grad(
                contiguous(s1, l1, "silu_mul backward")?,
                contiguous(s2, l2, "silu_mul backward")?,
                half,
            )
        });
        Ok((out, l1.shape().clone()))
    }
}

/// SwiGLU on rows laid out as `[gate | up]`: returns `silu(gate) * up`.
pub fn silu_mul(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SiluMul)
}

// ---------------------------------------------------------------------------
// Log-probabilities and entropy of categorical distributions given by logits.

/// `log_softmax(logits / temperature)[target]` per row of `(n, V)` logits.
struct TargetLogProb {
    inv_temperature: f64,
}

/// Per-row `(max, log-sum-exp)` of `z = inv_temperature * logits`.
fn log_sum_exp<T: Real>(row: &[T], inv_temperature: T) -> (T, T) {
    let max = scaled_max(row, inv_temperature);
    // The exponentials go through a buffer because an elementwise loop
    // vectorizes where a loop that also accumulates does not.
    let mut exps = vec![T::ZERO; row.len()];
    for (e, &v) in exps.iter_mut().zip(row) {
        *e = (v * inv_temperature - max).exp();
    }
    (max, max + sum_values(&exps).ln())
}

fn targets_of(
    storage: &CpuStorage,
    layout: &Layout,
    rows: usize,
    vocab: usize,
) -> Result<Vec<usize>> {
    let targets: Vec<usize> = match storage {
        CpuStorage::U32(v) => contiguous(v, layout, "log_prob targets")?
            .iter()
            .map(|&t| t as usize)
            .collect(),
        CpuStorage::I64(v) => contiguous(v, layout, "log_prob targets")?
            .iter()
            .map(|&t| t.max(0) as usize)
            .collect(),
        _ => bail!("log_prob: targets must be u32 or i64"),
    };
    if targets.len() != rows {
        bail!(
            "log_prob: {} targets for {rows} rows of logits",
            targets.len()
        );
    }
    if let Some(bad) = targets.iter().find(|&&t| t >= vocab) {
        bail!("log_prob: target token {bad} is outside the vocabulary of {vocab}");
    }
    Ok(targets)
}

impl CustomOp2 for TargetLogProb {
    fn name(&self) -> &'static str {
        "troupe-target-log-prob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l1.shape().dims2()?;
        let targets = targets_of(s2, l2, rows, vocab)?;
        let out = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(target_log_prob(
                contiguous(v, l1, "log_prob")?,
                &targets,
                vocab,
                self.inv_temperature,
            )),
            CpuStorage::F64(v) => CpuStorage::F64(target_log_prob(
                contiguous(v, l1, "log_prob")?,
                &targets,
                vocab,
                self.inv_temperature,
            )),
            _ => bail!("log_prob: logits must be f32 or f64"),
        };
        Ok((out, Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = TargetLogProbBackward {
            inv_temperature: self.inv_temperature,
        };
        // (n, 2): the forward's log-prob (which gives back the log-sum-exp) and the incoming gradient.
        let res_grad = Tensor::stack(&[res, grad], 1)?;
        let d_logits = logits.apply_op3_no_bwd(targets, &res_grad, &op)?;
        Ok((Some(d_logits), None))
    }
}

fn target_log_prob<T: Real>(
    logits: &[T],
    targets: &[usize],
    vocab: usize,
    inv_temperature: f64,
) -> Vec<T> {
    let inv_t = T::from_f64(inv_temperature);
    let compute = |(r, &target): (usize, &usize)| {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let (_, lse) = log_sum_exp(row, inv_t);
        row[target] * inv_t - lse
    };
    if logits.len() >= PARALLEL_MIN_ELEMENTS {
        targets.par_iter().enumerate().map(compute).collect()
    } else {
        targets.iter().enumerate().map(compute).collect()
    }
}

/// `res_grad` rows are `(log-prob of the target, incoming gradient)`; the
/// log-sum-exp is `z[target] - log-prob`, so only one exp pass is needed.
fn target_log_prob_grad<T: Real>(
    logits: &[T],
    targets: &[usize],
    res_grad: &[T],
    vocab: usize,
    inv_temperature: f64,
) -> Vec<T> {
    let inv_t = T::from_f64(inv_temperature);
    let mut d = vec![T::ZERO; logits.len()];
    for_each_row(&mut d, vocab, |r, row| {
        let lr = &logits[r * vocab..(r + 1) * vocab];
        let (logprob, g) = (res_grad[2 * r], res_grad[2 * r + 1]);
        let lse = lr[targets[r]] * inv_t - logprob;
        let scale = g * inv_t;
        for j in 0..vocab {
            row[j] = -scale * (lr[j] * inv_t - lse).exp();
        }
        row[targets[r]] += scale;
    });
    d
}

struct TargetLogProbBackward {
    inv_temperature: f64,
}

impl CustomOp3 for TargetLogProbBackward {
    fn name(&self) -> &'static str {
        "troupe-target-log-prob-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l1.shape().dims2()?;
        let targets = targets_of(s2, l2, rows, vocab)?;
        let out = float_dispatch!(self.name(), [s1, s3], {
            target_log_prob_grad(
                contiguous(s1, l1, "log_prob backward")?,
                &targets,
                contiguous(s3, l3, "log_prob backward")?,
                vocab,
                self.inv_temperature,
            )
        });
        Ok((out, l1.shape().clone()))
    }
}

/// `log_softmax(logits / temperature)` picked at `targets`: `(n, V)` logits and
/// `(n,)` u32 targets give `(n,)` log-probabilities, differentiable in the logits.
pub fn target_log_probs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("log_prob: temperature must be positive and finite, got {temperature}");
    }
    logits.contiguous()?.apply_op2(
        &targets.contiguous()?,
        TargetLogProb {
            inv_temperature: 1.0 / temperature,
        },
    )
}

/// Entropy of `softmax(logits / temperature)` per row of `(n, V)` logits.
struct Entropy {
    inv_temperature: f64,
}

fn entropy_fwd<T: Real>(logits: &[T], rows: usize, vocab: usize, inv_temperature: f64) -> Vec<T> {
    let inv_t = T::from_f64(inv_temperature);
    let mut out = vec![T::ZERO; rows];
    for_each_row(&mut out, 1, |r, cell| {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let (_, lse) = log_sum_exp(row, inv_t);
        // H = lse - sum_j p_j z_j with z = logits / temperature.
        let mut expected_z = T::ZERO;
        for &v in row {
            let z = v * inv_t;
            expected_z += (z - lse).exp() * z;
        }
        cell[0] = lse - expected_z;
    });
    out
}

fn entropy_grad<T: Real>(
    logits: &[T],
    entropy: &[T],
    g: &[T],
    vocab: usize,
    inv_temperature: f64,
) -> Vec<T> {
    let inv_t = T::from_f64(inv_temperature);
    let mut d = vec![T::ZERO; logits.len()];
    for_each_row(&mut d, vocab, |r, row| {
        let lr = &logits[r * vocab..(r + 1) * vocab];
        let (_, lse) = log_sum_exp(lr, inv_t);
        // dH/dz_j = -p_j * (log p_j + H)
        for j in 0..vocab {
            let log_p = lr[j] * inv_t - lse;
            row[j] = -g[r] * inv_t * log_p.exp() * (log_p + entropy[r]);
        }
    });
    d
}

impl CustomOp1 for Entropy {
    fn name(&self) -> &'static str {
        "troupe-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l1.shape().dims2()?;
        let out = float_dispatch!(
            self.name(),
            [s1],
            entropy_fwd(
                contiguous(s1, l1, "entropy")?,
                rows,
                vocab,
                self.inv_temperature
            )
        );
        Ok((out, Shape::from(rows)))
    }

    fn bwd(&self, logits: &Tensor, entropy: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = EntropyBackward {
            inv_temperature: self.inv_temperature,
        };
        Ok(Some(logits.apply_op3_no_bwd(
            entropy,
            &grad.contiguous()?,
            &op,
        )?))
    }
}

struct EntropyBackward {
    inv_temperature: f64,
}

impl CustomOp3 for EntropyBackward {
    fn name(&self) -> &'static str {
        "troupe-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, vocab) = l1.shape().dims2()?;
        let out = float_dispatch!(self.name(), [s1, s2, s3], {
            entropy_grad(
                contiguous(s1, l1, "entropy backward")?,
                contiguous(s2, l2, "entropy backward")?,
                contiguous(s3, l3, "entropy backward")?,
                vocab,
                self.inv_temperature,
            )
        });
        Ok((out, l1.shape().clone()))
    }
}

/// Entropy (in nats) of `softmax(logits / temperature)` for each row of `(n, V)` logits.
pub fn entropy(logits: &Tensor, temperature: f64) -> Result<Tensor> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("entropy: temperature must be positive and finite, got {temperature}");
    }
    logits.contiguous()?.apply_op1(Entropy {
        inv_temperature: 1.0 / temperature,
    })
}
