//! The regressions of Hase et al.'s analysis (docs/study.md#the-regressions-and-f-tests): how much
//! of an edit score's variance the edited layer explains, how much the tracing effect explains, and
//! how much the tracing effect adds to the layer (a nested-model F-test) — least squares in closed
//! form, since every model here is a mean or a line per group.

use serde::{Deserialize, Serialize};

/// One fitted model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Fit {
    /// 1 − RSS/TSS; `None` when the scores do not vary.
    pub r2: Option<f64>,
    /// Residual sum of squares.
    pub rss: f64,
    /// Identifiable parameters (R's rank).
    pub params: usize,
    /// Residual degrees of freedom: observations − `params` (floored at 0).
    pub df_resid: usize,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn tss(y: &[f64]) -> f64 {
    let m = mean(y);
    y.iter().map(|v| (v - m).powi(2)).sum()
}

fn fit(y: &[f64], rss: f64, params: usize) -> Fit {
    let t = tss(y);
    Fit {
        r2: (t > 0.0).then(|| 1.0 - rss / t),
        rss,
        params,
        df_resid: y.len().saturating_sub(params),
    }
}

/// Least squares of `y` on a line in `x` (rss, params): a constant when `x` does not vary.
fn line_rss(y: &[f64], x: &[f64]) -> (f64, usize) {
    let (my, mx) = (mean(y), mean(x));
    let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|v| (v - my).powi(2)).sum();
    if y.len() < 2 || sxx <= 1e-12 * (1.0 + mx * mx) * x.len() as f64 {
        return (syy, 1);
    }
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    ((syy - sxy * sxy / sxx).max(0.0), 2)
}

/// Indices of each distinct group, in first-seen order.
fn groups(g: &[usize]) -> Vec<Vec<usize>> {
    let mut keys: Vec<usize> = vec![];
    let mut out: Vec<Vec<usize>> = vec![];
    for (i, k) in g.iter().enumerate() {
        match keys.iter().position(|x| x == k) {
            Some(j) => out[j].push(i),
            None => {
                keys.push(*k);
                out.push(vec![i]);
            }
        }
    }
    out
}

/// `y ~ factor(g)`: a mean per group.
pub fn fit_groups(y: &[f64], g: &[usize]) -> Fit {
    let gs = groups(g);
    let rss = gs
        .iter()
        .map(|idx| tss(&idx.iter().map(|&i| y[i]).collect::<Vec<_>>()))
        .sum();
    fit(y, rss, gs.len())
}

/// `y ~ x`: one line.
pub fn fit_line(y: &[f64], x: &[f64]) -> Fit {
    let (rss, params) = line_rss(y, x);
    fit(y, rss, params)
}

/// `y ~ factor(g) * x`: an intercept and a slope per group.
pub fn fit_group_lines(y: &[f64], x: &[f64], g: &[usize]) -> Fit {
    let mut rss = 0.0;
    let mut params = 0;
    for idx in groups(g) {
        let yy: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
        let xx: Vec<f64> = idx.iter().map(|&i| x[i]).collect();
        let (r, p) = line_rss(&yy, &xx);
        rss += r;
        params += p;
    }
    fit(y, rss, params)
}

/// The nested-model F-test of `small` inside `big` (R's `anova(small, big)`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FTest {
    /// The F statistic: (ΔRSS / df1) / (RSS_big / df2); infinite when `big` fits exactly.
    pub f: f64,
    /// Numerator degrees of freedom: the extra parameters of `big`.
    pub df1: usize,
    /// Denominator degrees of freedom: `big`'s residual degrees of freedom.
    pub df2: usize,
    /// P(F(df1, df2) ≥ f): the upper-tail p-value.
    pub p: f64,
}

/// Tests whether `big` explains significantly more than the `small` model nested in it; `None`
/// when `big` has no extra parameters or no residual degrees of freedom.
pub fn f_test(small: &Fit, big: &Fit) -> Option<FTest> {
    let df1 = small.df_resid.checked_sub(big.df_resid)?;
    let df2 = big.df_resid;
    if df1 == 0 || df2 == 0 {
        return None;
    }
    let (d1, d2) = (df1 as f64, df2 as f64);
    if big.rss <= 0.0 {
        return Some(FTest {
            f: f64::INFINITY,
            df1,
            df2,
            p: 0.0,
        });
    }
    let f = ((small.rss - big.rss).max(0.0) / d1) / (big.rss / d2);
    let p = inc_beta(d2 / 2.0, d1 / 2.0, d2 / (d2 + d1 * f));
    Some(FTest { f, df1, df2, p })
}

/// Pearson's correlation with its two-sided t-test p-value (R's `cor.test`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Correlation {
    /// Pearson's r, in [−1, 1].
    pub r: f64,
    /// Number of pairs.
    pub n: usize,
    /// Two-sided p-value of r = 0 (t-test with n − 2 degrees of freedom).
    pub p: f64,
}

/// Pearson's correlation of `x` and `y`; `None` with fewer than 3 pairs, unequal lengths or
/// either variable constant.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<Correlation> {
    let n = x.len();
    if n < 3 || y.len() != n {
        return None;
    }
    let (mx, my) = (mean(x), mean(y));
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    if sxx <= 0.0 || syy <= 0.0 {
        return None;
    }
    let r = (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0);
    let df = (n - 2) as f64;
    let p = if r.abs() >= 1.0 {
        0.0
    } else {
        let t2 = r * r * df / (1.0 - r * r);
        inc_beta(df / 2.0, 0.5, df / (df + t2))
    };
    Some(Correlation { r, n, p })
}

/// Spearman's ρ: Pearson's r of the ranks, ties sharing their mean rank (the p-value is
/// Pearson's t-test on the ranks, the usual large-sample approximation).
pub fn spearman(x: &[f64], y: &[f64]) -> Option<Correlation> {
    pearson(&ranks(x), &ranks(y))
}

/// Each value's rank (1 for the smallest), tied values their mean rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = mean_rank;
        }
        i = j + 1;
    }
    out
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularised incomplete beta function I_x(a, b).
pub fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    // The continued fraction converges fast for x < (a + 1)/(a + b + 2); use symmetry beyond.
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of I_x(a, b) (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let floor = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / floor(1.0 - qab * x / qap);
    let mut h = d;
    // One term of the fraction: updates c and d, and gives the factor h takes.
    let mut term = |aa: f64| {
        d = 1.0 / floor(1.0 + aa * d);
        c = floor(1.0 + aa / c);
        d * c
    };
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        h *= term(m * (b - m) * x / ((qam + m2) * (a + m2)));
        let del = term(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)));
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from numpy's least squares and scipy.stats (f.sf, pearsonr, special.betainc) on
    /// the same data.
    #[test]
    fn fits_and_tests_match_numpy_and_scipy() {
        let n = 40;
        let g: Vec<usize> = (0..n).map(|i| (i * 7) % 4).collect();
        let x: Vec<f64> = (0..n)
            .map(|i| (i as f64 * 0.37).sin() * 0.5 + 0.5)
            .collect();
        let y: Vec<f64> = (0..n)
            .map(|i| {
                let gi = g[i] as f64;
                let bump = if g[i] == 2 { 0.8 * x[i] } else { 0.0 };
                0.3 * gi + bump - 0.2 * x[i] + 0.1 * (i as f64 * 1.3).cos()
            })
            .collect();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
        let layer = fit_groups(&y, &g);
        let trace = fit_line(&y, &x);
        let both = fit_group_lines(&y, &x, &g);
        assert!(close(layer.r2.unwrap(), 0.9240559424039515), "{layer:?}");
        assert!(close(trace.r2.unwrap(), 0.0007005060944440533), "{trace:?}");
        assert!(close(both.r2.unwrap(), 0.9785039055738257), "{both:?}");
        assert_eq!((layer.params, trace.params, both.params), (4, 2, 8));
        let f = f_test(&layer, &both).unwrap();
        assert_eq!((f.df1, f.df2), (4, 32));
        assert!(close(f.f, 20.26338816360118), "{f:?}");
        assert!((f.p - 2.1171884737484004e-08).abs() < 1e-14, "{f:?}");
        let c = pearson(&x, &y).unwrap();
        assert!(close(c.r, 0.026467075668539747));
        assert!((c.p - 0.8712170774292375).abs() < 1e-9, "{c:?}");
        assert!((inc_beta(2.5, 3.5, 0.3) - 0.29675298929566646).abs() < 1e-12);
        assert!((inc_beta(10.0, 0.5, 0.9) - 0.15164090963470994).abs() < 1e-12);
        // Degenerate data: constant scores have no R²; one group with constant x is a mean.
        let flat = fit_groups(&[1.0, 1.0, 1.0], &[0, 1, 0]);
        assert_eq!(flat.r2, None);
        let one = fit_group_lines(&[1.0, 2.0, 3.0], &[0.5, 0.5, 0.5], &[0, 0, 0]);
        assert_eq!(one.params, 1);
        assert!(f_test(&one, &one).is_none());
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_none());
        // Spearman's ρ with ties (ranks 1, 2.5, 2.5, 5, 4, 6 and 2, 1, 3.5, 3.5, 5, 6), and a
        // monotone but not linear relation ranked perfectly.
        let rho = spearman(
            &[1.0, 2.0, 2.0, 5.0, 3.0, 9.0],
            &[2.0, 1.0, 4.0, 4.0, 6.0, 7.0],
        );
        assert!((rho.unwrap().r - 0.779_411_764_705_882_5).abs() < 1e-12);
        let cubes = [1.0, 8.0, 27.0, 64.0];
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &cubes).unwrap().r - 1.0).abs() < 1e-12);
    }
}
