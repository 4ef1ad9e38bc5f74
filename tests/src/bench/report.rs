//! The figures of the forwarder benchmark: what one round measured for one peer, the medians over
//! the rounds, and the Markdown tables that go into docs/PERFORMANCE.md; and the percentile that
//! every benchmark reports.

use std::fmt::Write as _;
use std::time::Duration;

use super::load::Load;
use super::peers::Peer;
use super::procfs::Rate;

/// Everything measured for one peer.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The peer's version line(s).
    pub version: String,
    /// Bulk throughput on one connection.
    pub bulk_one: Option<Rate>,
    /// Bulk throughput on many connections.
    pub bulk_many: Option<Rate>,
    /// New connections per second.
    pub connections: Option<Rate>,
    /// Connections of the rate test that failed.
    pub connection_failures: u64,
    /// Round-trip time on a kept connection: (p50, p99).
    pub latency: Option<(Duration, Duration)>,
    /// The most CPU that other processes of the machine took in any window of this peer.
    pub others: f64,
    /// (role, KiB before, KiB after) per proxy process.
    pub memory: Vec<(&'static str, u64, u64)>,
    /// Anything else worth printing (Envoy's negotiated TLS parameters).
    pub notes: Vec<String>,
}

/// The value at fraction `p` (0.0 to 1.0) of `sorted`, nearest rank; zero when it is empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(index.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The figures a latency benchmark prints of its samples, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct LatencyMs {
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The slowest sample (zero when there is none).
    pub max: f64,
}

impl LatencyMs {
    /// Sorts `samples` and takes their figures.
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        LatencyMs {
            p50: ms(percentile(samples, 0.5)),
            p99: ms(percentile(samples, 0.99)),
            max: ms(samples.last().copied().unwrap_or_default()),
        }
    }
}

/// Bytes in a MiB.
pub const MIB: f64 = 1024.0 * 1024.0;

/// The median of `values` (the lower middle one for an even count), `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len().saturating_sub(1) / 2).copied()
}

/// One peer over all rounds: the median of each figure.
struct Summary {
    bulk_one: Option<(f64, f64)>,
    bulk_many: Option<(f64, f64)>,
    connections: Option<(f64, f64)>,
    /// Medians of rate per proxy core: 1 conn, many conns, new connections.
    per_core: [Option<f64>; 3],
    failures: u64,
    latency: Option<(f64, f64)>,
    memory: [Option<f64>; 2],
    others: f64,
}

fn summarize(outcomes: &[Outcome], idle: usize) -> Summary {
    let rate = |pick: fn(&Outcome) -> Option<Rate>| {
        let rates: Vec<Rate> = outcomes.iter().filter_map(pick).collect();
        let per_second = median(rates.iter().map(|r| r.per_second).collect())?;
        let cores = median(rates.iter().map(|r| r.cores).collect())?;
        Some((per_second, cores))
    };
    let per_core = |pick: fn(&Outcome) -> Option<Rate>| {
        median(
            outcomes
                .iter()
                .filter_map(pick)
                .filter(|r| r.cores > 0.0)
                .map(|r| r.per_second / r.cores)
                .collect(),
        )
    };
    let latency = || {
        let samples: Vec<(Duration, Duration)> =
            outcomes.iter().filter_map(|o| o.latency).collect();
        Some((
            median(samples.iter().map(|(p50, _)| p50.as_secs_f64()).collect())?,
            median(samples.iter().map(|(_, p99)| p99.as_secs_f64()).collect())?,
        ))
    };
    let memory = |role: &str| {
        median(
            outcomes
                .iter()
                .flat_map(|o| o.memory.iter())
                .filter(|(r, _, _)| *r == role)
                .map(|(_, before, after)| after.saturating_sub(*before) as f64 / idle as f64)
                .collect(),
        )
    };
    Summary {
        bulk_one: rate(|o| o.bulk_one),
        bulk_many: rate(|o| o.bulk_many),
        connections: rate(|o| o.connections),
        per_core: [
            per_core(|o| o.bulk_one),
            per_core(|o| o.bulk_many),
            per_core(|o| o.connections),
        ],
        failures: outcomes.iter().map(|o| o.connection_failures).sum(),
        latency: latency(),
        memory: [memory("outbound"), memory("inbound")],
        others: outcomes.iter().map(|o| o.others).fold(0.0, f64::max),
    }
}

/// The Markdown tables of the forwarder benchmark (the ones in docs/PERFORMANCE.md): the medians
/// over `rounds` of every figure of every peer, and the rates per core of proxy CPU.
pub fn table(results: &[(Peer, Vec<Outcome>)], rounds: usize, load: &Load) -> String {
    let summaries: Vec<(Peer, Summary)> = results
        .iter()
        .filter(|(_, outcomes)| !outcomes.is_empty())
        .map(|(peer, outcomes)| (*peer, summarize(outcomes, load.idle)))
        .collect();
    let direct = summaries
        .iter()
        .find(|(peer, _)| *peer == Peer::Direct)
        .and_then(|(_, summary)| summary.latency);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Medians of {} round(s).\n\n| | bulk, 1 conn | bulk, {} conns | new conns/s | RTT p50 | RTT p99 | added p50 | added p99 | per idle conn, outbound | per idle conn, inbound | others, max |\n|---|---|---|---|---|---|---|---|---|---|---|",
        rounds, load.streams
    );
    let rate = |rate: Option<(f64, f64)>, scale: f64, unit: &str| match rate {
        Some((per_second, cores)) if cores > 0.0 => {
            format!("{:.0}{unit} ({cores:.2} cores)", per_second / scale)
        }
        Some((per_second, _)) => format!("{:.0}{unit}", per_second / scale),
        None => "-".into(),
    };
    let micros = |seconds: f64| format!("{:.0} us", seconds * 1e6);
    let added = |seconds: f64, base: f64| format!("+{:.0} us", (seconds - base) * 1e6);
    let kib = |value: Option<f64>| value.map_or_else(|| "-".into(), |v| format!("{v:.1} KiB"));
    for (peer, summary) in &summaries {
        let (p50, p99) = summary
            .latency
            .map(|(p50, p99)| (micros(p50), micros(p99)))
            .unwrap_or_default();
        let (added50, added99) = match (summary.latency, direct) {
            (Some((p50, p99)), Some((d50, d99))) if *peer != Peer::Direct => {
                (added(p50, d50), added(p99, d99))
            }
            _ => ("-".into(), "-".into()),
        };
        let failures = if summary.failures > 0 {
            format!(" ({} failed)", summary.failures)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}{failures} | {p50} | {p99} | {added50} | {added99} | {} | {} | {:.2} |",
            peer.label(),
            rate(summary.bulk_one, MIB, " MiB/s"),
            rate(summary.bulk_many, MIB, " MiB/s"),
            rate(summary.connections, 1.0, ""),
            kib(summary.memory[0]),
            kib(summary.memory[1]),
            summary.others,
        );
    }
    // The machine is shared by client, backend and both proxies: per core of proxy CPU is the
    // figure that depends least on who else got the cores.
    let _ = writeln!(
        out,
        "\nPer core of proxy CPU (both processes), medians:\n\n| | MiB/s, 1 conn | MiB/s, {} conns | new conns/s |\n|---|---|---|---|",
        load.streams
    );
    let figure = |value: Option<f64>| value.map_or_else(|| "-".into(), |v| format!("{v:.0}"));
    for (peer, summary) in summaries.iter().filter(|(peer, _)| *peer != Peer::Direct) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            peer.label(),
            figure(summary.per_core[0].map(|v| v / MIB)),
            figure(summary.per_core[1].map(|v| v / MIB)),
            figure(summary.per_core[2]),
        );
    }
    out
}
