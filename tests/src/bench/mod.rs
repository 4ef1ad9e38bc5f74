//! The pieces the benchmark binaries (`src/bin/bench_*.rs`) share: the peers of the forwarder
//! benchmark ([`peers`]), the load it puts on them ([`load`]), what `/proc` says about CPU and
//! memory ([`procfs`]), and the figures and Markdown tables they report ([`report`]).

pub mod load;
pub mod peers;
pub mod procfs;
pub mod report;

use std::time::Duration;

/// `250ms`, `3s` or `1.5s` (the suffix is required, so a bare number is not misread): the
/// durations of benchmark command lines.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        return Err(format!("`{text}`: give a unit, e.g. 500ms or 3s"));
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|e| format!("`{text}`: {e}"))?;
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{text}`: {e}"))
}
