//! The server engine's HTTP calls: JSON in and out, errors in words, and the streamed trace and
//! study.

use futures_util::StreamExt;
use gloo_net::eventsource::futures::EventSource;
use loci_core::study::StudyLine;
use loci_core::trace::{TraceHeader, TraceKind, TraceMethod, TraceRequest, TraceResult};
use serde::de::DeserializeOwned;
use serde::Deserialize;

#[derive(Deserialize)]
pub struct ErrorMsg {
    pub error: String,
}

pub async fn answer<T: DeserializeOwned>(r: gloo_net::http::Response) -> Result<T, String> {
    if r.ok() {
        r.json().await.map_err(|e| e.to_string())
    } else {
        Err(r
            .json::<ErrorMsg>()
            .await
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("HTTP {}", r.status())))
    }
}

pub async fn post<T: DeserializeOwned>(path: &str, body: &serde_json::Value) -> Result<T, String> {
    let r = gloo_net::http::Request::post(path)
        .json(body)
        .map_err(|e| e.to_string())?
        .send()
        .await
        .map_err(|e| e.to_string())?;
    answer(r).await
}

pub async fn get<T: DeserializeOwned>(path: &str) -> Result<T, String> {
    let r = gloo_net::http::Request::get(path)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    answer(r).await
}

pub async fn get_bytes(path: &str) -> Result<Vec<u8>, String> {
    let r = gloo_net::http::Request::get(path)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.ok() {
        return Err(format!("HTTP {}", r.status()));
    }
    r.binary().await.map_err(|e| e.to_string())
}

#[derive(Deserialize)]
pub struct RowMsg {
    pub kind: TraceKind,
    pub token: usize,
    pub scores: Vec<f32>,
}

/// What a streamed event means to its reader: read on, or the stream's outcome.
pub enum Flow<T> {
    Go,
    Done(Result<T, String>),
}

impl<T> Flow<T> {
    /// Read on, or stop as cancelled.
    fn go_on(keep: bool) -> Self {
        if keep {
            Flow::Go
        } else {
            Flow::Done(Err("cancelled".into()))
        }
    }
}

/// A server job streamed as Server-Sent Events (the body goes as `?q=`: EventSource only GETs):
/// `on` sees every event but `error`, which ends the stream with its message. Leaving early
/// closes the stream, which cancels the job on the server.
async fn stream<T>(
    path: &str,
    body: &serde_json::Value,
    events: &[&str],
    mut on: impl FnMut(&str, &str) -> Flow<T>,
) -> Result<T, String> {
    let url = format!(
        "{path}?q={}",
        js_sys::encode_uri_component(&body.to_string())
    );
    let mut es = EventSource::new(&url).map_err(|e| format!("cannot open the stream: {e}"))?;
    let subs: Vec<_> = events
        .iter()
        .chain(&["error"])
        .filter_map(|n| es.subscribe(*n).ok())
        .collect();
    let mut events = futures_util::stream::select_all(subs);
    let outcome = loop {
        let Some(ev) = events.next().await else {
            break Err("the stream ended early".to_string());
        };
        let Ok((name, msg)) = ev else {
            break Err("the connection to the server was lost".into());
        };
        let data = msg.data().as_string().unwrap_or_default();
        if name == "error" {
            break Err(serde_json::from_str::<ErrorMsg>(&data)
                .map(|e| e.error)
                .unwrap_or_else(|_| "the job failed".into()));
        }
        if let Flow::Done(r) = on(&name, &data) {
            break r;
        }
    };
    // Closing stops the browser from reconnecting (and cancels a running job).
    es.close();
    outcome
}

/// A trace on the server, streamed; `on_row` returning false cancels (closing the stream).
pub async fn server_trace(
    (model, method): (&str, TraceMethod),
    req: &TraceRequest,
    mut on_header: impl FnMut(&TraceHeader),
    mut on_row: impl FnMut(TraceKind, usize, Vec<f32>) -> bool,
) -> Result<TraceResult, String> {
    let mut body = serde_json::to_value(req).expect("request serialises");
    body["model"] = serde_json::json!(model);
    body["method"] = serde_json::json!(method.name());
    stream(
        "/api/trace",
        &body,
        &["start", "row", "result"],
        |name, data| match name {
            "start" => {
                if let Ok(h) = serde_json::from_str::<TraceHeader>(data) {
                    on_header(&h);
                }
                Flow::Go
            }
            "row" => match serde_json::from_str::<RowMsg>(data) {
                Ok(r) => Flow::go_on(on_row(r.kind, r.token, r.scores)),
                Err(_) => Flow::Go,
            },
            _ => Flow::Done(serde_json::from_str::<TraceResult>(data).map_err(|e| e.to_string())),
        },
    )
    .await
}

/// A study on the server (`body` as `/api/study` takes it), streamed: each line as it comes;
/// `on_line` returning false cancels. Ends with every line of the case.
pub async fn server_study(
    body: &serde_json::Value,
    mut on_line: impl FnMut(StudyLine) -> bool,
) -> Result<(), String> {
    stream(
        "/api/study",
        body,
        &["case", "edit", "result"],
        |name, data| {
            let line = match name {
                "case" => serde_json::from_str(data).map(StudyLine::Case),
                "edit" => serde_json::from_str(data).map(StudyLine::Edit),
                _ => return Flow::Done(Ok(())),
            };
            match line {
                Ok(l) => Flow::go_on(on_line(l)),
                Err(e) => Flow::Done(Err(format!("unreadable study event: {e}"))),
            }
        },
    )
    .await
}

/// `s` percent-encoded for a URL path segment or query value (model and file names).
pub fn url_part(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_encoded_for_urls() {
        assert_eq!(super::url_part("SmolLM2-135M.Q4_1"), "SmolLM2-135M.Q4_1");
        assert_eq!(
            super::url_part("my model/../x?&"),
            "my%20model%2F..%2Fx%3F%26"
        );
    }
}
