//! Model files in the browser: downloaded once (with progress) into the Cache API, read from
//! there by the page and by every worker afterwards. Where the Cache API is missing (pages not
//! served from a secure origin), files come from the network and the HTTP cache.

use js_sys::{Array, Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, CacheStorage, Response};

const CACHE: &str = "loci-models-v1";

fn err(e: JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

/// The page's or the worker's global scope, whichever this runs in.
enum Scope {
    Window(web_sys::Window),
    Worker(web_sys::WorkerGlobalScope),
}

fn scope() -> Result<Scope, String> {
    let g = js_sys::global();
    if let Some(w) = g.dyn_ref::<web_sys::Window>() {
        return Ok(Scope::Window(w.clone()));
    }
    g.dyn_into::<web_sys::WorkerGlobalScope>()
        .map(Scope::Worker)
        .map_err(|_| "no window or worker scope".to_string())
}

async fn cache() -> Option<Cache> {
    let storage: CacheStorage = match scope().ok()? {
        Scope::Window(w) => w.caches().ok()?,
        Scope::Worker(w) => w.caches().ok()?,
    };
    JsFuture::from(storage.open(CACHE))
        .await
        .ok()?
        .dyn_into()
        .ok()
}

async fn fetch(url: &str) -> Result<Response, String> {
    let p: Promise = match scope()? {
        Scope::Window(w) => w.fetch_with_str(url),
        Scope::Worker(w) => w.fetch_with_str(url),
    };
    let r: Response = JsFuture::from(p)
        .await
        .map_err(|e| format!("cannot fetch {url}: {}", err(e)))?
        .dyn_into()
        .map_err(err)?;
    if !r.ok() {
        return Err(format!("{url}: HTTP {}", r.status()));
    }
    Ok(r)
}

async fn cached(url: &str) -> Option<Response> {
    let c = cache().await?;
    let hit = JsFuture::from(c.match_with_str(url)).await.ok()?;
    hit.dyn_into::<Response>().ok()
}

/// Whether `url` is already in the cache (a second visit starts without downloading).
pub async fn is_cached(url: &str) -> bool {
    cached(url).await.is_some()
}

/// Downloads `url` into the cache unless it is there, reporting `(bytes so far, total)`.
pub async fn download(url: &str, mut progress: impl FnMut(u64, u64)) -> Result<(), String> {
    if cached(url).await.is_some() {
        return Ok(());
    }
    let r = fetch(url).await?;
    let total: u64 = r
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let Some(body) = r.body() else {
        return Err(format!("{url}: empty response"));
    };
    let reader: web_sys::ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    // Chunks stay JS arrays: a 500 MB model never passes through wasm memory here.
    let chunks = Array::new();
    let mut got = 0u64;
    loop {
        let step = JsFuture::from(reader.read()).await.map_err(err)?;
        let done = Reflect::get(&step, &"done".into())
            .map_err(err)?
            .as_bool()
            .unwrap_or(true);
        if done {
            break;
        }
        let chunk: Uint8Array = Reflect::get(&step, &"value".into())
            .map_err(err)?
            .unchecked_into();
        got += chunk.length() as u64;
        chunks.push(&chunk);
        progress(got, total.max(got));
    }
    let blob = web_sys::Blob::new_with_u8_array_sequence(&chunks).map_err(err)?;
    if let Some(c) = cache().await {
        let resp = Response::new_with_opt_blob(Some(&blob)).map_err(err)?;
        JsFuture::from(c.put_with_str(url, &resp))
            .await
            .map_err(|e| format!("cannot store {url} in the browser cache: {}", err(e)))?;
    }
    Ok(())
}

/// The bytes of `url`: from the cache when there, else from the network.
pub async fn bytes(url: &str) -> Result<Vec<u8>, String> {
    let r = match cached(url).await {
        Some(r) => r,
        None => fetch(url).await?,
    };
    body(r).await
}

/// The bytes kept in the cache under `key` (a URL of this site's), if any.
pub async fn from_cache(key: &str) -> Option<Vec<u8>> {
    body(cached(key).await?).await.ok()
}

/// A response's whole body.
async fn body(r: Response) -> Result<Vec<u8>, String> {
    let buf = JsFuture::from(r.array_buffer().map_err(err)?)
        .await
        .map_err(err)?;
    Ok(Uint8Array::new(&buf).to_vec())
}

/// Keeps `bytes` in the cache under `key`, for the next visit (nothing where there is no
/// Cache API).
pub async fn keep(key: &str, bytes: &[u8]) -> Result<(), String> {
    let Some(c) = cache().await else {
        return Ok(());
    };
    let arr = Uint8Array::from(bytes);
    let resp = Response::new_with_opt_buffer_source(Some(&arr)).map_err(err)?;
    JsFuture::from(c.put_with_str(key, &resp))
        .await
        .map_err(|e| format!("cannot store {key} in the browser cache: {}", err(e)))?;
    Ok(())
}

/// Removes `key` from the cache (nothing where there is no Cache API).
pub async fn forget(key: &str) {
    if let Some(c) = cache().await {
        let _ = JsFuture::from(c.delete_with_str(key)).await;
    }
}

/// Milliseconds since an arbitrary origin, in the page and in workers.
pub fn now_ms() -> f64 {
    js_sys::Date::now()
}
