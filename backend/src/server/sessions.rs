//! Visitors' sessions: each visitor's own edit stack over the shared models.
//!
//! A visitor is known by an unguessable id in the `loci_session` cookie (HttpOnly,
//! SameSite=Strict), issued on their first request. Their edits apply to their own requests only,
//! as a view of the shared model ([`LoadedModel::with_edits`]): other visitors see the model
//! unedited, and no visitor can undo another's edits. Sessions expire after an idle time; their
//! number and the memory their edits hold are bounded, the least recently used going first. A
//! visitor whose session is gone is told so (410), never silently served another one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use loci_core::edit::Edit;

use super::jobs::ApiError;
use super::AppState;

/// The cookie naming a visitor's session.
pub const COOKIE: &str = "loci_session";

/// How sessions are bounded.
#[derive(clap::Args, Debug, Clone)]
pub struct SessionLimits {
    /// Seconds a session lives without a request.
    #[arg(long, default_value_t = 1800)]
    pub session_ttl: u64,
    /// Sessions kept at once; beyond that the least recently used goes.
    #[arg(long, default_value_t = 1000)]
    pub max_sessions: usize,
    /// MiB all sessions' edits may hold together (low-rank edits are a few KB; a fine-tuning
    /// edit holds a copy of each layer it changes); beyond that the least recently used go.
    #[arg(long, default_value_t = 512)]
    pub session_memory_mib: usize,
    /// Edits one session may stack on one model.
    #[arg(long, default_value_t = 32)]
    pub max_session_edits: usize,
}

/// One of a visitor's edits: its id, the edit, and the memory a view of it holds.
pub struct SessionEdit {
    pub id: u64,
    pub edit: Arc<Edit>,
    pub bytes: usize,
}

/// A visitor's edits per model, oldest first.
#[derive(Default)]
pub struct Session {
    last_used: Option<Instant>,
    edits: HashMap<String, Vec<SessionEdit>>,
    next_id: u64,
}

impl Session {
    fn bytes(&self) -> usize {
        self.edits.values().flatten().map(|e| e.bytes).sum()
    }
}

/// Who a request comes from: its session, and whether it carries the operator's token.
#[derive(Clone, Debug)]
pub struct Visitor {
    pub session: String,
    pub admin: bool,
}

/// Every live session.
pub struct Sessions {
    limits: SessionLimits,
    live: Mutex<HashMap<String, Session>>,
}

/// Why a session's edit was not kept.
pub enum Refusal {
    /// The session expired (or was evicted) while the edit was computed.
    Gone,
    /// The session already holds its most edits or memory.
    Full(String),
}

impl Sessions {
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            live: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.limits.session_ttl.max(1))
    }

    /// The number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The bytes all sessions' edits hold.
    pub fn bytes(&self) -> usize {
        self.lock().values().map(Session::bytes).sum()
    }

    /// A new session's id (256 random bits, hex).
    pub fn open(&self) -> String {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).expect("the OS gives random bytes");
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.lock();
        live.insert(
            id.clone(),
            Session {
                last_used: Some(Instant::now()),
                ..Default::default()
            },
        );
        self.evict(&mut live, &id);
        id
    }

    /// Marks the session used now; `false` when it is not (or no longer) live.
    pub fn touch(&self, id: &str) -> bool {
        let mut live = self.lock();
        let ttl = self.ttl();
        live.retain(|_, s| s.last_used.is_some_and(|t| t.elapsed() < ttl));
        match live.get_mut(id) {
            Some(s) => {
                s.last_used = Some(Instant::now());
                true
            }
            None => false,
        }
    }

    /// Drops the least recently used sessions (never `keep`) until the bounds hold: for their
    /// number, sessions without edits first (they lose nothing); for memory, those holding some.
    fn evict(&self, live: &mut HashMap<String, Session>, keep: &str) {
        let budget = self.limits.session_memory_mib << 20;
        loop {
            let over_count = live.len() > self.limits.max_sessions.max(1);
            let over_memory = live.values().map(Session::bytes).sum::<usize>() > budget;
            if !over_count && !over_memory {
                return;
            }
            let victim = live
                .iter()
                .filter(|(id, s)| id.as_str() != keep && (over_count || s.bytes() > 0))
                .min_by_key(|(_, s)| (s.bytes() > 0, s.last_used))
                .map(|(id, _)| id.clone());
            match victim {
                Some(id) => live.remove(&id),
                None => return,
            };
        }
    }

    /// The session's edits of `model`, oldest first.
    pub fn edits(&self, id: &str, model: &str) -> Vec<Arc<Edit>> {
        self.with_stack(id, model, |s| s.iter().map(|e| e.edit.clone()).collect())
            .unwrap_or_default()
    }

    /// `f` of the session's edit stack of `model` (`None` when the session is gone).
    pub fn with_stack<T>(
        &self,
        id: &str,
        model: &str,
        f: impl FnOnce(&mut Vec<SessionEdit>) -> T,
    ) -> Option<T> {
        let mut live = self.lock();
        let s = live.get_mut(id)?;
        Some(f(s.edits.entry(model.to_string()).or_default()))
    }

    /// Stacks `edits` (all or none) on the session's edits of `model`; their ids.
    pub fn push(
        &self,
        id: &str,
        model: &str,
        edits: Vec<(Edit, usize)>,
    ) -> Result<Vec<u64>, Refusal> {
        let mut live = self.lock();
        let max_edits = self.limits.max_session_edits;
        let budget = self.limits.session_memory_mib << 20;
        let s = live.get_mut(id).ok_or(Refusal::Gone)?;
        let held = s.edits.get(model).map_or(0, Vec::len);
        if held + edits.len() > max_edits {
            return Err(Refusal::Full(format!(
                "a session holds at most {max_edits} edits of a model; undo some first"
            )));
        }
        let adding: usize = edits.iter().map(|(_, b)| b).sum();
        if s.bytes() + adding > budget {
            return Err(Refusal::Full(format!(
                "this session's edits would hold more than the server's {} MiB for sessions",
                self.limits.session_memory_mib
            )));
        }
        let mut ids = vec![];
        for (edit, bytes) in edits {
            s.next_id += 1;
            ids.push(s.next_id);
            s.edits
                .entry(model.to_string())
                .or_default()
                .push(SessionEdit {
                    id: s.next_id,
                    edit: Arc::new(edit),
                    bytes,
                });
        }
        self.evict(&mut live, id);
        Ok(ids)
    }
}

/// The 410 of a session that is gone.
pub fn gone() -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "your session has expired (it was idle too long, the server restarted or had too many \
         visitors) and its edits are gone; a new session has started: repeat the request",
    )
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Gone => gone(),
            Refusal::Full(m) => ApiError::new(StatusCode::CONFLICT, m),
        }
    }
}

/// The session id a request's cookies carry (or a response's `Set-Cookie`).
pub fn cookie_session(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .chain(headers.get_all(header::SET_COOKIE).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The `Set-Cookie` of a new session.
fn set_cookie(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict"))
        .expect("hex ids make a valid header")
}

/// Gives every API request its [`Visitor`]: the session its cookie names (touched), or a new
/// one (set in the response) when it has none. A cookie naming a session that is gone gets a
/// 410 with the new session's cookie, except on the endpoints that read no session state.
pub async fn middleware(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let admin = st.admin.accepts(&req);
    let (session, fresh) = match cookie_session(req.headers()) {
        Some(id) if st.sessions.touch(&id) => (id, false),
        Some(_) if reads_session(req.uri().path()) => {
            let id = st.sessions.open();
            let mut r = gone().into_response();
            r.headers_mut().insert(header::SET_COOKIE, set_cookie(&id));
            return r;
        }
        _ => (st.sessions.open(), true),
    };
    req.extensions_mut().insert(Visitor {
        session: session.clone(),
        admin,
    });
    let mut r = next.run(req).await;
    if fresh {
        r.headers_mut()
            .insert(header::SET_COOKIE, set_cookie(&session));
    }
    r
}

/// Whether the endpoint's answer depends on the visitor's edits.
fn reads_session(path: &str) -> bool {
    const SESSIONLESS: [&str; 2] = ["/api/models", "/api/openapi.json"];
    !(SESSIONLESS.contains(&path) || path.starts_with("/api/models/"))
}

/// The operator's token: requests carrying it (`Authorization: Bearer …`) edit the shared model.
pub struct AdminToken(Option<[u8; 32]>);

impl AdminToken {
    /// From the token itself or a file holding it (whitespace trimmed); none: no admin.
    pub fn new(token: Option<String>, file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let token = match (token, file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if token.as_ref().is_some_and(|t| t.len() < 16) {
            anyhow::bail!("the admin token must be at least 16 characters");
        }
        Ok(Self(token.map(|t| digest(&t))))
    }

    /// Whether the request carries the token. Digests are compared, so the time taken says
    /// nothing about the token's characters.
    fn accepts(&self, req: &Request) -> bool {
        let Some(want) = &self.0 else {
            return false;
        };
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| &digest(t.trim()) == want)
    }
}

fn digest(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(max_sessions: usize, memory_mib: usize) -> Sessions {
        Sessions::new(SessionLimits {
            session_ttl: 3600,
            max_sessions,
            session_memory_mib: memory_mib,
            max_session_edits: 2,
        })
    }

    fn an_edit() -> Edit {
        Edit::Rome(loci_core::edit::RomeEdit {
            layer: 0,
            left: vec![0.0; 4],
            right: vec![0.0; 2],
            request: loci_core::edit::RewriteRequest::from_prompt("X is in", "X", "Y").unwrap(),
            hparams: loci_core::edit::RomeHparams::at_layer(0),
            stats: Default::default(),
        })
    }

    #[test]
    fn ids_are_unguessable_and_each_session_is_its_own() {
        let s = sessions(10, 1);
        let (a, b) = (s.open(), s.open());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(s.touch(&a) && s.touch(&b));
        assert!(!s.touch("0000"), "an unknown id is no session");
    }

    #[test]
    fn edits_are_kept_all_or_none_within_the_bounds() {
        let s = sessions(10, 1);
        let a = s.open();
        assert_eq!(s.push(&a, "m", vec![(an_edit(), 10)]).ok(), Some(vec![1]));
        // Two edits would pass the session's limit of two: neither is kept.
        assert!(matches!(
            s.push(&a, "m", vec![(an_edit(), 10), (an_edit(), 10)]),
            Err(Refusal::Full(_))
        ));
        assert!(matches!(
            s.push(&a, "other", vec![(an_edit(), 2 << 20)]),
            Err(Refusal::Full(_))
        ));
        assert_eq!(s.edits(&a, "m").len(), 1);
        assert_eq!(s.bytes(), 10);
        assert!(matches!(
            s.push("gone", "m", vec![(an_edit(), 1)]),
            Err(Refusal::Gone)
        ));
    }

    #[test]
    fn the_least_recently_used_go_first_and_sessions_without_edits_before_them() {
        let s = sessions(3, 1);
        let with_edits = s.open();
        s.push(&with_edits, "m", vec![(an_edit(), 10)])
            .ok()
            .unwrap();
        let idle = s.open();
        let recent = s.open();
        assert!(s.touch(&recent));
        // A fourth visitor: the idle session without edits goes, not the older one with edits.
        let newest = s.open();
        assert_eq!(s.len(), 3);
        assert!(!s.touch(&idle));
        assert!(s.touch(&with_edits) && s.touch(&recent) && s.touch(&newest));
        // Memory: a second session's edits over the budget evict the least recently used.
        s.push(&recent, "m", vec![(an_edit(), 1 << 20)])
            .ok()
            .unwrap();
        assert!(!s.touch(&with_edits), "the session with edits went");
        assert!(
            s.touch(&newest),
            "a session without edits holds no memory: it stays"
        );
        assert_eq!(s.bytes(), 1 << 20);
    }

    #[test]
    fn idle_sessions_expire() {
        let s = Sessions::new(SessionLimits {
            session_ttl: 1,
            max_sessions: 10,
            session_memory_mib: 1,
            max_session_edits: 2,
        });
        let a = s.open();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(!s.touch(&a));
        assert_eq!(s.len(), 0);
    }
}
