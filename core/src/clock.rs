//! Wall-clock seconds where the platform has a clock (the browser measures its own jobs).

/// Seconds since the Unix epoch natively; 0 on wasm32, where `SystemTime` is unavailable.
pub fn now_seconds() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }
    #[cfg(target_arch = "wasm32")]
    {
        0.0
    }
}
