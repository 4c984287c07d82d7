//! Wall-clock seconds, natively and in the browser.

/// Seconds since the Unix epoch (on wasm32 from the browser's `Date.now()`: `SystemTime` is
/// unavailable there).
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
        js_sys::Date::now() / 1e3
    }
}

/// Seconds per phase of a computation, measured as it goes.
#[derive(Clone, Debug)]
pub struct Laps {
    /// Seconds each named phase took.
    pub seconds: std::collections::BTreeMap<String, f64>,
    clock: f64,
}

impl Laps {
    /// Starts the clock.
    pub fn start() -> Self {
        Self {
            seconds: Default::default(),
            clock: now_seconds(),
        }
    }

    /// Ends the phase `name` now and starts the next.
    pub fn lap(&mut self, name: &str) {
        let now = now_seconds();
        self.seconds.insert(name.to_string(), now - self.clock);
        self.clock = now;
    }
}
