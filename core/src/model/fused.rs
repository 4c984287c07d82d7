//! candle's fused kernels for rotary embeddings, softmax and norms have no backward pass; under
//! autograd (ROME's v*) each would otherwise be spelt out as a dozen elementwise operations,
//! every one a kernel launch and a buffer on a GPU. `WithGrad` runs the fused kernel forward and
//! gives the input's gradient by formula — the only gradient needed: the weights are frozen.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, D};

type Forward = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;
/// `(input, output, output's gradient) → input's gradient`.
type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

struct WithGrad {
    name: &'static str,
    fwd: Forward,
    bwd: Backward,
}

/// A tensor over a copy of the op's input (a custom op sees storage, the fused kernels want
/// tensors; the copy is one pass over the activations instead of a dozen).
fn input_tensor(storage: Storage, layout: &Layout) -> candle_core::Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op needs a contiguous input")
    };
    Tensor::from_storage(storage, end, BackpropOp::none(), false)
        .narrow(0, start, end - start)?
        .reshape(layout.shape())
}

/// The storage of a result, as a buffer of its own (offset 0, exact size).
fn output_storage<S>(
    y: Tensor,
    pick: impl Fn(&Storage) -> Option<&S>,
) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
{
    let fresh = y.layout().start_offset() == 0 && y.is_contiguous();
    let y = if fresh { y } else { y.copy()? };
    let (st, layout) = y.storage_and_layout();
    match pick(&st) {
        Some(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
        None => candle_core::bail!("fused op: the result changed device"),
    }
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input_tensor(Storage::Cpu(s.try_clone(l)?), l)?;
        output_storage((self.fwd)(&x)?, |st| match st {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let x = input_tensor(Storage::Cuda(s.try_clone(l)?), l)?;
        output_storage((self.fwd)(&x)?, |st| match st {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(&arg.detach(), &res.detach(), grad)?))
    }
}

/// Whether `x` is on a device these ops run on (elsewhere callers keep the composed forms).
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda())
}

/// Softmax over the last axis; its gradient is `y ⊙ (g − Σ g ⊙ y)`.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op1(WithGrad {
        name: "softmax-with-grad",
        fwd: Box::new(candle_nn::ops::softmax_last_dim),
        bwd: Box::new(|_, y, g| y * g.broadcast_sub(&(g * y)?.sum_keepdim(D::Minus1)?)?),
    })
}

/// The gradient of a normalisation `x̂ = (x − μ)·r` (μ = 0 for RMS) scaled by `w`:
/// `r · (g w − mean(g w) − x̂ · mean(g w ⊙ x̂))`, the middle term only when μ was subtracted.
fn norm_grad(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f32,
    centred: bool,
) -> candle_core::Result<Tensor> {
    let xc = if centred {
        x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?
    } else {
        x.clone()
    };
    let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    let xhat = xc.broadcast_mul(&r)?;
    let gw = g.broadcast_mul(w)?;
    let mut inner =
        gw.broadcast_sub(&xhat.broadcast_mul(&(&gw * &xhat)?.mean_keepdim(D::Minus1)?)?)?;
    if centred {
        inner = inner.broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?;
    }
    inner.broadcast_mul(&r)
}

/// LayerNorm over the last axis (`w`, `b`: `[d]`), with the input's gradient by formula.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let (w, b, wg) = (w.clone(), b.clone(), w.clone());
    x.apply_op1(WithGrad {
        name: "layer-norm-with-grad",
        fwd: Box::new(move |x| candle_nn::ops::layer_norm(x, &w, &b, eps)),
        bwd: Box::new(move |x, _, g| norm_grad(x, &wg, g, eps, true)),
    })
}

/// RMSNorm over the last axis (`w`: `[d]`), with the input's gradient by formula.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let (w, wg) = (w.clone(), w.clone());
    x.apply_op1(WithGrad {
        name: "rms-norm-with-grad",
        fwd: Box::new(move |x| candle_nn::ops::rms_norm(x, &w, eps)),
        bwd: Box::new(move |x, _, g| norm_grad(x, &wg, g, eps, false)),
    })
}

/// Rotary embedding (`interleaved`: GPT-J's adjacent pairs, else LLaMA's halves). A rotation's
/// gradient is the rotation back: the same kernel with `−sin`.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> candle_core::Result<Tensor> {
    let kernel = move |x: &Tensor, cos: &Tensor, sin: &Tensor| {
        if interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    };
    let (c, s) = (cos.clone(), sin.clone());
    let (cb, sb) = (cos.clone(), sin.neg()?);
    x.apply_op1(WithGrad {
        name: "rope-with-grad",
        fwd: Box::new(move |x| kernel(x, &c, &s)),
        bwd: Box::new(move |_, _, g| kernel(&g.contiguous()?, &cb, &sb)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    type Op = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;

    /// `f(x)` and the input's gradient of `Σ f(x) ⊙ r` (every op here keeps the shape).
    fn value_and_grad(x0: &Tensor, r: &Tensor, f: &Op) -> (Tensor, Tensor) {
        let x = Var::from_tensor(x0).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let loss = (&y * r).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        (y, g)
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn fused_ops_give_the_composed_ops_outputs_and_gradients() {
        let dev = Device::Cpu;
        let rnd = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (x, r) = (rnd(&[3, 1, 5, 16]), rnd(&[3, 1, 5, 16]));
        let w = ((rnd(&[16]) * 0.5).unwrap() + 1.0).unwrap();
        let b = rnd(&[16]);
        let ang = rnd(&[5, 8]);
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let mut cases: Vec<(&str, Op, Op)> = vec![
            (
                "softmax",
                Box::new(softmax_last),
                Box::new(|x| candle_nn::ops::softmax(x, D::Minus1)),
            ),
            (
                "layer norm",
                Box::new({
                    let (w, b) = (w.clone(), b.clone());
                    move |x| layer_norm(x, &w, &b, 1e-5)
                }),
                Box::new({
                    let (w, b) = (w.clone(), b.clone());
                    move |x| candle_nn::ops::layer_norm_slow(x, &w, &b, 1e-5)
                }),
            ),
            (
                "rms norm",
                Box::new({
                    let w = w.clone();
                    move |x| rms_norm(x, &w, 1e-5)
                }),
                Box::new({
                    let w = w.clone();
                    move |x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5)
                }),
            ),
        ];
        for (name, interleaved) in [("rope (pairs)", true), ("rope (halves)", false)] {
            let (c1, s1, c2, s2) = (cos.clone(), sin.clone(), cos.clone(), sin.clone());
            cases.push((
                name,
                Box::new(move |x| rope(x, &c1, &s1, interleaved)),
                Box::new(move |x| {
                    crate::model::layers::rope_composed(x, &c2, &s2, interleaved)
                        .map_err(candle_core::Error::wrap)
                }),
            ));
        }
        for (name, fused, composed) in &cases {
            let (yf, gf) = value_and_grad(&x, &r, fused);
            let (yc, gc) = value_and_grad(&x, &r, composed);
            assert!(
                max_abs(&(&yf - &yc).unwrap()) < 1e-5,
                "{name}: outputs differ"
            );
            let d = max_abs(&(&gf - &gc).unwrap());
            assert!(d < 1e-4, "{name}: gradients differ by {d}");
            assert!(max_abs(&gf) > 1e-2, "{name}: no gradient at all");
        }
    }
}
