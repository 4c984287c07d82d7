//! The Edit screen's jobs in this tab: an edit (ROME, MEMIT or FT) computed by one worker with
//! its steps streamed and then applied by the others, undo, edit files in and out, and the key
//! statistics ROME and MEMIT need: found (the browser cache, the static build, the server),
//! loaded from a file or a URL, or computed here from the bundled Wikipedia slice.

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::edit::{Edit, EditMethod, Probes, StatsProvenance};
use loci_frontend::engine::{Choice, EditListing};
use loci_frontend::files::{bytes, forget, from_cache, keep, now_ms};
use loci_frontend::http::url_part;
use loci_frontend::pool::{EditOutcome, Pool};
use loci_frontend::protocol::EditJob;

use super::edit::EditState;
use super::edit_actions::requests;
use crate::state::{layer_list, lines, Shared};

/// The texts the tab computes statistics from (a slice of English Wikipedia).
pub const WIKI_SLICE_URL: &str = "static/data/wiki_slice.json";
const WIKI_CORPUS: &str = "wikipedia-slice";
/// Texts are cut to this many tokens, as `loci stats` does.
const STATS_MAX_LEN: usize = 1024;

/// Statistics the tab holds for a layer, and where they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldStats {
    pub provenance: StatsProvenance,
    pub source: String,
}

/// Where the browser cache keeps a model's computed statistics of a layer.
fn cache_key(fingerprint: &str, layer: usize) -> String {
    format!("loci-stats/{fingerprint}/layer{layer}.safetensors")
}

/// The edits the tab's copies carry, listed as the server lists its own.
pub fn listing(pool: &Pool) -> Vec<EditListing> {
    pool.edit_files()
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            let e = Edit::from_bytes(f).ok()?;
            Some(EditListing {
                id: i as u64 + 1,
                method: e.method(),
                layers: e.layers(),
                requests: e.requests().into_iter().cloned().collect(),
            })
        })
        .collect()
}

/// Runs `job` on this tab's copy of `c`, marking the screen busy meanwhile.
pub fn on_tab<F: std::future::Future<Output = Result<(), String>> + 'static>(
    s: Shared,
    c: Choice,
    job: impl FnOnce(std::rc::Rc<Pool>, loci_core::ModelInfo) -> F + 'static,
) {
    s.set_running(true);
    spawn_local(async move {
        let done = match s.tab(&c).await {
            Ok((pool, info)) => job(pool, info).await,
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            s.say("error", e);
        }
        s.set_running(false);
    });
}

pub fn edit(s: Shared, st: EditState, c: Choice) {
    let job = match edit_job(&st) {
        Ok(j) => j,
        Err(e) => return s.say("error", e),
    };
    st.steps.set((0, 0));
    st.losses.set(vec![]);
    st.report.set(None);
    st.memit.set(None);
    let cancel = s.cancel_flag();
    on_tab(s, c.clone(), move |pool, info| async move {
        let started = now_ms();
        for attempt in 0..2 {
            s.say("running", running_text(job.method, pool.workers()));
            let on_step = |_: &str, step: usize, steps: usize, loss: f32| {
                st.steps.set((step, steps));
                st.losses.update(|l| l.push(loss));
                !cancel.get()
            };
            let outcome = match pool.edit(job.clone(), on_step).await {
                Err(e) if e == "cancelled" => {
                    // A stopped worker is replaced here; the digest shows every copy as it was.
                    s.say("loading", "Edit cancelled: checking every copy…");
                    after_change(s, st, &pool).await;
                    s.say("ready", "Edit cancelled: the model is unchanged.");
                    return Ok(());
                }
                other => other?,
            };
            match outcome {
                EditOutcome::Done(e) => {
                    let mut e = *e;
                    let secs = (now_ms() - started) / 1e3;
                    if let Some(r) = e.report.as_mut() {
                        r.seconds = secs;
                    }
                    if let Some(r) = e.memit.as_mut() {
                        r.seconds = secs;
                    }
                    st.report.set(e.report);
                    st.memit.set(e.memit);
                    owned(&pool);
                    after_change(s, st, &pool).await;
                    s.say("edited", format!("Edited in this tab in {secs:.1} s."));
                    return Ok(());
                }
                EditOutcome::NeedsStats(layers) => {
                    st.needed.set(layers.clone());
                    if attempt == 1 || !find_stats(s, st, &c, &pool, &info, &layers).await? {
                        s.say("error", needs_text(&layers));
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    });
}

fn running_text(method: EditMethod, workers: usize) -> String {
    let what = super::edit_actions::method_steps(method);
    let how = if method == EditMethod::Rome && workers > 1 {
        format!("all {workers} workers share its steps")
    } else {
        format!("one worker computes, then all {workers} take it")
    };
    format!("Editing in this tab ({what}; {how})…")
}

fn needs_text(layers: &[usize]) -> String {
    let ls: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
    format!(
        "This edit needs key statistics for layer {} first: compute them in this tab, load a \
         file, or download them (Key statistics, below).",
        ls.join(", ")
    )
}

/// The edit the form describes.
fn edit_job(st: &EditState) -> Result<EditJob, String> {
    let method = st.method.get_untracked();
    let layers = layer_list(&st.layer.get_untracked())?;
    if matches!(method, EditMethod::Rome | EditMethod::Grace) && layers.len() > 1 {
        return Err(format!(
            "{} edits one layer; MEMIT, AlphaEdit and EMMET take several",
            method.label()
        ));
    }
    Ok(EditJob {
        method,
        requests: requests(st)?,
        layers,
        probes: Probes {
            paraphrase: lines(&st.paraphrase.get_untracked()),
            neighborhood: lines(&st.neighborhood.get_untracked()),
            generate_tokens: 10,
        },
        null_space: super::edit_actions::null_space(st)?,
    })
}

/// The tab changed its copies' edits itself: they no longer follow a server's.
fn owned(pool: &Pool) {
    pool.set_own_edits(true);
}

/// After an edit, undo or upload: the list, and the digest of the weights edits touch.
pub async fn after_change(s: Shared, st: EditState, pool: &Pool) {
    s.edits.set(listing(pool));
    match pool.digest().await {
        Ok(d) => st.digest.set(d),
        Err(e) => s.say("error", e),
    }
}

pub fn undo(s: Shared, st: EditState, c: Choice) {
    on_tab(s, c, move |pool, _| async move {
        pool.undo_edit(false).await?;
        owned(&pool);
        st.report.set(None);
        st.memit.set(None);
        after_change(s, st, &pool).await;
        s.say(
            "undone",
            "Undone in this tab: the original weights are back.",
        );
        Ok(())
    })
}

pub fn upload(s: Shared, st: EditState, c: Choice, bytes: Vec<u8>) {
    on_tab(s, c, move |pool, _| async move {
        pool.apply_edit(bytes).await?;
        owned(&pool);
        after_change(s, st, &pool).await;
        s.say("edited", "The uploaded edit is applied in this tab.");
        Ok(())
    })
}

/// Gets statistics for `layers` without computing: the browser cache (computed on an earlier
/// visit), the static build's files, the server's. True when all were found and taken.
async fn find_stats(
    s: Shared,
    st: EditState,
    c: &Choice,
    pool: &Pool,
    info: &loci_core::ModelInfo,
    layers: &[usize],
) -> Result<bool, String> {
    let mut files = vec![];
    for &l in layers {
        let shipped = c
            .stats
            .iter()
            .find(|(sl, _)| *sl == l)
            .map(|(_, u)| u.clone());
        let kept = cache_key(&info.fingerprint, l);
        let found = if let Some(b) = from_cache(&kept).await {
            // A kept file that no longer reads is dropped, so it is not offered again.
            if let Err(e) = take(st, pool, vec![b], KEPT).await {
                forget(&kept).await;
                s.say(
                    "loading",
                    format!("Dropped unreadable kept statistics: {e}"),
                );
                return Ok(false);
            }
            continue;
        } else if let Some(url) = shipped {
            s.say(
                "loading",
                format!("Loading the statistics shipped for layer {l}…"),
            );
            Some((bytes(&url).await?, "shipped with this page"))
        } else if c.on_server && s.server.get_untracked() == Some(true) {
            s.say(
                "loading",
                format!("Downloading layer {l}'s statistics from the server…"),
            );
            let url = format!("/api/models/{}/stats/{l}", url_part(&c.name));
            Some((
                loci_frontend::http::get_bytes(&url).await?,
                "from the server",
            ))
        } else {
            None
        };
        match found {
            Some(f) => files.push(f),
            None => return Ok(false),
        }
    }
    for (b, source) in files {
        take(st, pool, vec![b], source).await?;
    }
    Ok(true)
}

/// Where statistics kept in the browser's cache came from, in the panel's list.
const KEPT: &str = "kept in this browser";

/// Gives the workers statistics files and lists them as held.
async fn take(st: EditState, pool: &Pool, files: Vec<Vec<u8>>, source: &str) -> Result<(), String> {
    let taken = pool.use_stats(files).await?;
    st.stats.update(|list| {
        for p in taken {
            list.retain(|h| h.provenance.layer != p.layer);
            list.push(HeldStats {
                provenance: p,
                source: source.to_string(),
            });
        }
        list.sort_by_key(|h| h.provenance.layer);
    });
    Ok(())
}

/// The layers the statistics panel acts on: the form's, else those the last edit needed.
fn stats_layers(st: &EditState) -> Result<Vec<usize>, String> {
    let typed = layer_list(&st.stats_layers.get_untracked())?;
    let layers = if typed.is_empty() {
        st.needed.get_untracked()
    } else {
        typed
    };
    if layers.is_empty() {
        return Err("say which layers' statistics (e.g. 6, or 4,5,6)".into());
    }
    Ok(layers)
}

/// Computes statistics for the panel's layers over the Wikipedia slice, spread over the
/// workers, with progress and Cancel; merged, kept in the browser cache and used.
pub fn compute_stats(s: Shared, st: EditState, c: Choice) {
    let layers = match stats_layers(&st) {
        Ok(l) => l,
        Err(e) => return s.say("error", e),
    };
    on_tab(s, c, move |pool, info| async move {
        compute(s, st, &pool, &info, &layers).await?;
        Ok(())
    })
}

/// The panel's token goal.
fn token_goal(st: &EditState) -> u64 {
    st.stats_tokens
        .get_untracked()
        .trim()
        .parse()
        .unwrap_or(20_000)
        .max(1)
}

/// Computes statistics of `layers` over the Wikipedia slice in the workers (progress on the
/// panel, Cancel between texts), merges the workers' shares, keeps them in the browser cache
/// and gives them to every worker. False when cancelled (nothing is kept).
pub async fn compute(
    s: Shared,
    st: EditState,
    pool: &Pool,
    info: &loci_core::ModelInfo,
    layers: &[usize],
) -> Result<bool, String> {
    let goal = token_goal(&st);
    let cancel = s.cancel_flag();
    st.stats_progress.set((0, goal as usize));
    let texts: Vec<String> = serde_json::from_slice(&bytes(WIKI_SLICE_URL).await?)
        .map_err(|e| format!("{WIKI_SLICE_URL}: {e}"))?;
    let started = now_ms();
    let names = layers
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    s.say(
        "running",
        format!(
            "Computing key statistics for layer {names} in this tab's {} workers…",
            pool.workers()
        ),
    );
    let merged = pool
        .collect_stats(layers, STATS_MAX_LEN, &texts, WIKI_CORPUS, goal, |tokens| {
            st.stats_progress.set((tokens as usize, goal as usize));
            !cancel.get()
        })
        .await;
    let merged = match merged {
        Err(e) if e == "cancelled" => {
            st.stats_progress.set((0, 0));
            s.say("ready", "Statistics cancelled: nothing was kept.");
            return Ok(false);
        }
        other => other?,
    };
    let tokens = merged
        .iter()
        .map(|k| k.provenance.tokens)
        .max()
        .unwrap_or(0);
    let mut files = vec![];
    for k in &merged {
        let b = k.to_bytes().map_err(|e| e.to_string())?;
        keep(&cache_key(&info.fingerprint, k.provenance.layer), &b).await?;
        files.push(b);
    }
    take(st, pool, files, "computed in this tab").await?;
    after_change(s, st, pool).await;
    s.say(
        "done",
        format!(
            "Key statistics for layer {names} computed in this tab: {tokens} tokens in {:.1} s, \
             kept in this browser.",
            (now_ms() - started) / 1e3
        ),
    );
    Ok(true)
}

/// Statistics of `layers` however they can be had: found (cache, static build, server), else
/// computed here. False when the computation was cancelled.
pub async fn ensure_stats(
    s: Shared,
    st: EditState,
    c: &Choice,
    pool: &Pool,
    info: &loci_core::ModelInfo,
    layers: &[usize],
) -> Result<bool, String> {
    if find_stats(s, st, c, pool, info, layers).await? {
        return Ok(true);
    }
    compute(s, st, pool, info, layers).await
}

/// Uses a statistics file the user picked or a URL's.
pub fn load_stats(s: Shared, st: EditState, c: Choice, from: StatsFrom) {
    on_tab(s, c, move |pool, _| async move {
        let (b, source) = match from {
            StatsFrom::File(b) => (b, "from a file".to_string()),
            StatsFrom::Url(url) => (bytes(&url).await?, format!("from {url}")),
        };
        take(st, &pool, vec![b], &source).await?;
        after_change(s, st, &pool).await;
        s.say("done", "The statistics are checked and in use.");
        Ok(())
    })
}

pub enum StatsFrom {
    File(Vec<u8>),
    Url(String),
}
