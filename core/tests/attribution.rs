//! Attribution patching against exact causal tracing: equal where the effect is linear (a
//! corruption small enough that every restoration's effect is first-order; one layer per cell,
//! since a window's estimate adds its layers' and so ignores how patching one changes the next),
//! correlated on SmolLM2 at the usual corruption, and exactly `low` before the subject.

mod common;

use loci_core::study::regress::pearson;
use loci_core::trace::{NoiseSpec, Quiet, TraceKind, TraceMethod, TraceRequest, TraceResult};
use loci_core::LoadedModel;

fn both(lm: &LoadedModel, req: &TraceRequest) -> (TraceResult, TraceResult) {
    let exact = lm.trace(req, None, &mut Quiet, 1).unwrap();
    let atp = lm.trace_attribution(req, None, &mut Quiet).unwrap();
    assert_eq!(atp.method, TraceMethod::Attribution);
    assert_eq!(exact.method, TraceMethod::Exact);
    assert_eq!(atp.high, exact.high);
    // `low` comes from attribution's own corrupted pass, under autograd: the same run as the
    // exact trace's, rounded apart by its operations.
    assert!(
        (atp.low - exact.low).abs() < 1e-6,
        "low {} against {}",
        atp.low,
        exact.low
    );
    (exact, atp)
}

#[test]
fn with_a_small_corruption_the_estimate_is_the_exact_effect() {
    let lm = common::tiny("tiny-gpt2");
    let mut req = TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
    req.samples = 3;
    req.window = 1;
    let mut worst = vec![];
    for sigma in [0.02, 0.002] {
        req.noise = NoiseSpec::Fixed(sigma);
        let (exact, atp) = both(&lm, &req);
        let mut err = 0f64;
        for kind in TraceKind::ALL {
            let (e, a) = (exact.cell_effects(kind), atp.cell_effects(kind));
            let biggest = e.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(biggest > 1e-7, "{kind:?}: the corruption must matter");
            let off = e
                .iter()
                .zip(&a)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            err = err.max(off / biggest);
            // Tokens before the subject are untouched by the corruption: exactly `low`.
            let first = atp.subject_range[0];
            assert!(atp.scores[&kind][..first]
                .iter()
                .flatten()
                .all(|&p| p == atp.low));
        }
        worst.push(err);
    }
    // First-order: the error shrinks with the corruption, and is small when it is small.
    assert!(worst[1] < 0.05, "relative error {worst:?}");
    assert!(worst[1] < 0.5 * worst[0], "relative error {worst:?}");
}

#[test]
fn on_smollm2_the_estimate_follows_exact_tracing() {
    let Some(lm) = common::smol() else { return };
    let mut req = TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
    req.samples = 3;
    req.noise = NoiseSpec::Fixed(0.35);
    let (exact, atp) = both(lm, &req);
    for (kind, bound) in [
        (TraceKind::Hidden, 0.7),
        (TraceKind::Mlp, 0.6),
        (TraceKind::Attn, 0.8),
    ] {
        let r = pearson(&exact.cell_effects(kind), &atp.cell_effects(kind))
            .expect("neither grid is constant")
            .r;
        eprintln!("{kind:?}: Pearson {r:.3}");
        assert!(r > bound, "{kind:?}: Pearson {r:.3}");
    }
}
