//! Loci's CPU kernels equal candle's operations (the reference path), the work counter counts
//! the products a pass computes, and a system BLAS, when one is found, gives candle's product.
//! The tests take turns: the kernel switch and the work counter are process-wide.

mod common;

use candle_core::{DType, Device, Tensor, D};
use loci_core::{kernels, LogitsAt, NoHook};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn exp_is_within_two_ulp_over_the_softmax_range() {
    let mut worst = 0f32;
    for i in 0..200_000 {
        let x = -87.0 + 175.0 * i as f32 / 200_000.0;
        let (got, want) = (kernels::exp_approx(x), x.exp());
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 2.5e-7, "relative error {worst}");
    assert!(kernels::exp_approx(f32::NAN).is_nan());
    let (low, high) = (kernels::exp_approx(-1000.0), kernels::exp_approx(1000.0));
    assert_eq!(low, 0.0);
    assert_eq!(kernels::exp_approx(f32::NEG_INFINITY), 0.0);
    assert_eq!(high, f32::INFINITY);
    let top = kernels::exp_approx(88.3);
    assert!((top / 88.3f32.exp() - 1.0).abs() < 1e-6, "{top}");
}

/// The fast kernels against the reference operations, then a whole model both ways.
#[test]
fn fast_kernels_equal_the_reference_path() {
    let _turn = turn();
    let dev = Device::Cpu;
    // SwiGLU on a [2, 3, 2·d_ff] input (d_ff odd, so no row is a multiple of a vector).
    let gu = (Tensor::randn(0f32, 3.0, (2, 3, 2 * 37), &dev).unwrap()).contiguous();
    let gu = gu.unwrap();
    let fast = kernels::silu_mul(&gu)
        .unwrap()
        .expect("f32 on the CPU takes the fast path");
    let (gate, up) = (
        gu.narrow(D::Minus1, 0, 37).unwrap(),
        gu.narrow(D::Minus1, 37, 37).unwrap(),
    );
    let reference = (gate.silu().unwrap() * up).unwrap();
    assert_eq!(fast.dims(), &[2, 3, 37]);
    assert!(max_abs_diff(&fast, &reference) < 1e-5);
    // A −∞ gate gives NaN, as in candle's silu (−∞ / ∞).
    let edge = Tensor::new(&[[f32::NEG_INFINITY, 1.0]], &dev).unwrap();
    let v = kernels::silu_mul(&edge)
        .unwrap()
        .unwrap()
        .flatten_all()
        .unwrap();
    let reference = (edge.narrow(1, 0, 1).unwrap().silu().unwrap() * edge.narrow(1, 1, 1).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap();
    assert!(v.to_vec1::<f32>().unwrap()[0].is_nan());
    assert!(reference.to_vec1::<f32>().unwrap()[0].is_nan());

    // GELU, tanh form, over a range wide enough to reach both tails.
    let x = Tensor::randn(0f32, 4.0, (3, 101), &dev).unwrap();
    let fast = kernels::gelu_tanh(&x).unwrap().unwrap();
    assert!(max_abs_diff(&fast, &x.gelu().unwrap()) < 2e-6);

    // Causal softmax: 4 new queries over 9 keys, 2 query heads per key head.
    let (t, t_all, rep) = (4, 9, 2);
    let scores = Tensor::randn(0f32, 4.0, (2, 3, rep * t, t_all), &dev).unwrap();
    let fast = kernels::causal_softmax(&scores, t, None).unwrap().unwrap();
    let mask = loci_core::model::layers::CausalMasks::default()
        .get(t, t_all, rep, None, &dev)
        .unwrap();
    let reference =
        candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
    assert!(max_abs_diff(&fast, &reference) < 1e-6);
    // With a key mask hiding the second batch item's first two keys (padding).
    let mut m = vec![0f32; 2 * t_all];
    m[t_all] = f32::NEG_INFINITY;
    m[t_all + 1] = f32::NEG_INFINITY;
    let key_mask = Tensor::from_vec(m, (2, 1, 1, t_all), &dev).unwrap();
    let fast = kernels::causal_softmax(&scores, t, Some(&key_mask))
        .unwrap()
        .unwrap();
    let masked = scores
        .broadcast_add(&mask)
        .unwrap()
        .broadcast_add(&key_mask)
        .unwrap();
    let reference = candle_nn::ops::softmax_last_dim(&masked).unwrap();
    assert!(max_abs_diff(&fast, &reference) < 1e-6);
    let hidden = fast.narrow(0, 1, 1).unwrap().narrow(3, 0, 2).unwrap();
    assert_eq!(
        hidden
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );

    // A NaN score poisons its row, as in candle's softmax.
    let mut v = vec![0.5f32; t_all];
    v[1] = f32::NAN;
    let row = Tensor::from_vec(v, (1, 1, 1, t_all), &dev).unwrap();
    let out = kernels::causal_softmax(&row, 1, None).unwrap().unwrap();
    let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(out.iter().all(|x| x.is_nan()), "{out:?}");

    // Tracked tensors and other dtypes take the reference path.
    assert!(kernels::silu_mul(&gu.to_dtype(DType::BF16).unwrap())
        .unwrap()
        .is_none());
    let tracked = candle_core::Var::from_tensor(&gu).unwrap();
    assert!(kernels::silu_mul(tracked.as_tensor()).unwrap().is_none());

    // A LLaMA-style model (SwiGLU, grouped-query attention) and GPT-2, all logits both ways.
    for name in ["tiny-llama", "tiny-gpt2"] {
        let lm = common::tiny(name);
        let ids = lm
            .model
            .ids_tensor(&[vec![3, 1, 4, 1, 5, 9, 2, 6]])
            .unwrap();
        let run = || {
            lm.model
                .run(&ids, &mut NoHook, None, LogitsAt::All)
                .unwrap()
                .unwrap()
        };
        let fast = run();
        kernels::set_fast(false);
        let reference = run();
        kernels::set_fast(true);
        let d = max_abs_diff(&fast, &reference);
        assert!(d < 1e-5, "{name}: logits differ by {d}");
    }
}

/// One forward pass counts exactly its maps' and attention's products.
#[test]
fn the_work_counter_counts_a_forward_pass() {
    let _turn = turn();
    let lm = common::tiny("tiny-gpt2");
    let c = &lm.model.cfg;
    let t = 6usize;
    let ids = lm.model.ids_tensor(&[vec![1; t]]).unwrap();
    let before = loci_core::flops::total();
    lm.model
        .run(&ids, &mut NoHook, None, LogitsAt::Last)
        .unwrap();
    let counted = loci_core::flops::total() - before;
    let (d, ff) = (c.d_model as u64, c.d_ff as u64);
    let t = t as u64;
    // q, k, v and out (GPT-2 has as many key heads as query heads), up and down; attention's
    // scores and values over t keys; the head at the last position.
    let per_layer = 2 * t * (4 * d * d + 2 * d * ff) + 2 * 2 * t * t * d;
    let expected = c.n_layer as u64 * per_layer + 2 * d * c.vocab_size as u64;
    assert_eq!(counted, expected);
}

#[test]
fn a_system_blas_gives_candles_product() {
    let Some(blas) = loci_core::blas::system() else {
        if std::env::var("LOCI_BLAS").as_deref() == Ok("off") {
            eprintln!("SKIPPED: LOCI_BLAS=off");
            return;
        }
        // scripts/install-tools.sh installs OpenBLAS, so the test machine has one.
        panic!("no system BLAS found (install libopenblas0, set LOCI_BLAS=path, or =off)");
    };
    let (m, n, k) = (37, 29, 53);
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let want = a.matmul(&b.t().unwrap()).unwrap();
    let mut c = vec![0f32; m * n];
    let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    blas.matmul_bt(&flat(&a), &flat(&b), &mut c, m, n, k);
    let got = Tensor::from_vec(c, (m, n), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-4, "{}", blas.name());
}

/// A long prompt (attended in blocks of queries) and its cached continuation give the logits of
/// the one-pass reference, on SmolLM2.
#[test]
fn long_prompts_attend_in_blocks_as_in_one_pass() {
    let Some(lm) = common::smol() else { return };
    let _turn = turn();
    let text = common::wiki_texts(3).join(" ");
    let ids: Vec<u32> = lm.tokenizer.encode(&text).unwrap()[..300].to_vec();
    let run = || {
        let full = lm.model.ids_tensor(std::slice::from_ref(&ids)).unwrap();
        let whole = lm
            .model
            .run(&full, &mut NoHook, None, LogitsAt::All)
            .unwrap()
            .unwrap();
        let mut cache = loci_core::KvCache::default();
        let (head, tail) = ids.split_at(140);
        for part in [head, tail] {
            let t = lm.model.ids_tensor(&[part.to_vec()]).unwrap();
            lm.model
                .run(&t, &mut NoHook, Some(&mut cache), LogitsAt::All)
                .unwrap();
        }
        let last = lm
            .model
            .run(
                &lm.model.ids_tensor(&[vec![ids[0]]]).unwrap(),
                &mut NoHook,
                Some(&mut cache),
                LogitsAt::Last,
            )
            .unwrap()
            .unwrap();
        (whole, last)
    };
    let (fast, fast_next) = run();
    kernels::set_fast(false);
    let (reference, reference_next) = run();
    kernels::set_fast(true);
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_abs_diff(&fast, &reference) / scale;
    assert!(
        d < 1e-5,
        "logits of 300 tokens differ by {d} of their largest"
    );
    let d = max_abs_diff(&fast_next, &reference_next) / scale;
    assert!(
        d < 1e-5,
        "after a cached continuation, logits differ by {d}"
    );
}

/// A linear map's product, forward and (frozen weights, under autograd) backward, runs on
/// Loci's AVX-512 kernel where the processor has one — bit for bit the kernel's own product —
/// and equals candle's within rounding.
#[test]
fn linear_maps_run_on_locis_kernel_and_equal_candles() {
    use loci_core::kernels::gemm::{self, Lhs, Rhs};
    use loci_core::model::layers::Linear;
    let _turn = turn();
    let (rows, d_in, d_out) = (20, 300, 70);
    let x = Tensor::randn(0f32, 1.0, (rows, d_in), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.1, (d_out, d_in), &Device::Cpu).unwrap();
    let map = Linear::new(w.clone(), None);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Forward, outside autograd.
    let y = map.forward(&x).unwrap();
    let want = x.matmul(&w.t().unwrap()).unwrap();
    assert!(max_abs_diff(&y, &want) < 1e-5);
    // Under autograd: the tracked output, and the input's gradient of Σ y·g.
    let var = candle_core::Var::from_tensor(&x).unwrap();
    let g = Tensor::randn(0f32, 1.0, (rows, d_out), &Device::Cpu).unwrap();
    let tracked_and_grad = || {
        let tracked = map.forward(var.as_tensor()).unwrap();
        let loss = (&tracked * &g).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        (tracked, grads.get(var.as_tensor()).unwrap().clone())
    };
    let (_, grad) = tracked_and_grad();
    assert!(max_abs_diff(&grad, &g.matmul(&w).unwrap()) < 1e-5);
    if !gemm::available() {
        eprintln!("no AVX-512 here: candle's product ran");
        return;
    }
    let (xs, ws) = (flat(&x), flat(&w));
    let mine = gemm::product(Lhs::Plain(&xs), rows, d_in, Rhs::Transposed(&ws), d_out, 1).unwrap();
    assert_eq!(flat(&y), mine, "the forward ran on Loci's kernel");
    let back = gemm::product(Lhs::Plain(&flat(&g)), rows, d_out, Rhs::Plain(&ws), d_in, 1).unwrap();
    assert_eq!(flat(&grad), back, "the backward ran on Loci's kernel");
    // Switched off, candle's product runs again, under autograd too.
    kernels::set_fast(false);
    let reference = map.forward(&x).unwrap();
    let (tracked, reference_grad) = tracked_and_grad();
    kernels::set_fast(true);
    assert_eq!(flat(&reference), flat(&want));
    assert_eq!(flat(&tracked), flat(&want));
    assert_eq!(flat(&reference_grad), flat(&g.matmul(&w).unwrap()));
}

/// The stated tolerance of bf16 products (`--products bf16`): SmolLM2's trace of the Eiffel Tower
/// prompt (all kinds, 3 samples) keeps its answer, and every cell, the clean and the corrupted
/// probability stay within 0.02 of the f32 trace's.
#[test]
fn bf16_maps_keep_smollm2s_trace_within_its_tolerance() {
    use loci_core::kernels::gemm;
    use loci_core::trace::{NoiseSpec, Quiet, TraceKind, TraceRequest};
    let _turn = turn();
    let Some(lm) = common::smol() else { return };
    if !gemm::bf16_detected() {
        assert!(
            gemm::set_maps_in_bf16(true).is_err(),
            "refused without VDPBF16PS"
        );
        return;
    }
    let mut req = TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
    req.samples = 3;
    req.noise = NoiseSpec::Fixed(0.35);
    let f32_trace = lm.trace(&req, None, &mut Quiet, 2).unwrap();
    /// Turns the maps back to f32 however the test ends, so that no later test sees bf16.
    struct BackToF32;
    impl Drop for BackToF32 {
        fn drop(&mut self) {
            gemm::set_maps_in_bf16(false).unwrap();
        }
    }
    let bf16_trace = {
        let _back = BackToF32;
        gemm::set_maps_in_bf16(true).unwrap();
        lm.trace(&req, None, &mut Quiet, 2).unwrap()
    };
    assert_eq!(bf16_trace.answer.token, f32_trace.answer.token);
    let mut worst = (bf16_trace.high - f32_trace.high).abs();
    worst = worst.max((bf16_trace.low - f32_trace.low).abs());
    for kind in [TraceKind::Hidden, TraceKind::Mlp, TraceKind::Attn] {
        let (a, b) = (&bf16_trace.scores[&kind], &f32_trace.scores[&kind]);
        for (ra, rb) in a.iter().zip(b) {
            for (x, y) in ra.iter().zip(rb) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    eprintln!("bf16 against f32: largest difference {worst}");
    assert!(worst < 0.02, "bf16 against f32: {worst}");
    // The switch is off again: products are f32's.
    assert_eq!(gemm::maps_precision(), gemm::Precision::F32);
}
