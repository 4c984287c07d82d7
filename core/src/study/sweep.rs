//! The layer sweep of Hase et al. (docs/study.md): for each CounterFact case the model gets
//! right, trace the true answer (MLP, window 5, the whole answer's probability), then edit at
//! every chosen layer with every method and problem, score each edit and undo it.

use serde::{Deserialize, Serialize};

use super::problem::{EditProblem, ProblemCase, SubjectNoise};
use super::score::{essence_score, hase_scores, HaseScores, NoisedScoring, ProblemProbs, Scored};
use crate::edit::{Edit, FtHparams, KeyStats, MemitHparams, RomeHparams, RowEdits};
use crate::error::{LociError, Result};
use crate::eval::CounterFactCase;
use crate::loader::LoadedModel;
use crate::predict::Sampling;
use crate::trace::{window_layers, NoiseSpec, TraceKind, TraceRequest};

/// An editing method of the sweep (serialised as `ft-1`, `ft-5`, `rome`, `memit`, `alphaedit`,
/// `emmet`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StudyMethod {
    /// Constrained fine-tuning of the central layer.
    #[serde(rename = "ft-1")]
    Ft1,
    /// Constrained fine-tuning of the 5-layer window around it.
    #[serde(rename = "ft-5")]
    Ft5,
    /// ROME's rank-one edit of the central layer.
    #[serde(rename = "rome")]
    Rome,
    /// MEMIT over the 5-layer window.
    #[serde(rename = "memit")]
    Memit,
    /// AlphaEdit (MEMIT's settings, the null-space rule) over the 5-layer window.
    #[serde(rename = "alphaedit")]
    Alphaedit,
    /// EMMET (MEMIT's settings, equality constraints, λ = 1) of the central layer.
    #[serde(rename = "emmet")]
    Emmet,
    /// GRACE's codebook at the central layer (the paper's settings).
    #[serde(rename = "grace")]
    Grace,
}

/// The window of the multi-layer methods (and of the trace the edits are compared with, unless
/// `StudyConfig::trace_windows` says otherwise).
pub const STUDY_WINDOW: usize = 5;

impl StudyMethod {
    /// Every method, in the order reports list them.
    pub const ALL: [StudyMethod; 7] = [
        StudyMethod::Ft1,
        StudyMethod::Ft5,
        StudyMethod::Rome,
        StudyMethod::Memit,
        StudyMethod::Alphaedit,
        StudyMethod::Emmet,
        StudyMethod::Grace,
    ];

    /// The method's name, as serialised and as `FromStr` accepts it (`_` also allowed).
    pub fn name(self) -> &'static str {
        match self {
            StudyMethod::Ft1 => "ft-1",
            StudyMethod::Ft5 => "ft-5",
            StudyMethod::Rome => "rome",
            StudyMethod::Memit => "memit",
            StudyMethod::Alphaedit => "alphaedit",
            StudyMethod::Emmet => "emmet",
            StudyMethod::Grace => "grace",
        }
    }

    /// The layers edited around `central`: the layer, or the same window tracing restores.
    pub fn layers(self, central: usize, n_layer: usize) -> Vec<usize> {
        match self {
            StudyMethod::Ft1 | StudyMethod::Rome | StudyMethod::Emmet | StudyMethod::Grace => {
                vec![central]
            }
            StudyMethod::Ft5 | StudyMethod::Memit | StudyMethod::Alphaedit => {
                let (lo, hi) = window_layers(central, STUDY_WINDOW, n_layer);
                (lo..hi).collect()
            }
        }
    }

    /// Every method but fine-tuning and GRACE needs key statistics of its layers.
    pub fn needs_stats(self) -> bool {
        !matches!(
            self,
            StudyMethod::Ft1 | StudyMethod::Ft5 | StudyMethod::Grace
        )
    }
}

impl std::str::FromStr for StudyMethod {
    type Err = LociError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        StudyMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = StudyMethod::ALL.iter().map(|m| m.name()).collect();
                LociError::input(format!("unknown method {s:?} ({})", names.join(", ")))
            })
    }
}

/// Hase et al.'s central layers scaled to a model: every fourth layer, the base ROME layer
/// and the last.
pub fn default_layers(n_layer: usize, rome_layer: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n_layer).step_by(4).collect();
    v.push(rome_layer.min(n_layer - 1));
    v.push(n_layer - 1);
    v.sort_unstable();
    v.dedup();
    v
}

fn default_trace_windows() -> Vec<usize> {
    vec![STUDY_WINDOW]
}

/// Everything a study run is set to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StudyConfig {
    /// The editing methods swept.
    pub methods: Vec<StudyMethod>,
    /// The editing problems each case is posed as.
    pub problems: Vec<EditProblem>,
    /// Central layers.
    pub layers: Vec<usize>,
    /// σ of the subject noise of tracing, tracing reversal and fact forcing.
    pub noise: f64,
    /// Noise samples per trace (the corrupted runs averaged).
    pub trace_samples: usize,
    /// Tracing windows (Hase et al. trace 10, 5, 3 and 1): the first is joined to the edits,
    /// the others are kept for `analyze_window`.
    #[serde(default = "default_trace_windows")]
    pub trace_windows: Vec<usize>,
    /// How the cases are localised: exact causal tracing (Hase et al.), attribution patching's
    /// estimate of the same grid, or knowledge neurons (the probability integrated gradients
    /// give each layer's MLP neurons; `trace_samples` is then the path's points).
    #[serde(default)]
    pub localization: crate::trace::TraceMethod,
    /// Cases whose true object has a lower probability are left out (the reference's 0.02).
    pub min_prob: f32,
    /// Keep only cases whose greedy continuation (36 tokens) contains the true object.
    pub correct_only: bool,
    /// Measure essence drift (5 texts of 100 tokens per case, rescored after each edit).
    pub essence: bool,
    /// Noise draws averaged when scoring a fact-forcing edit.
    pub noised_samples: usize,
    /// Seed of the tracing noise, the problems' subject noise and the essence texts' sampling.
    pub seed: u64,
    /// The base settings of each method; the study sets their layers (and the overrides of
    /// docs/study.md#methods-and-the-layer-sweep). Hase et al.'s FT uses the `sequence` objective.
    pub rome: RomeHparams,
    /// MEMIT's base settings.
    pub memit: MemitHparams,
    /// Fine-tuning's base settings (both `ft-1` and `ft-5`).
    pub ft: FtHparams,
}

impl StudyConfig {
    /// Hase et al.'s study of `lm`: each method's shipped settings for the model (ROME's layer,
    /// or the middle one, and MEMIT's window around it where Loci has none), fine-tuning with
    /// the `sequence` objective, `layers` (default: every fourth, ROME's and the last), noise σ
    /// `noise`, 10 trace samples and window 5, the 0.02 and correctness filters, essence drift.
    pub fn defaults(
        lm: &LoadedModel,
        methods: Vec<StudyMethod>,
        problems: Vec<EditProblem>,
        layers: &[usize],
        noise: f64,
    ) -> Result<Self> {
        let cfg = &lm.model.cfg;
        let n_layer = lm.model.n_layer();
        let rome = RomeHparams::defaults(cfg, None)
            .or_else(|_| RomeHparams::defaults(cfg, Some(n_layer / 2)))?;
        let memit = MemitHparams::defaults(cfg, &[]).or_else(|_| {
            MemitHparams::defaults(cfg, &StudyMethod::Memit.layers(rome.layer, n_layer))
        })?;
        let mut ft = FtHparams::defaults(cfg, &[rome.layer])?;
        ft.objective = crate::edit::FtObjective::Sequence;
        let layers = if layers.is_empty() {
            super::default_layers(n_layer, rome.layer)
        } else {
            layers.to_vec()
        };
        let out = StudyConfig {
            methods,
            problems,
            layers,
            noise,
            trace_samples: 10,
            trace_windows: vec![5],
            localization: crate::trace::TraceMethod::Exact,
            min_prob: 0.02,
            correct_only: true,
            essence: true,
            noised_samples: 10,
            seed: 1,
            rome,
            memit,
            ft,
        };
        out.validate(n_layer)?;
        Ok(out)
    }

    /// The layers whose key statistics the study's edits need (ROME's and MEMIT's), sorted.
    pub fn stats_layers(&self, n_layer: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .cells()
            .into_iter()
            .filter(|(m, _, _)| m.needs_stats())
            .flat_map(|(m, _, l)| m.layers(l, n_layer))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Refuses a configuration a model of `n_layer` layers cannot run: no method, problem or
    /// layer, a layer out of range, a non-positive σ, an empty or zero window, zero samples.
    pub fn validate(&self, n_layer: usize) -> Result<()> {
        if self.methods.is_empty() || self.problems.is_empty() || self.layers.is_empty() {
            return Err(LociError::input(
                "a study needs at least one method, problem and layer",
            ));
        }
        if let Some(l) = self.layers.iter().find(|&&l| l >= n_layer) {
            return Err(LociError::input(format!(
                "layer {l} out of range (the model has {n_layer} layers)"
            )));
        }
        if !self.noise.is_finite() || self.noise <= 0.0 {
            return Err(LociError::input("the noise σ must be positive"));
        }
        if self.trace_windows.is_empty() || self.trace_windows.contains(&0) {
            return Err(LociError::input(
                "tracing needs one or more windows of at least one layer",
            ));
        }
        if self.trace_samples == 0 || self.noised_samples == 0 {
            return Err(LociError::input("noise samples must be at least 1"));
        }
        if self.localization == crate::trace::TraceMethod::Neurons && self.trace_windows.len() > 1 {
            return Err(LociError::input(
                "knowledge neurons have no window: give the study one trace window",
            ));
        }
        Ok(())
    }

    /// The edits of one case, in the order they run.
    pub fn cells(&self) -> Vec<(StudyMethod, EditProblem, usize)> {
        let mut out = vec![];
        for &m in &self.methods {
            for &p in &self.problems {
                for &l in &self.layers {
                    out.push((m, p, l));
                }
            }
        }
        out
    }

    /// The edits computed for `method` at `central` for `problem` of each request (the
    /// overrides of docs/study.md#methods-and-the-layer-sweep), all the requests at once: ROME's
    /// v* and MEMIT's z optimised in one batch, fine-tuning's steps trained in one batch. One
    /// result per request; the outer error is the batch's.
    pub fn edits(
        &self,
        lm: &mut LoadedModel,
        (method, problem): (StudyMethod, EditProblem),
        layers: &[usize],
        requests: &[crate::edit::RewriteRequest],
        stats: &[KeyStats],
    ) -> Result<Vec<Result<Edit>>> {
        let goal = problem.goal(self.noise);
        Ok(match method {
            StudyMethod::Rome => {
                let mut hp = self.rome.clone();
                hp.layer = layers[0];
                hp.v_lr = if problem.noised() { 5e-2 } else { 0.5 };
                if problem.noised() {
                    hp.v_num_grad_steps = 25;
                }
                hp.goal = goal;
                into_edits(lm.rome_batch(requests, &hp, stats.first())?, Edit::Rome)
            }
            StudyMethod::Memit | StudyMethod::Alphaedit | StudyMethod::Emmet => {
                let mut hp = self.memit.clone();
                hp.layers = layers.to_vec();
                hp.v_lr = 0.5;
                hp.goal = goal;
                match method {
                    StudyMethod::Alphaedit => hp.update = crate::edit::memit::ALPHAEDIT_RULE,
                    StudyMethod::Emmet => {
                        hp.update = crate::edit::memit::EMMET_RULE;
                        hp.mom2_update_weight = 1.0;
                    }
                    _ => {}
                }
                into_edits(lm.memit_batch(requests, &hp, stats)?, Edit::Memit)
            }
            StudyMethod::Ft1 | StudyMethod::Ft5 => {
                let mut hp = self.ft.clone();
                hp.layers = layers.to_vec();
                hp.goal = goal;
                if problem.noised() {
                    hp.steps = 50;
                }
                into_edits(lm.finetune_batch(requests, &hp)?, Edit::Ft)
            }
            StudyMethod::Grace => {
                let mut hp = crate::edit::GraceHparams::defaults(&lm.model.cfg, Some(layers[0]))?;
                hp.goal = goal;
                let made = requests.iter().map(|r| lm.grace(r, &hp));
                made.map(|e| e.map(Edit::Grace)).collect()
            }
        })
    }
}

/// Notes an edit's probabilities after it, its scores and its essence drift in `e`.
fn note_scores(
    run: &CaseRun,
    pre: &ProblemProbs,
    post: ProblemProbs,
    ppl: Option<f32>,
    e: &mut EditLine,
) {
    e.scores = hase_scores(pre, &post, e.problem.direction());
    e.post = post;
    e.essence_ppl_post = ppl;
    e.essence_score = run
        .essence
        .zip(ppl)
        .map(|((_, before), after)| essence_score(*before, after));
}

/// Each method's results as edits.
fn into_edits<T>(made: Vec<Result<T>>, edit: fn(T) -> Edit) -> Vec<Result<Edit>> {
    made.into_iter().map(|e| e.map(edit)).collect()
}

/// A case's per-layer tracing effects at one window.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WindowEffect {
    /// The number of MLP layers restored together.
    pub window: usize,
    /// Per layer, as [`CaseTrace::max_fraction_restored`].
    pub max_fraction_restored: Vec<f32>,
    /// Per layer, as [`CaseTrace::subject_last_fraction`].
    pub subject_last_fraction: Vec<f32>,
}

/// A case's tracing result, as the analysis uses it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaseTrace {
    /// The window of the effects below (and of the edits' tracing effect).
    #[serde(default = "study_window")]
    pub window: usize,
    /// The prompt's tokens, each decoded to text.
    pub tokens: Vec<String>,
    /// The subject's tokens, `[start, end)`.
    pub subject_range: [usize; 2],
    /// p(true object) clean and with the subject corrupted.
    pub high: f32,
    /// p(true object) with the subject corrupted (averaged over the noise samples).
    pub low: f32,
    /// Per layer: the largest fraction of the corrupted-away probability that restoring the
    /// MLP window at that layer brings back, over tokens (`max_fraction_restored`).
    pub max_fraction_restored: Vec<f32>,
    /// The same at the last subject token.
    pub subject_last_fraction: Vec<f32>,
    /// `[tokens][layers]` restored probabilities.
    pub scores: Vec<Vec<f32>>,
    /// The effects at the other windows traced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_windows: Vec<WindowEffect>,
}

fn study_window() -> usize {
    STUDY_WINDOW
}

impl CaseTrace {
    /// The per-layer effects at `window`, if it was traced.
    pub fn at_window(&self, window: usize) -> Option<WindowEffect> {
        if window == self.window {
            return Some(WindowEffect {
                window,
                max_fraction_restored: self.max_fraction_restored.clone(),
                subject_last_fraction: self.subject_last_fraction.clone(),
            });
        }
        self.other_windows
            .iter()
            .find(|e| e.window == window)
            .cloned()
    }
}

/// One case: whether it is in the study, and its trace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaseLine {
    /// The CounterFact case id.
    pub case_id: u64,
    /// The prompt template, `{}` where the subject goes.
    pub prompt: String,
    /// The subject as the prompt spells it: what tracing and noised problems corrupt.
    pub subject: String,
    /// The true object: the traced answer, and the target of amplification and erasure.
    pub target_true: String,
    /// p(whole true object) after the filled prompt, on the unedited model.
    pub p_true: f32,
    /// Whether the greedy continuation (36 tokens) contains the true object (ignoring case).
    pub is_correct: bool,
    /// Why the case is left out, if it is.
    pub skipped: Option<String>,
    /// The case's trace; `None` when it was skipped.
    pub trace: Option<CaseTrace>,
    /// Mean perplexity of the essence texts on the unedited model, when essence is measured.
    pub essence_ppl: Option<f32>,
}

/// One edit of the sweep and its scores.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EditLine {
    /// The CounterFact case id.
    pub case_id: u64,
    /// The method that made the edit.
    pub method: StudyMethod,
    /// The problem the case was posed as for this edit.
    pub problem: EditProblem,
    /// The central layer (the regressions' layer).
    pub layer: usize,
    /// Every layer the method changed around `layer`.
    pub edited_layers: Vec<usize>,
    /// The problem's target string (empty when the case could not be posed as the problem).
    pub target: String,
    /// The tracing effect at the central layer (`max_fraction_restored`).
    pub tracing_effect: f32,
    /// The tracing effect at the central layer, at the last subject token only.
    pub subject_last_effect: f32,
    /// p(target) on the unedited model (default when the case could not be posed).
    pub pre: ProblemProbs,
    /// p(target) on the edited model (default when the edit failed).
    pub post: ProblemProbs,
    /// The normalised scores of `pre` → `post` (default when the edit failed).
    pub scores: HaseScores,
    /// Perplexity of the case's essence texts on the edited model, when measured.
    pub essence_ppl_post: Option<f32>,
    /// The essence score of the perplexity drift, when measured.
    pub essence_score: Option<f32>,
    /// Wall-clock seconds to compute (key statistics included), apply, score and undo the edit.
    pub seconds: f64,
    /// Set when the edit could not be made (then there are no post scores).
    pub error: Option<String>,
}

impl EditLine {
    /// The line of an edit not (yet) scored.
    fn unscored(
        case_id: u64,
        method: StudyMethod,
        problem: EditProblem,
        layer: usize,
        n_layer: usize,
    ) -> Self {
        Self {
            case_id,
            method,
            problem,
            layer,
            edited_layers: method.layers(layer, n_layer),
            target: String::new(),
            tracing_effect: 0.0,
            subject_last_effect: 0.0,
            pre: ProblemProbs::default(),
            post: ProblemProbs::default(),
            scores: HaseScores::default(),
            essence_ppl_post: None,
            essence_score: None,
            seconds: 0.0,
            error: None,
        }
    }

    /// Joins the case's tracing effects at the edit's central layer.
    fn note_trace(&mut self, trace: &CaseTrace) {
        self.tracing_effect = trace.max_fraction_restored[self.layer];
        self.subject_last_effect = trace.subject_last_fraction[self.layer];
    }
}

/// A line of a study's JSONL output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum StudyLine {
    /// A case's line (`"record": "case"`).
    Case(CaseLine),
    /// An edit's line (`"record": "edit"`).
    Edit(EditLine),
}

/// A case's results, complete.
pub struct CaseResult {
    /// The case's line.
    pub case: CaseLine,
    /// Its edits' lines, in the order they ran (empty when the case was skipped).
    pub edits: Vec<EditLine>,
}

impl CaseResult {
    /// The case's line followed by its edits', as the JSONL output writes them.
    pub fn lines(self) -> Vec<StudyLine> {
        std::iter::once(StudyLine::Case(self.case))
            .chain(self.edits.into_iter().map(StudyLine::Edit))
            .collect()
    }
}

/// What a study run reports as it goes.
pub trait StudyObserver {
    /// The case is in the study (or left out, with the reason) and traced.
    fn on_case(&mut self, _case: &CaseLine) {}
    /// One edit is scored (and undone); `false` cancels the run.
    fn on_edit(&mut self, _edit: &EditLine) -> bool {
        true
    }
}

/// Reports nothing.
pub struct Quietly;
impl StudyObserver for Quietly {}

/// Key statistics of the asked layers of the (unedited) model handed over.
pub type StatsFor<'a> = dyn FnMut(&LoadedModel, &[usize]) -> Result<Vec<KeyStats>> + 'a;

/// Greedy new tokens the correctness check reads (the reference's 36).
const CORRECTNESS_TOKENS: usize = 36;
const ESSENCE_TEXTS: usize = 5;
const ESSENCE_LEN: usize = 100;

impl LoadedModel {
    /// Hase et al.'s trace of a case: the whole true answer's probability, MLP restored over
    /// `window` layers (or attribution patching's estimate of it, or knowledge neurons').
    fn study_trace(
        &self,
        line: &CaseLine,
        window: usize,
        cfg: &StudyConfig,
    ) -> Result<crate::trace::TraceResult> {
        let prompt = line.prompt.replacen("{}", &line.subject, 1);
        let mut req = TraceRequest::new(prompt, line.subject.clone());
        req.answer = Some(line.target_true.clone());
        req.full_answer = true;
        req.kinds = vec![TraceKind::Mlp];
        req.window = window;
        req.samples = cfg.trace_samples;
        req.noise = NoiseSpec::Fixed(cfg.noise);
        req.seed = cfg.seed;
        // Rows spread over threads on the CPU; a GPU runs each row's batch itself.
        let workers = if self.model.device.is_cpu() {
            crate::threads::workers()
        } else {
            1
        };
        self.trace_by(
            cfg.localization,
            &req,
            None,
            &mut crate::trace::Quiet,
            workers,
        )
    }

    /// Runs the study on one case: filter, trace, then every (method, problem, layer) edit —
    /// each applied, scored and undone, so the model ends as it began. `stats` gives the key
    /// statistics of the layers asked (of the unedited model it is handed); `obs` sees the case
    /// once it is traced and each edit as it is scored, and may cancel.
    pub fn study_case(
        &mut self,
        case: &CounterFactCase,
        cfg: &StudyConfig,
        stats: &mut StatsFor,
        obs: &mut dyn StudyObserver,
    ) -> Result<CaseResult> {
        Ok(self.study_cases(&[case], cfg, stats, obs)?.remove(0))
    }

    /// [`study_case`](Self::study_case) of several cases at once, with the same results (within
    /// float rounding): each (method, problem, layer) cell's edits of all the cases are computed
    /// together (ROME's v*, MEMIT's z and fine-tuning's steps in one batch) and scored together
    /// (each edit a hook on its own rows, one pass for the batch). A case's edits keep the order `study_case` gives them; `obs` sees the
    /// cases as they are traced, then the edits cell by cell.
    pub fn study_cases(
        &mut self,
        cases: &[&CounterFactCase],
        cfg: &StudyConfig,
        stats: &mut StatsFor,
        obs: &mut dyn StudyObserver,
    ) -> Result<Vec<CaseResult>> {
        cfg.validate(self.model.n_layer())?;
        let mut lines = vec![];
        let mut kept = vec![];
        for &case in cases {
            let (line, prepared) = self.prepare_case(case, cfg)?;
            obs.on_case(&line);
            if let Some((trace, essence)) = prepared {
                kept.push((lines.len(), case, trace, essence));
            }
            lines.push(line);
        }
        let runs: Vec<CaseRun> = kept
            .iter()
            .map(|(_, case, trace, essence)| CaseRun {
                case,
                cfg,
                trace,
                essence: essence.as_ref(),
                noise: SubjectNoise {
                    sigma: cfg.noise,
                    seed: cfg.seed,
                },
            })
            .collect();
        let mut edits: Vec<Vec<EditLine>> = vec![vec![]; runs.len()];
        if !runs.is_empty() {
            for &problem in &cfg.problems {
                self.problem_edits(&runs, problem, stats, obs, &mut edits)?;
            }
        }
        let mut edits_of: Vec<Vec<EditLine>> = vec![vec![]; lines.len()];
        for ((i, ..), e) in kept.iter().zip(edits) {
            edits_of[*i] = e;
        }
        Ok(lines
            .into_iter()
            .zip(edits_of)
            .map(|(case, edits)| CaseResult { case, edits })
            .collect())
    }

    /// A case's line, and unless it is skipped, its trace and its essence texts with their
    /// perplexity (when measured).
    #[allow(clippy::type_complexity)]
    fn prepare_case(
        &self,
        case: &CounterFactCase,
        cfg: &StudyConfig,
    ) -> Result<(CaseLine, Option<(CaseTrace, Option<(Vec<String>, f32)>)>)> {
        let mut line = self.case_line(case, cfg)?;
        if line.skipped.is_some() {
            return Ok((line, None));
        }
        let trace = self.case_trace(&line, cfg)?;
        let essence = if cfg.essence {
            let subject = &case.requested_rewrite.subject;
            let texts = self.essence_texts(subject, ESSENCE_TEXTS, ESSENCE_LEN, cfg.seed)?;
            let ppl = self.perplexity(&texts, ESSENCE_LEN)?;
            line.essence_ppl = Some(ppl);
            Some((texts, ppl))
        } else {
            None
        };
        line.trace = Some(trace.clone());
        Ok((line, Some((trace, essence))))
    }

    /// The case's line before tracing: the true object's probability, whether the model's
    /// greedy continuation names it, and why the case is skipped, if it is.
    fn case_line(&self, case: &CounterFactCase, cfg: &StudyConfig) -> Result<CaseLine> {
        let rw = &case.requested_rewrite;
        rw.validate()?;
        let truth = rw
            .target_true
            .as_ref()
            .ok_or_else(|| LociError::input(format!("case {} has no true target", case.case_id)))?
            .str
            .clone();
        let p_true = self.target_prob(&rw.filled(), &truth)?;
        let generated = self.generate(&rw.filled(), CORRECTNESS_TOKENS, Sampling::Greedy)?;
        let continuation = self.tokenizer.decode(&generated.new_ids)?;
        let is_correct = continuation
            .to_lowercase()
            .contains(&truth.trim().to_lowercase());
        let skipped = if p_true <= cfg.min_prob {
            Some(format!("p(true object) {p_true:.4} ≤ {}", cfg.min_prob))
        } else if cfg.correct_only && !is_correct {
            Some("the model's continuation lacks the true object".into())
        } else {
            None
        };
        Ok(CaseLine {
            case_id: case.case_id,
            prompt: rw.prompt.clone(),
            subject: rw.subject.clone(),
            target_true: truth,
            p_true,
            is_correct,
            skipped,
            trace: None,
            essence_ppl: None,
        })
    }

    /// The case's whole-answer MLP trace at the first window, and the effects at the others,
    /// localised as `cfg` says (also a finished run's case localised again another way).
    pub fn case_trace(&self, line: &CaseLine, cfg: &StudyConfig) -> Result<CaseTrace> {
        let mut windows = cfg.trace_windows.iter();
        let main = *windows.next().expect("validated: at least one window");
        let tr = self.study_trace(line, main, cfg)?;
        let mut trace = CaseTrace {
            window: main,
            tokens: tr.tokens.clone(),
            subject_range: tr.subject_range,
            high: tr.high,
            low: tr.low,
            max_fraction_restored: tr.tracing_effect[&TraceKind::Mlp].clone(),
            subject_last_fraction: tr.tracing_effect_subject_last[&TraceKind::Mlp].clone(),
            scores: tr.scores[&TraceKind::Mlp].clone(),
            other_windows: vec![],
        };
        for &w in windows {
            if trace.at_window(w).is_some() {
                continue;
            }
            let tr = self.study_trace(line, w, cfg)?;
            trace.other_windows.push(WindowEffect {
                window: w,
                max_fraction_restored: tr.tracing_effect[&TraceKind::Mlp].clone(),
                subject_last_fraction: tr.tracing_effect_subject_last[&TraceKind::Mlp].clone(),
            });
        }
        Ok(trace)
    }

    /// Every (method, layer) edit of one problem for every case (at least one), appended to
    /// each case's `edits` as `obs` sees them. A case this problem cannot pose (the noised model says
    /// nothing, a prompt without room for the target…) gets its edits' lines with the reason,
    /// not the run's end.
    fn problem_edits(
        &mut self,
        runs: &[CaseRun],
        problem: EditProblem,
        stats: &mut StatsFor,
        obs: &mut dyn StudyObserver,
        edits: &mut [Vec<EditLine>],
    ) -> Result<()> {
        let mut posed = vec![];
        for run in runs {
            let p = self
                .problem_case(run.case, problem, run.noise)
                .and_then(|pc| {
                    let pre = self.problem_probs(run.case, pc.target(), run.scoring(problem))?;
                    Ok((pc, pre))
                });
            if let Err(LociError::Cancelled) = p {
                return Err(LociError::Cancelled);
            }
            posed.push(p);
        }
        for &method in &runs[0].cfg.methods {
            for &central in &runs[0].cfg.layers {
                let cell = Cell {
                    method,
                    problem,
                    central,
                };
                let lines = self.cell_edits(runs, &posed, cell, stats)?;
                for (e, case_edits) in lines.into_iter().zip(edits.iter_mut()) {
                    if !obs.on_edit(&e) {
                        return Err(LociError::Cancelled);
                    }
                    case_edits.push(e);
                }
            }
        }
        Ok(())
    }

    /// One cell of the sweep for every case: the edits made together, then scored (together
    /// where they can be hooked). An edit that cannot be made (a diverged optimisation, a
    /// request this method refuses) is a result of the sweep, noted in its line, not its end.
    /// Each line's seconds are its share of the batch's computation and scoring.
    fn cell_edits(
        &mut self,
        runs: &[CaseRun],
        posed: &[Result<(ProblemCase, ProblemProbs)>],
        cell: Cell,
        stats: &mut StatsFor,
    ) -> Result<Vec<EditLine>> {
        let n_layer = self.model.n_layer();
        let Cell {
            method,
            problem,
            central,
        } = cell;
        let mut lines: Vec<EditLine> = runs
            .iter()
            .map(|run| {
                let mut e = EditLine::unscored(run.case.case_id, method, problem, central, n_layer);
                e.note_trace(run.trace);
                e
            })
            .collect();
        let ok: Vec<usize> = (0..runs.len()).filter(|&i| posed[i].is_ok()).collect();
        for (e, p) in lines.iter_mut().zip(posed) {
            match p {
                Ok((pc, pre)) => {
                    e.target = pc.target().to_string();
                    e.pre = pre.clone();
                }
                Err(err) => e.error = Some(err.to_string()),
            }
        }
        if ok.is_empty() {
            return Ok(lines);
        }
        let started = crate::clock::now_seconds();
        // Statistics that cannot be had end the run (a resumed run then redoes the case); an
        // edit that cannot be made is a result.
        let layers = cell.method.layers(cell.central, self.model.n_layer());
        let st = if cell.method.needs_stats() {
            stats(self, &layers)?
        } else {
            vec![]
        };
        let made = self.cell_batch(runs[0].cfg, cell, &ok, posed, &st);
        let share = (crate::clock::now_seconds() - started) / ok.len() as f64;
        let made = match made {
            Err(LociError::Cancelled) => return Err(LociError::Cancelled),
            Err(err) => ok.iter().map(|_| Err(err.to_string())).collect(),
            Ok(v) => v
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect::<Vec<_>>(),
        };
        // The edits are scored together, each as a hook on its own rows; one the hook cannot
        // carry (a low-rank change of a bias: no method here makes one) is applied, scored and
        // undone.
        let mut hooked = vec![];
        for (&i, edit) in ok.iter().zip(made) {
            match edit {
                Err(err) => lines[i].error = Some(err),
                Ok(edit) if RowEdits::can_hook_on(self, &edit) => hooked.push((i, edit)),
                Ok(edit) => {
                    let started = crate::clock::now_seconds();
                    let (pc, pre) = posed[i].as_ref().expect("posed");
                    self.score_edit(&runs[i], pc, pre, &edit, &mut lines[i])?;
                    lines[i].seconds = share + crate::clock::now_seconds() - started;
                }
            }
        }
        if !hooked.is_empty() {
            let started = crate::clock::now_seconds();
            let scored = self.score_hooked(runs, posed, problem, &hooked)?;
            let each = (crate::clock::now_seconds() - started) / hooked.len() as f64;
            for ((i, _), (post, ppl)) in hooked.iter().zip(scored) {
                let (_, pre) = posed[*i].as_ref().expect("posed");
                note_scores(&runs[*i], pre, post, ppl, &mut lines[*i]);
                lines[*i].seconds = share + each;
            }
        }
        Ok(lines)
    }

    /// The probabilities (and essence perplexities) of the edits, each case's rows seeing its
    /// own edit as a hook, in one batch.
    fn score_hooked(
        &self,
        runs: &[CaseRun],
        posed: &[Result<(ProblemCase, ProblemProbs)>],
        problem: EditProblem,
        hooked: &[(usize, Edit)],
    ) -> Result<Vec<(ProblemProbs, Option<f32>)>> {
        let items: Vec<Scored> = hooked
            .iter()
            .map(|(i, edit)| {
                let (pc, _) = posed[*i].as_ref().expect("posed");
                (runs[*i].case, pc.target(), Some(edit))
            })
            .collect();
        let post = self.problem_probs_batch(&items, runs[0].scoring(problem))?;
        let ppl: Vec<Option<f32>> = if runs[0].essence.is_some() {
            let sets: Vec<(&[String], Option<&Edit>)> = hooked
                .iter()
                .map(|(i, edit)| {
                    let (texts, _) = runs[*i].essence.expect("essence measured");
                    (texts.as_slice(), Some(edit))
                })
                .collect();
            self.perplexity_batch(&sets, ESSENCE_LEN)?
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None; hooked.len()]
        };
        Ok(post.into_iter().zip(ppl).collect())
    }

    /// The edits of the cases `ok` (posed) at `cell`, computed together with the statistics
    /// `st` of its layers.
    fn cell_batch(
        &mut self,
        cfg: &StudyConfig,
        cell: Cell,
        ok: &[usize],
        posed: &[Result<(ProblemCase, ProblemProbs)>],
        st: &[KeyStats],
    ) -> Result<Vec<Result<Edit>>> {
        let layers = cell.method.layers(cell.central, self.model.n_layer());
        let requests: Vec<_> = ok
            .iter()
            .map(|&i| posed[i].as_ref().expect("posed").0.request.clone())
            .collect();
        cfg.edits(self, (cell.method, cell.problem), &layers, &requests, st)
    }

    /// Applies an edit, scores it and undoes it, noting the scores in `e`.
    fn score_edit(
        &mut self,
        run: &CaseRun,
        pc: &ProblemCase,
        pre: &ProblemProbs,
        edit: &Edit,
        e: &mut EditLine,
    ) -> Result<()> {
        let applied = self.apply(edit)?;
        let scored = self.score_edited(run, pc, e.problem);
        self.undo_edit(applied)?;
        let (post, ppl) = scored?;
        note_scores(run, pre, post, ppl, e);
        Ok(())
    }

    /// The edited model's probabilities of the problem's target, and its essence perplexity.
    fn score_edited(
        &self,
        run: &CaseRun,
        pc: &ProblemCase,
        problem: EditProblem,
    ) -> Result<(ProblemProbs, Option<f32>)> {
        let post = self.problem_probs(run.case, pc.target(), run.scoring(problem))?;
        let ppl = match run.essence {
            Some((texts, _)) => Some(self.perplexity(texts, ESSENCE_LEN)?),
            None => None,
        };
        Ok((post, ppl))
    }
}

/// One cell of the sweep: a method at a central layer, for a problem.
#[derive(Clone, Copy)]
struct Cell {
    method: StudyMethod,
    problem: EditProblem,
    central: usize,
}

/// What every edit of one case shares: the case, the settings, its trace, the essence texts and
/// their perplexity before any edit, and the subject noise of the noised problems.
struct CaseRun<'a> {
    case: &'a CounterFactCase,
    cfg: &'a StudyConfig,
    trace: &'a CaseTrace,
    essence: Option<&'a (Vec<String>, f32)>,
    noise: SubjectNoise,
}

impl CaseRun<'_> {
    /// How `problem`'s probabilities are read: under the subject noise when it is noised.
    fn scoring(&self, problem: EditProblem) -> Option<NoisedScoring> {
        problem.noised().then_some(NoisedScoring {
            noise: self.noise,
            samples: self.cfg.noised_samples,
        })
    }
}
