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
