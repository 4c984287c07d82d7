//! Key statistics: the uncentred second moment C = E[k kᵀ] of the MLP keys (the down-projection's
//! input) at a layer, over a text corpus (docs/rome.md#key-statistics). ROME whitens its update
//! with C⁻¹.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::gram::{gram, Gram, GramSum};
use crate::error::{LociError, Result};
use crate::hooks::{Capture, Site};
use crate::loader::LoadedModel;
use crate::model::LogitsAt;

/// Where a statistic came from: it only fits the model, layer and width it was made for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatsProvenance {
    /// Name of the model the keys came from (for messages).
    pub model: String,
    /// That model's [`ModelInfo::fingerprint`](crate::loader::ModelInfo::fingerprint): what
    /// [`KeyStats::check_fits`] compares.
    pub fingerprint: String,
    /// The layer whose MLP keys were collected.
    pub layer: usize,
    /// Width of the keys: C is `[d_ff, d_ff]`.
    pub d_ff: usize,
    /// Name of the text corpus, as the caller gave it.
    pub corpus: String,
    /// Number of key vectors (tokens) averaged.
    pub tokens: u64,
    /// Number of non-empty texts that contributed.
    pub texts: u64,
    /// The length each text was truncated to, in tokens.
    pub max_len: usize,
}

/// C for one layer: `mom2[i][j] = E[k_i k_j]` over `count` tokens.
#[derive(Clone, Debug)]
pub struct KeyStats {
    /// Which model, layer and corpus C was made from.
    pub provenance: StatsProvenance,
    /// `[d_ff, d_ff]` f32.
    pub mom2: Tensor,
    /// C's Cholesky factor, made on first use and shared by clones: a second edit at the same
    /// layer does not factor again.
    factor: std::sync::Arc<std::sync::OnceLock<super::linalg::CholeskyFactor>>,
    /// C's eigen-decomposition (AlphaEdit's null space), made on first use, shared by clones.
    eigen: std::sync::Arc<std::sync::OnceLock<super::linalg::SymmetricEigen>>,
}

/// Accumulates Σ k kᵀ for several layers in one pass: each text's product in f32, summed in f64
/// (on the CPU only the blocks on and above the diagonal, added in place into a host sum; on a
/// GPU on the device).
pub struct StatsAccumulator {
    layers: Vec<usize>,
    d_ff: usize,
    sums: Vec<GramSum>,
    tokens: u64,
    texts: u64,
    max_len: usize,
}

impl StatsAccumulator {
    /// `max_len`: each text is truncated to this many tokens (ROME: the model's context).
    pub fn new(lm: &LoadedModel, layers: &[usize], max_len: usize) -> Result<Self> {
        let n = lm.model.n_layer();
        if layers.is_empty() {
            return Err(LociError::input("no layers asked for"));
        }
        if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
            return Err(LociError::input(format!(
                "layer {bad} out of range (the model has {n} layers)"
            )));
        }
        let d_ff = lm.model.cfg.d_ff;
        Ok(Self {
            layers: layers.to_vec(),
            d_ff,
            sums: (0..layers.len())
                .map(|_| GramSum::new(d_ff, &lm.model.device))
                .collect::<Result<_>>()?,
            tokens: 0,
            texts: 0,
            max_len: max_len.clamp(1, lm.model.cfg.max_positions),
        })
    }

    /// Tokens (key vectors) summed so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Runs one text (truncated) up to the deepest layer and adds its keys. Returns its tokens.
    pub fn add_text(&mut self, lm: &LoadedModel, text: &str) -> Result<usize> {
        self.add_texts(lm, &[text])
    }

    /// Adds several texts, computed on `threads::workers()` threads and summed in text order
    /// (the same sums as one text at a time). Returns their tokens.
    pub fn add_texts<S: AsRef<str> + Sync>(
        &mut self,
        lm: &LoadedModel,
        texts: &[S],
    ) -> Result<usize> {
        let whole: Vec<(&str, usize)> = texts.iter().map(|t| (t.as_ref(), usize::MAX)).collect();
        self.add_texts_cut(lm, &whole)
    }

    /// Adds several texts, each cut to at most its number of tokens (besides the maximum
    /// length), so a corpus can be read to an exact token budget ([`TokenBudget`]). Returns
    /// their tokens.
    pub fn add_texts_cut(&mut self, lm: &LoadedModel, texts: &[(&str, usize)]) -> Result<usize> {
        let mut added = 0;
        for chunk in texts.chunks(crate::threads::workers()) {
            let moments = crate::threads::map(chunk, |&(t, cut)| self.moments(lm, t, cut));
            for m in moments {
                let Some((n, grams)) = m? else { continue };
                // All layers or none: a NaN or an infinity in any refuses the text.
                for g in &grams {
                    if !g.is_finite()? {
                        return Err(LociError::model(
                            "NaN or infinite keys while collecting statistics",
                        ));
                    }
                }
                for (sum, g) in self.sums.iter_mut().zip(&grams) {
                    sum.add(g)?;
                }
                self.tokens += n as u64;
                self.texts += 1;
                added += n;
            }
        }
        Ok(added)
    }

    /// The tokens `text` adds (its tokens, cut to the maximum length).
    pub fn text_tokens(&self, lm: &LoadedModel, text: &str) -> Result<usize> {
        Ok(lm.tokenizer.encode(text)?.len().min(self.max_len))
    }

    /// A text's token count (cut to `cut` tokens) and its kᵀk per layer, or None for an empty
    /// text.
    fn moments(
        &self,
        lm: &LoadedModel,
        text: &str,
        cut: usize,
    ) -> Result<Option<(usize, Vec<Gram>)>> {
        let mut ids = lm.tokenizer.encode(text)?;
        ids.truncate(self.max_len.min(cut));
        if ids.is_empty() {
            return Ok(None);
        }
        let deepest = *self.layers.iter().max().expect("layers are not empty");
        let mut cap = Capture::new(self.layers.iter().map(|&l| Site::MlpKey(l)))
            .stopping_after(Site::MlpKey(deepest));
        lm.model.run(
            &lm.model.ids_tensor(std::slice::from_ref(&ids))?,
            &mut cap,
            None,
            LogitsAt::Last,
        )?;
        let mut out = Vec::with_capacity(self.layers.len());
        for &l in &self.layers {
            let k = cap.get(Site::MlpKey(l))?.squeeze(0)?.to_dtype(DType::F32)?;
            out.push(gram(&k)?);
        }
        Ok(Some((ids.len(), out)))
    }

    /// E[k kᵀ] per layer.
    pub fn finish(self, lm: &LoadedModel, corpus: &str) -> Result<Vec<KeyStats>> {
        if self.tokens == 0 {
            return Err(LociError::input("no tokens were seen: the corpus is empty"));
        }
        self.layers
            .iter()
            .zip(self.sums)
            .map(|(&layer, sum)| {
                let mean = sum.mean(self.tokens)?;
                Ok(KeyStats {
                    provenance: StatsProvenance {
                        model: lm.name.clone(),
                        fingerprint: lm.info.fingerprint.clone(),
                        layer,
                        d_ff: self.d_ff,
                        corpus: corpus.to_string(),
                        tokens: self.tokens,
                        texts: self.texts,
                        max_len: self.max_len,
                    },
                    mom2: Tensor::from_vec(mean, (self.d_ff, self.d_ff), &Device::Cpu)?,
                    factor: Default::default(),
                    eigen: Default::default(),
                })
            })
            .collect()
    }
}

/// An exact token budget for statistics: texts, in order, each take their tokens until the
/// budget is spent, the last one cut to what is left (so "20,000 tokens" means 20,000 whether
/// the texts are read by one process or spread over a tab's workers).
#[derive(Clone, Copy, Debug)]
pub struct TokenBudget {
    left: u64,
}

impl TokenBudget {
    /// A budget of `tokens`.
    pub fn new(tokens: u64) -> Self {
        Self { left: tokens }
    }

    /// Whether the budget is spent.
    pub fn spent(&self) -> bool {
        self.left == 0
    }

    /// How many of a text's `tokens` (already cut to the maximum length) it may add: all of
    /// them, what is left, or 0 once the budget is spent.
    pub fn take(&mut self, tokens: usize) -> usize {
        let n = (tokens as u64).min(self.left);
        self.left -= n;
        n as usize
    }

    /// Each text's share of the budget, for texts of these token counts.
    pub fn plan(mut self, counts: &[usize]) -> Vec<usize> {
        counts.iter().map(|&n| self.take(n)).collect()
    }
}

impl KeyStats {
    /// The Cholesky factor of C, computed on `device` the first time.
    pub fn factor(&self, device: &Device) -> Result<&super::linalg::CholeskyFactor> {
        if let Some(f) = self.factor.get() {
            return Ok(f);
        }
        let f = super::linalg::CholeskyFactor::new(&self.mom2.to_device(device)?)?;
        let _ = self.factor.set(f);
        Ok(self.factor.get().expect("just set"))
    }

    /// The eigen-decomposition of C (on the host, f64), computed the first time.
    pub fn eigen(&self) -> Result<&super::linalg::SymmetricEigen> {
        if let Some(e) = self.eigen.get() {
            return Ok(e);
        }
        let d = self.provenance.d_ff;
        let c: Vec<f64> = self.mom2.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let _ = self.eigen.set(super::linalg::symmetric_eigen(&c, d)?);
        Ok(self.eigen.get().expect("just set"))
    }

    /// Statistics with a made-up provenance around `mom2` (`[d_ff, d_ff]`), for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(mom2: Tensor) -> Self {
        let d_ff = mom2.dim(0).expect("a matrix");
        Self {
            provenance: StatsProvenance {
                model: "test".into(),
                fingerprint: "test".into(),
                layer: 0,
                d_ff,
                corpus: "test".into(),
                tokens: 1,
                texts: 1,
                max_len: 1,
            },
            mom2,
            factor: Default::default(),
            eigen: Default::default(),
        }
    }

    /// Statistics of one corpus collected in parts (the tab's workers each take a share of the
    /// texts): C of the whole is the token-weighted mean of the parts' C. Parts of another
    /// model, layer, width, corpus or truncation are refused.
    pub fn merge(parts: &[KeyStats]) -> Result<KeyStats> {
        let first = parts
            .first()
            .ok_or_else(|| LociError::input("no statistics to merge"))?;
        let p0 = &first.provenance;
        let same = |p: &StatsProvenance| {
            (&p.fingerprint, p.layer, p.d_ff, &p.corpus, p.max_len)
                == (&p0.fingerprint, p0.layer, p0.d_ff, &p0.corpus, p0.max_len)
        };
        if let Some(p) = parts.iter().map(|s| &s.provenance).find(|p| !same(p)) {
            return Err(LociError::input(format!(
                "cannot merge statistics of {} layer {} ({}) with {} layer {} ({})",
                p0.model, p0.layer, p0.corpus, p.model, p.layer, p.corpus
            )));
        }
        let tokens: u64 = parts.iter().map(|s| s.provenance.tokens).sum();
        if tokens == 0 {
            return Err(LociError::input("no tokens were seen: the corpus is empty"));
        }
        let mut sum = Tensor::zeros(first.mom2.dims(), DType::F64, &Device::Cpu)?;
        for s in parts {
            let w = s.provenance.tokens as f64 / tokens as f64;
            sum = (sum + (s.mom2.to_device(&Device::Cpu)?.to_dtype(DType::F64)? * w)?)?;
        }
        Ok(KeyStats {
            provenance: StatsProvenance {
                tokens,
                texts: parts.iter().map(|s| s.provenance.texts).sum(),
                ..p0.clone()
            },
            mom2: sum.to_dtype(DType::F32)?,
            factor: Default::default(),
            eigen: Default::default(),
        })
    }

    /// Refuses statistics made for another model, layer or width.
    pub fn check_fits(&self, lm: &LoadedModel, layer: usize) -> Result<()> {
        let p = &self.provenance;
        if p.fingerprint != lm.info.fingerprint || p.d_ff != lm.model.cfg.d_ff {
            return Err(LociError::input(format!(
                "these statistics were made for model {} ({}), not {} ({})",
                p.model, p.fingerprint, lm.name, lm.info.fingerprint
            )));
        }
        if p.layer != layer {
            return Err(LociError::input(format!(
                "these statistics are for layer {}, not {layer}",
                p.layer
            )));
        }
        Ok(())
    }

    /// The statistics as safetensors bytes, provenance in the header's metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let data = self
            .mom2
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        super::file::write(
            "loci_stats",
            &self.provenance,
            &[("mom2".into(), self.mom2.dims().to_vec(), &data)],
        )
    }

    /// Reads statistics written by [`KeyStats::to_bytes`] (C lands on the CPU).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |e: String| LociError::model(format!("not a Loci statistics file: {e}"));
        let (provenance, file): (StatsProvenance, _) =
            super::file::read(bytes, "loci_stats", "no provenance", bad)?;
        let d = provenance.d_ff;
        let (data, shape) = file.f32("mom2")?;
        if shape != [d, d] {
            return Err(file.bad(format!("mom2 has shape {shape:?}")));
        }
        Ok(Self {
            provenance,
            mom2: Tensor::from_vec(data, (d, d), &Device::Cpu)?,
            factor: Default::default(),
            eigen: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBudget;

    #[test]
    fn a_budget_takes_texts_in_order_and_cuts_the_one_that_crosses_it() {
        assert_eq!(TokenBudget::new(10).plan(&[4, 4, 4, 4]), vec![4, 4, 2, 0]);
        assert_eq!(TokenBudget::new(100).plan(&[4, 0, 5]), vec![4, 0, 5]);
        let mut b = TokenBudget::new(3);
        assert!(!b.spent());
        assert_eq!(b.take(5), 3);
        assert!(b.spent());
        assert_eq!(b.take(5), 0);
    }
}
