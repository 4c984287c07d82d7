use super::{available, product, Lhs, Rhs};
use crate::rng::SplitMix64 as Rng;

/// A random product around one edge shape: `a` `[m, k]` and `b` `[k, n]`, stored transposed
/// (`[n, k]`, as a map's weight) or not.
struct Case {
    m: usize,
    k: usize,
    n: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    transposed: bool,
}

impl Case {
    /// One case per shape of [`SHAPES`] and right-hand layout, each shape's values drawn once.
    fn all(seed: u64) -> Vec<Case> {
        let mut rng = Rng::new(seed);
        let mut cases = vec![];
        for (m, k, n) in SHAPES {
            let (a, b) = (values(&mut rng, m * k), values(&mut rng, k * n));
            for transposed in [true, false] {
                let (a, b) = (a.clone(), b.clone());
                cases.push(Case {
                    m,
                    k,
                    n,
                    a,
                    b,
                    transposed,
                });
            }
        }
        cases
    }

    fn rhs(&self) -> Rhs<'_> {
        if self.transposed {
            Rhs::Transposed(&self.b)
        } else {
            Rhs::Plain(&self.b)
        }
    }

    /// `b[p, j]`.
    fn b_at(&self, p: usize, j: usize) -> f32 {
        if self.transposed {
            self.b[j * self.k + p]
        } else {
            self.b[p * self.n + j]
        }
    }
}

/// The module's promised order, written out: each output summed a block of terms at a time by
/// fused multiply-adds from zero, each block's sum added to the output.
fn blocked(c: &Case) -> Vec<f32> {
    let (m, k, n) = (c.m, c.k, c.n);
    let terms = super::avx512::block_terms(k);
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut total = 0f32;
            for p0 in (0..k).step_by(terms) {
                let mut sum = 0f32;
                for p in p0..(p0 + terms).min(k) {
                    sum = c.a[i * k + p].mul_add(c.b_at(p, j), sum);
                }
                total = if p0 == 0 { sum } else { total + sum };
            }
            out[i * n + j] = total;
        }
    }
    out
}

fn values(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.next_gaussian() as f32).collect()
}

/// Shapes around every edge: single rows and columns, ragged panels (12 rows, 32 columns), more
/// terms than a block (512), more rows than a row block (96), more columns than a column block
/// (512).
const SHAPES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (1, 7, 3),
    (5, 300, 17),
    (12, 64, 32),
    (13, 33, 45),
    (25, 256, 16),
    (97, 40, 70),
    (30, 520, 600),
    (100, 1000, 33),
];

#[test]
fn products_follow_the_promised_order_bit_for_bit() {
    if !available() {
        eprintln!("no AVX-512 here: the kernel never runs, nothing to test");
        return;
    }
    for c in Case::all(7) {
        let (m, k, n, transposed) = (c.m, c.k, c.n, c.transposed);
        for threads in [1, 3] {
            let got = product(Lhs::Plain(&c.a), m, k, c.rhs(), n, threads).expect("available");
            let want = blocked(&c);
            assert_eq!(
                got, want,
                "[{m}, {k}] · [{k}, {n}], transposed {transposed}"
            );
        }
    }
}

#[test]
fn a_left_side_stored_transposed_gives_the_same_bits() {
    if !available() {
        return;
    }
    for c in Case::all(5).into_iter().filter(|c| !c.transposed) {
        let (m, k, n, a, b) = (c.m, c.k, c.n, &c.a, &c.b);
        let stored: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        for threads in [1, 2] {
            let plain = product(Lhs::Plain(a), m, k, Rhs::Plain(b), n, threads);
            let turned = product(Lhs::Transposed(&stored), m, k, Rhs::Plain(b), n, threads);
            assert_eq!(plain, turned, "[{m}, {k}] · [{k}, {n}]");
        }
    }
}

#[test]
fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
    if !available() {
        return;
    }
    let (m, k, n) = (40, 300, 70);
    let mut rng = Rng::new(11);
    let (a, w) = (values(&mut rng, m * k), values(&mut rng, n * k));
    let all = product(Lhs::Plain(&a), m, k, Rhs::Transposed(&w), n, 2).expect("available");
    for i in [0, 11, 12, 39] {
        let one = product(
            Lhs::Plain(&a[i * k..][..k]),
            1,
            k,
            Rhs::Transposed(&w),
            n,
            1,
        )
        .expect("available");
        assert_eq!(one, all[i * n..][..n], "row {i}");
    }
}

#[test]
fn products_match_double_precision() {
    if !available() {
        return;
    }
    let (m, k, n) = (50, 2000, 40);
    let mut rng = Rng::new(3);
    let (a, b) = (values(&mut rng, m * k), values(&mut rng, k * n));
    let got = product(Lhs::Plain(&a), m, k, Rhs::Plain(&b), n, 1).expect("available");
    for i in 0..m {
        for j in 0..n {
            let exact: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                .sum();
            let err = (got[i * n + j] as f64 - exact).abs();
            // Random terms of unit size: the sum's size is about √k.
            assert!(
                err < 1e-4 * (k as f64).sqrt(),
                "({i}, {j}): {} vs {exact}",
                got[i * n + j]
            );
        }
    }
}

#[test]
fn empty_products_are_zero() {
    if !available() {
        return;
    }
    assert_eq!(
        product(Lhs::Plain(&[]), 3, 0, Rhs::Plain(&[]), 2, 1),
        Some(vec![0.0; 6])
    );
    assert_eq!(
        product(Lhs::Plain(&[]), 0, 4, Rhs::Plain(&[0.0; 8]), 2, 1),
        Some(vec![])
    );
}

#[test]
fn nan_and_infinity_reach_their_outputs_only() {
    if !available() {
        return;
    }
    let (m, k, n) = (3, 4, 2);
    let mut a = vec![1f32; m * k];
    a[k] = f32::NAN;
    a[2 * k] = f32::INFINITY;
    let c = product(Lhs::Plain(&a), m, k, Rhs::Plain(&[1.0; 8]), n, 1).expect("available");
    assert_eq!(&c[..2], &[4.0, 4.0]);
    assert!(c[2].is_nan() && c[3].is_nan());
    assert_eq!(&c[4..], &[f32::INFINITY, f32::INFINITY]);
}

#[test]
fn batched_products_equal_each_matrix_product_and_read_narrowed_keys() {
    use candle_core::{Device, Tensor};
    if !available() {
        return;
    }
    let (b, h, m, k, t) = (2, 3, 9, 16, 20);
    let q = Tensor::randn(0f32, 1.0, (b, h, m, k), &Device::Cpu).unwrap();
    let keys = Tensor::randn(0f32, 1.0, (b, h, t, k), &Device::Cpu).unwrap();
    // The first 13 keys: each matrix row-major, the batch strided by all 20.
    let seen = keys.narrow(2, 0, 13).unwrap();
    let scores = super::batched(&q, &seen, true)
        .unwrap()
        .expect("the kernel runs");
    assert_eq!(scores.dims(), &[b, h, m, 13]);
    let want = q.matmul(&seen.contiguous().unwrap().t().unwrap()).unwrap();
    let diff = (&scores - &want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    // Values, not transposed; one matrix checked bit for bit against the kernel alone.
    let values = seen.contiguous().unwrap();
    let y = super::batched(&scores, &values, false)
        .unwrap()
        .expect("the kernel runs");
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let one = product(
        Lhs::Plain(&flat(&scores.get(1).unwrap().get(2).unwrap())),
        m,
        13,
        Rhs::Plain(&flat(&values.get(1).unwrap().get(2).unwrap())),
        k,
        1,
    );
    assert_eq!(Some(flat(&y.get(1).unwrap().get(2).unwrap())), one);
    // Too few rows, or a transposed left side: candle's product.
    let few = q.narrow(2, 0, 2).unwrap().contiguous().unwrap();
    assert!(super::batched(&few, &seen, true).unwrap().is_none());
    let turned = q.transpose(2, 3).unwrap();
    assert!(super::batched(&turned, &q, false).unwrap().is_none());
}

/// bf16 products: the operands rounded to bf16 and multiplied exactly, summed in f32 — within
/// f32 rounding of the same sum in f64, on every edge shape; NaN still reaches its outputs.
#[test]
fn bf16_products_sum_the_rounded_operands() {
    use super::{bf16_detected, product_in, Precision};
    if !bf16_detected() {
        eprintln!("no AVX512-BF16 here: nothing to test");
        return;
    }
    let round = |x: f32| half::bf16::from_f32(x).to_f32();
    for c in Case::all(13) {
        let (m, k, n) = (c.m, c.k, c.n);
        let got = product_in(Precision::Bf16, Lhs::Plain(&c.a), m, k, c.rhs(), n, 2).unwrap();
        for i in 0..m {
            for j in 0..n {
                let terms =
                    (0..k).map(|p| round(c.a[i * k + p]) as f64 * round(c.b_at(p, j)) as f64);
                let (exact, size) = terms.fold((0f64, 0f64), |(s, z), t| (s + t, z + t.abs()));
                let err = (got[i * n + j] as f64 - exact).abs();
                assert!(
                    err <= 1e-6 * size + 1e-30,
                    "[{m}, {k}, {n}] ({i}, {j}): {err}"
                );
            }
        }
    }
    let mut a = vec![1f32; 3 * 4];
    a[4] = f32::NAN;
    let c = product_in(
        Precision::Bf16,
        Lhs::Plain(&a),
        3,
        4,
        Rhs::Plain(&[1.0; 8]),
        2,
        1,
    )
    .unwrap();
    assert_eq!(&c[..2], &[4.0, 4.0]);
    assert!(c[2].is_nan() && c[3].is_nan());
    assert_eq!(&c[4..], &[4.0, 4.0]);
}
