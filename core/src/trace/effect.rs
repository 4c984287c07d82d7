//! From grids to numbers: Hase et al.'s per-layer tracing effect
//! (docs/tracing.md#the-grid-and-the-effects) and the average indirect effects over many facts
//! (Meng et al.; docs/tracing.md#many-facts-known_1000-runs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{TraceKind, TraceResult};

/// Per layer, the largest fraction of the corruption's damage that one restored state undoes:
/// `max(0, (p − low) / (high − low))`, maximised over tokens (or read at `token` only).
/// All zeros when the corruption did not lower the answer's probability.
pub fn tracing_effect(grid: &[Vec<f32>], high: f32, low: f32, token: Option<usize>) -> Vec<f32> {
    let n = grid.first().map_or(0, Vec::len);
    let total = high - low;
    if total <= 0.0 {
        return vec![0.0; n];
    }
    let frac = |p: f32| ((p - low) / total).max(0.0);
    (0..n)
        .map(|l| match token {
            Some(t) => grid.get(t).map_or(0.0, |row| frac(row[l])),
            None => grid.iter().map(|row| frac(row[l])).fold(0.0, f32::max),
        })
        .collect()
}

/// Average indirect effects (`p_restored − low`) per layer over many traces, at the last subject
/// token and at the last token, per kind; and the average total effect (`high − low`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AggregateCurves {
    /// How many traces were averaged.
    pub n_facts: usize,
    /// Mean of `high − low` over the traces: how much the corruption lowered the answer.
    pub average_total_effect: f32,
    /// Per kind, the mean `p_restored − low` per layer when the last subject token is restored.
    pub last_subject_token: BTreeMap<TraceKind, Vec<f32>>,
    /// The same when the prompt's last token is restored.
    pub last_token: BTreeMap<TraceKind, Vec<f32>>,
}

impl AggregateCurves {
    /// Averages the curves of `traces` (empty curves and `n_facts` 0 when there are none).
    pub fn from_traces(traces: &[TraceResult]) -> Self {
        let mut out = AggregateCurves {
            n_facts: traces.len(),
            ..Default::default()
        };
        if traces.is_empty() {
            return out;
        }
        let inv = 1.0 / traces.len() as f32;
        out.average_total_effect = traces.iter().map(|t| t.high - t.low).sum::<f32>() * inv;
        for tr in traces {
            let subj_last = tr.subject_range[1] - 1;
            for (kind, grid) in &tr.scores {
                let last = grid.len() - 1;
                for (token, curves) in [
                    (subj_last, &mut out.last_subject_token),
                    (last, &mut out.last_token),
                ] {
                    let acc = curves
                        .entry(*kind)
                        .or_insert_with(|| vec![0.0; grid[token].len()]);
                    for (a, p) in acc.iter_mut().zip(&grid[token]) {
                        *a += (p - tr.low) * inv;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effect_is_clipped_fraction_max_over_tokens() {
        let grid = vec![
            vec![0.1, 0.1, 0.1],
            vec![0.2, 0.9, 0.0],
            vec![0.5, 0.3, 0.05],
        ];
        let e = tracing_effect(&grid, 0.9, 0.1, None);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&e, &[0.5, 1.0, 0.0]), "{e:?}");
        let e = tracing_effect(&grid, 0.9, 0.1, Some(2));
        assert!(close(&e, &[0.5, 0.25, 0.0]), "{e:?}");
        assert_eq!(tracing_effect(&grid, 0.1, 0.2, None), vec![0.0; 3]);
    }
}
