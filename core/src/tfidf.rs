//! ROME's generation consistency: TF-IDF cosine similarity between a model's generations and
//! reference texts about the new target, with IDF weights fitted on a Wikipedia corpus. The
//! vectoriser follows scikit-learn's `TfidfVectorizer` defaults, as ROME uses them: lowercase,
//! tokens of two or more word characters, raw term counts, smoothed IDF
//! `ln((1 + n) / (1 + df)) + 1`, L2-normalised vectors; words outside the fitted vocabulary
//! are ignored.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Words of two or more word characters (letters, digits, `_`), lowercased.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.chars().count() >= 2)
        .map(str::to_lowercase)
}

/// Smoothed IDF weights fitted on a corpus: the vocabulary of a TF-IDF vectoriser.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Idf {
    /// Number of documents the weights were fitted on.
    pub documents: usize,
    /// Each word seen in the corpus → `ln((1 + n) / (1 + df)) + 1`.
    pub weights: HashMap<String, f64>,
}

impl Idf {
    /// Fits the IDF weights on `documents`, counting each word once per document.
    pub fn fit<S: AsRef<str>>(documents: impl IntoIterator<Item = S>) -> Self {
        let mut df: HashMap<String, usize> = HashMap::new();
        let mut n = 0usize;
        for d in documents {
            n += 1;
            let mut seen: Vec<String> = words(d.as_ref()).collect();
            seen.sort_unstable();
            seen.dedup();
            for w in seen {
                *df.entry(w).or_default() += 1;
            }
        }
        let weights = df
            .into_iter()
            .map(|(w, f)| (w, ((1 + n) as f64 / (1 + f) as f64).ln() + 1.0))
            .collect();
        Self {
            documents: n,
            weights,
        }
    }

    /// The L2-normalised TF-IDF vector of `text` (sparse: word → weight).
    pub fn vector(&self, text: &str) -> HashMap<String, f64> {
        let mut tf: HashMap<String, f64> = HashMap::new();
        for w in words(text) {
            if self.weights.contains_key(&w) {
                *tf.entry(w).or_default() += 1.0;
            }
        }
        for (w, x) in tf.iter_mut() {
            *x *= self.weights[w];
        }
        let norm = tf.values().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 0.0 {
            tf.values_mut().for_each(|x| *x /= norm);
        }
        tf
    }

    /// Cosine similarity of the two texts' TF-IDF vectors (0 when either has no known word).
    pub fn similarity(&self, a: &str, b: &str) -> f64 {
        let (va, vb) = (self.vector(a), self.vector(b));
        let (small, big) = if va.len() < vb.len() {
            (&va, &vb)
        } else {
            (&vb, &va)
        };
        small
            .iter()
            .filter_map(|(w, x)| big.get(w).map(|y| x * y))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_scikit_learns_tfidf_vectoriser() {
        // scikit-learn 1.x: TfidfVectorizer().fit(docs), then the cosine of
        // transform(["Paris is BIG!", "big paris city, unknownword"]) is 0.6666666666666669
        // (vocabulary big, city, is, paris, the; idf 1.2877 for all but "the", 1.6931).
        let docs = ["Paris is a city", "the big city", "paris is big"];
        let idf = Idf::fit(docs);
        assert_eq!(idf.documents, 3);
        assert!((idf.weights["paris"] - ((4f64 / 3.0).ln() + 1.0)).abs() < 1e-12);
        assert!(!idf.weights.contains_key("a"));
        let (p, i, b, c) = (
            idf.weights["paris"],
            idf.weights["is"],
            idf.weights["big"],
            idf.weights["city"],
        );
        let na = (p * p + i * i + b * b).sqrt();
        let nb = (b * b + p * p + c * c).sqrt();
        let want = (p * p + b * b) / na / nb;
        let got = idf.similarity("Paris is BIG!", "big paris city, unknownword");
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!((got - 0.666_666_666_666_666_9).abs() < 1e-12);
        assert!((idf.weights["the"] - 1.693_147_18).abs() < 1e-8);
        assert!((idf.similarity("paris", "paris") - 1.0).abs() < 1e-12);
        assert_eq!(idf.similarity("paris", "zzz qqq"), 0.0);
    }
}
