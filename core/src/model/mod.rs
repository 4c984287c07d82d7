//! One transformer skeleton for every family: embed → blocks (with hook sites) → final norm →
//! logits.

pub mod describe;
pub mod fused;
mod gpt2;
mod gptj;
pub mod layers;
mod llama;
pub mod load;
mod neox;
pub mod save;
pub mod split;

use candle_core::{DType, Device, Tensor, D};

use crate::config::{Family, ModelConfig};
use crate::error::{LociError, Result};
use crate::hooks::{Hook, Site};
use layers::{Attention, LayerCache, Linear, Mlp, Norm};
use load::{WeightSource, Weights};

/// One transformer block: its norms, attention and MLP (hook sites `Attn`, `MlpKey`, `Mlp`,
/// `Block` at its layer).
#[derive(Clone, Debug)]
pub struct Block {
    /// The norm before attention (in GPT-J, before the MLP too).
    pub ln1: Norm,
    /// The norm before the MLP; `None` for GPT-J, whose MLP reads `ln1`'s output.
    pub ln2: Option<Norm>,
    /// Attention and MLP both read the block's input and add to the residual together (GPT-J,
    /// GPT-NeoX); else the MLP reads the residual after attention (GPT-2, LLaMA).
    pub parallel: bool,
    /// A norm on the attention's output before it joins the residual (Gemma-2); the `Attn`
    /// site sees the output before it.
    pub post_attn: Option<Norm>,
    /// A norm on the MLP's output before it joins the residual (Gemma-2); the `Mlp` site sees
    /// the down-projection's output before it, so edits still solve for that output.
    pub post_mlp: Option<Norm>,
    /// Self-attention.
    pub attn: Attention,
    /// The MLP; its down-projection is what edits rewrite.
    pub mlp: Mlp,
}

/// Which positions get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsAt {
    /// Every position: `[b, t, vocab]`.
    All,
    /// The last position only: `[b, vocab]`.
    Last,
}

/// Keys and values of all layers, for incremental decoding.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// One cache per layer, in layer order (empty until a pass fills it).
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// Positions cached so far (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|c| c.k.as_ref())
            .map_or(0, |k| k.dims()[2])
    }
    /// Whether no position is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A transformer language model of any family: embeddings, blocks, final norm and head, on one
/// device in one dtype.
#[derive(Clone, Debug)]
pub struct Model {
    /// The architecture.
    pub cfg: ModelConfig,
    /// `[vocab, d]` token embeddings.
    pub wte: Tensor,
    /// `[positions, d]` learned positions (GPT-2 only).
    pub wpe: Option<Tensor>,
    /// The transformer blocks, first to last.
    pub blocks: Vec<Block>,
    /// The final norm, before the head.
    pub ln_f: Norm,
    /// The unembedding, `[vocab, d]` (the token embeddings when tied).
    pub lm_head: Linear,
    /// The dtype of the weights and activations.
    pub dtype: DType,
    /// The device the weights live on.
    pub device: Device,
}

/// Returns early from a block when the hook asked to stop after `site`.
macro_rules! visit {
    ($hook:expr, $site:expr, $x:expr) => {{
        let x = visit($hook, $site, $x)?;
        if $hook.stop_after() == Some($site) {
            return Ok(None);
        }
        x
    }};
}

/// `x` through an output norm, if the block has one.
fn post(norm: &Option<Norm>, x: &Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}

fn visit(hook: &mut dyn Hook, site: Site, x: Tensor) -> Result<Tensor> {
    if !hook.wants(site) {
        return Ok(x);
    }
    match hook.at(site, &x)? {
        Some(y) if y.dims() != x.dims() => Err(LociError::input(format!(
            "hook at {site:?} returned shape {:?} for an activation of shape {:?}",
            y.dims(),
            x.dims()
        ))),
        Some(y) => Ok(y.to_dtype(x.dtype())?),
        None => Ok(x),
    }
}

impl Block {
    /// The block's output from its input `x`, attention output `a` and MLP output `m`.
    pub fn combine(&self, x: &Tensor, a: &Tensor, m: &Tensor) -> Result<Tensor> {
        let (a, m) = (&self.attn_residual(a)?, &post(&self.post_mlp, m)?);
        Ok(if self.parallel {
            // In transformers' order: (attn + mlp) + residual.
            ((a + m)? + x)?
        } else {
            ((x + a)? + m)?
        })
    }

    /// The MLP's input: the block input `x` or the residual after attention (`x + a`), normed;
    /// `n1` is `ln1(x)`, which GPT-J's MLP reads too.
    fn mlp_input(&self, x: &Tensor, a: &Tensor, n1: Tensor) -> Result<Tensor> {
        match (&self.ln2, self.parallel) {
            (Some(ln2), true) => ln2.forward(x),
            (Some(ln2), false) => ln2.forward(&(x + self.attn_residual(a)?)?),
            (None, _) => Ok(n1),
        }
    }

    /// What the attention output `a` adds to the residual stream.
    fn attn_residual(&self, a: &Tensor) -> Result<Tensor> {
        post(&self.post_attn, a)
    }

    /// Keys and values this block's attention makes of block input `x` at positions `pos0..`
    /// (what later positions read of `x`), without computing the block's output.
    pub fn keys_values(&self, x: &Tensor, pos0: usize) -> Result<(Tensor, Tensor)> {
        self.attn.keys_values(&self.ln1.forward(x)?, pos0)
    }

    /// The MLP's output for block input `x` and attention output `a` (no hooks).
    pub fn mlp_output(&self, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        let n1 = match &self.ln2 {
            Some(_) => x.clone(),
            None => self.ln1.forward(x)?,
        };
        let mlp_in = self.mlp_input(x, a, n1)?;
        self.mlp.down().forward(&self.mlp.key(&mlp_in)?)
    }

    /// Runs this block (layer `l`) on `x` at positions `pos0..`; `cache` supplies (and receives)
    /// keys and values of earlier positions. `None` when the hook stopped the pass.
    pub fn forward(
        &self,
        l: usize,
        x: &Tensor,
        pos0: usize,
        cache: Option<&mut LayerCache>,
        hook: &mut dyn Hook,
    ) -> Result<Option<Tensor>> {
        let n1 = self.ln1.forward(x)?;
        let a = self.attn.forward(&n1, pos0, cache)?;
        let a = visit!(hook, Site::Attn(l), a);
        let mlp_in = self.mlp_input(x, &a, n1)?;
        let k = self.mlp.key(&mlp_in)?;
        let k = visit!(hook, Site::MlpKey(l), k);
        let m = self.mlp.down().forward(&k)?;
        let m = visit!(hook, Site::Mlp(l), m);
        let h = self.combine(x, &a, &m)?;
        Ok(Some(visit!(hook, Site::Block(l), h)))
    }
}

impl Model {
    /// Number of blocks.
    pub fn n_layer(&self) -> usize {
        self.blocks.len()
    }

    /// Token ids `[b, t]` (u32) from rows of equal length.
    pub fn ids_tensor(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let t = rows.first().map_or(0, Vec::len);
        if t == 0 || rows.iter().any(|r| r.len() != t) {
            return Err(LociError::input(
                "token rows must be non-empty and of equal length",
            ));
        }
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (rows.len(), t), &self.device)?)
    }

    /// The general forward pass: ids `[b, t]` at positions `cache.len()..`, every site offered to
    /// `hook`. Returns f32 logits (`[b, t, vocab]` or `[b, vocab]`), or `None` if the hook stopped
    /// it.
    pub fn run(
        &self,
        ids: &Tensor,
        hook: &mut dyn Hook,
        mut cache: Option<&mut KvCache>,
        at: LogitsAt,
    ) -> Result<Option<Tensor>> {
        let (_, t) = ids.dims2()?;
        let pos0 = cache.as_ref().map_or(0, |c| c.len());
        if t == 0 {
            return Err(LociError::input("empty input"));
        }
        if pos0 + t > self.cfg.max_positions {
            return Err(LociError::input(format!(
                "{} tokens exceed the model's context of {}",
                pos0 + t,
                self.cfg.max_positions
            )));
        }
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= self.cfg.vocab_size {
            return Err(LociError::input(format!(
                "token id {max_id} outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let (b, _) = ids.dims2()?;
        let emb =
            self.wte
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, self.cfg.d_model))?;
        let emb = visit(hook, Site::Embed, emb)?;
        if hook.stop_after() == Some(Site::Embed) {
            return Ok(None);
        }
        let x = self.stream_in(emb, pos0)?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.n_layer(), LayerCache::default);
        }
        let caches = cache.map(|c| &mut c.layers[..]);
        let Some(x) = self.run_layers(x, 0..self.n_layer(), pos0, caches, hook)? else {
            return Ok(None);
        };
        let x = match at {
            LogitsAt::All => x,
            LogitsAt::Last => x.narrow(1, t - 1, 1)?,
        };
        let logits = self.final_logits(&x)?;
        Ok(Some(match at {
            LogitsAt::All => logits,
            LogitsAt::Last => logits.squeeze(1)?,
        }))
    }

    /// Runs the blocks `layers` on `x`, the residual stream entering the first of them
    /// (`[b, t, d]` at positions `pos0..`): the one entry point for every partial pass, as
    /// TransformerLens's `forward(start_at_layer, stop_at_layer)`. `caches` holds one slot per
    /// layer of the span (earlier positions' keys and values, and they receive the new ones);
    /// every site of those layers is offered to `hook`. Returns the residual after the last
    /// block, or `None` when the hook stopped the pass.
    pub fn run_layers(
        &self,
        mut x: Tensor,
        layers: std::ops::Range<usize>,
        pos0: usize,
        mut caches: Option<&mut [LayerCache]>,
        hook: &mut dyn Hook,
    ) -> Result<Option<Tensor>> {
        if layers.end > self.n_layer() {
            return Err(self.layer_error(layers.end - 1));
        }
        if let Some(c) = &caches {
            if c.len() != layers.len() {
                return Err(LociError::input(format!(
                    "{} cache slots for a span of {} layers",
                    c.len(),
                    layers.len()
                )));
            }
        }
        for (i, l) in layers.enumerate() {
            let slot = caches.as_deref_mut().map(|c| &mut c[i]);
            match self.blocks[l].forward(l, &x, pos0, slot, hook)? {
                Some(h) => x = h,
                None => return Ok(None),
            }
        }
        Ok(Some(x))
    }

    /// The embeddings of one token per row, row `i` the token `ids[i]` at its own position
    /// `pos[i]` (`[b, 1, d]`): the input of a decode step whose rows are at different lengths.
    pub fn embed_rows(&self, ids: &[u32], pos: &[usize]) -> Result<Tensor> {
        if ids.len() != pos.len() || ids.is_empty() {
            return Err(LociError::input("one position per token, and at least one"));
        }
        if let Some(&p) = pos.iter().find(|&&p| p >= self.cfg.max_positions) {
            return Err(LociError::input(format!(
                "position {p} is beyond the model's context of {}",
                self.cfg.max_positions
            )));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(LociError::input(format!(
                "token id {id} outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let b = ids.len();
        let emb = self.wte.index_select(&Tensor::new(ids, &self.device)?, 0)?;
        let emb = match &self.wpe {
            Some(wpe) => {
                let p: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
                (emb + wpe.index_select(&Tensor::new(p.as_slice(), &self.device)?, 0)?)?
            }
            None => self.scaled(emb)?,
        };
        Ok(emb.reshape((b, 1, self.cfg.d_model))?)
    }

    /// The unembedding of residual states `[.., d]`: final norm, then the head; f32 logits.
    pub fn final_logits(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self
            .lm_head
            .forward(&self.ln_f.forward(x)?)?
            .to_dtype(DType::F32)?;
        match self.cfg.quirks.final_softcap {
            Some(c) => Ok(((logits / c)?.tanh()? * c)?),
            None => Ok(logits),
        }
    }

    /// The residual stream entering the first block from the `Embed` site's output `emb`
    /// (`[b, t, d]` at positions `pos0..`): learned positions added (GPT-2), or scaled (Gemma).
    /// Every pass that starts from captured embeddings goes through here.
    pub fn stream_in(&self, emb: Tensor, pos0: usize) -> Result<Tensor> {
        match &self.wpe {
            Some(wpe) => Ok(emb.broadcast_add(&wpe.narrow(0, pos0, emb.dim(1)?)?)?),
            None => self.scaled(emb),
        }
    }

    /// Token embeddings as they enter the residual stream: scaled where the family says
    /// (Gemma: by √d_model, rounded to the model's dtype as transformers does).
    fn scaled(&self, emb: Tensor) -> Result<Tensor> {
        match self.cfg.quirks.embed_scale {
            Some(s) => {
                let s = Tensor::new(s as f32, &Device::Cpu)?.to_dtype(self.dtype)?;
                let s = s.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                Ok((emb * s)?)
            }
            None => Ok(emb),
        }
    }

    /// Logits at every position, no hooks.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.run(ids, &mut crate::hooks::NoHook, None, LogitsAt::All)?
            .ok_or_else(|| LociError::input("forward pass stopped early"))
    }

    /// Next-token probabilities after the last position of each row, `[b, vocab]` f32.
    pub fn next_token_probs(&self, ids: &Tensor, hook: &mut dyn Hook) -> Result<Tensor> {
        let logits = self
            .run(ids, hook, None, LogitsAt::Last)?
            .ok_or_else(|| LociError::input("forward pass stopped early"))?;
        Ok(candle_nn::ops::softmax_last_dim(&logits)?)
    }

    /// The residual stream's width and the model's device: what a hook needs to make vectors
    /// that fit it.
    pub fn width_on_device(&self) -> (usize, &Device) {
        (self.cfg.d_model, &self.device)
    }

    /// The edited matrix of layer `l` (`[d_model, d_ff]`, nn.Linear orientation).
    pub fn down_proj(&self, l: usize) -> Result<&Linear> {
        self.blocks
            .get(l)
            .map(|b| b.mlp.down())
            .ok_or_else(|| self.layer_error(l))
    }

    /// Replaces layer `l`'s down-projection weight; the shape and dtype must not change.
    pub fn set_down_proj_weight(&mut self, l: usize, w: Tensor) -> Result<()> {
        let err = self.layer_error(l);
        let block = self.blocks.get_mut(l).ok_or(err)?;
        let cur = &mut block.mlp.down_mut().weight;
        if cur.dims() != w.dims() || cur.dtype() != w.dtype() {
            return Err(LociError::input(format!(
                "new weight {:?} {:?} does not match {:?} {:?}",
                w.dims(),
                w.dtype(),
                cur.dims(),
                cur.dtype()
            )));
        }
        *cur = w;
        Ok(())
    }

    /// Replaces layer `l`'s down-projection (weight and bias); shapes and dtypes must not change.
    pub fn set_down_proj(&mut self, l: usize, new: Linear) -> Result<()> {
        let cur = self.down_proj(l)?;
        let same = |a: &Tensor, b: &Tensor| a.dims() == b.dims() && a.dtype() == b.dtype();
        let bias_ok = match (&cur.bias, &new.bias) {
            (None, None) => true,
            (Some(a), Some(b)) => same(a, b),
            _ => false,
        };
        if !same(&cur.weight, &new.weight) || !bias_ok {
            return Err(LociError::input(format!(
                "the new down-projection of layer {l} does not match the model's in shape or dtype"
            )));
        }
        *self.blocks[l].mlp.down_mut() = new;
        Ok(())
    }

    fn layer_error(&self, l: usize) -> LociError {
        LociError::input(format!(
            "layer {l} out of range (the model has {} layers)",
            self.n_layer()
        ))
    }

    /// The architecture family.
    pub fn family(&self) -> Family {
        self.cfg.family
    }
}

/// Index of the largest value in a 1-D f32 tensor.
pub fn argmax(v: &Tensor) -> Result<u32> {
    Ok(v.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

/// The unembedding `{name}` (`[vocab, d]`, no bias), or the token embeddings `wte` where the
/// config ties them and the file holds no separate head.
fn load_head(w: &Weights, cfg: &ModelConfig, wte: &Tensor, name: &str) -> Result<Linear> {
    if cfg.tie_embeddings && !w.contains(&format!("{name}.weight")) {
        Ok(Linear::new(wte.clone(), None))
    } else {
        Linear::load(w, name, cfg.vocab_size, cfg.d_model, false)
    }
}

impl Model {
    /// Builds the model from Hugging Face-named tensors, checking every shape against `cfg`:
    /// each family's file (`gpt2.rs`, `gptj.rs`, `llama.rs`, `neox.rs`) names its weights and assembles
    /// its blocks.
    pub fn from_source(
        cfg: &ModelConfig,
        src: &WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let w = Weights { src, dtype, device };
        match cfg.family {
            Family::Gpt2 => gpt2::load(&w, cfg),
            Family::Gptj => gptj::load(&w, cfg),
            Family::Neox => neox::load(&w, cfg),
            Family::Llama | Family::Phi3 | Family::Gemma => llama::load(&w, cfg),
        }
    }
}
