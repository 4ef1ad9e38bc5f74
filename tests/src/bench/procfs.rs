//! What Linux's `/proc` says about a process and the machine, for the benchmarks: resident
//! memory, CPU time of a process, busy time of the whole machine, and the CPU use over a
//! measurement window split into the processes under test, the benchmark itself and everyone
//! else.

use std::time::{Duration, Instant};

use anyhow::Context;

/// Linux reports CPU time in /proc in 1/100 s on every platform the benchmark runs on.
pub const USER_HZ: f64 = 100.0;

/// The resident memory of process `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// A size field of `/proc/<pid>/status` in KiB: `VmRSS` (resident), `RssAnon` (resident and not
/// backed by a file: the heap), `VmHWM` (the most resident it has been).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// User plus system CPU ticks of a process (`pid`, or `self`; all its threads), from
/// `/proc/<pid>/stat`.
fn stat_ticks(pid: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; the fields after it are fixed.
    let (_, fields) = stat.rsplit_once(')').context("no command name in stat")?;
    let fields: Vec<&str> = fields.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime in stat")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime in stat")?.parse()?;
    Ok(utime + stime)
}

/// User plus system CPU ticks of a process (`pid`, or `self`); 0 when it cannot be read (the
/// process is gone).
pub fn process_ticks(pid: &str) -> u64 {
    stat_ticks(pid).unwrap_or(0)
}

/// The CPU time process `pid` has used so far (user plus system, all its threads).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    // A tick is 1 / USER_HZ s: 10 ms, exactly.
    Ok(Duration::from_millis(stat_ticks(&pid.to_string())? * 10))
}

/// Busy ticks of the whole machine, from the first line of /proc/stat: user, nice, system, irq
/// and steal. Softirq is left out: on loopback it is mostly the network stack carrying the
/// benchmark's own traffic, not somebody else's work.
pub fn machine_busy_ticks() -> u64 {
    let busy = || -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let values: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user already).
        Some([0, 1, 2, 5, 7].iter().filter_map(|i| values.get(*i)).sum())
    };
    busy().unwrap_or(0)
}

/// A rate and the CPU use during it (in cores: 1.0 is one core busy all the time).
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// What was counted, per second.
    pub per_second: f64,
    /// The processes under test, together.
    pub cores: f64,
    /// Everything on the machine that is neither the processes under test nor this benchmark:
    /// another build on a shared machine shows here, and makes the window less trustworthy.
    pub others: f64,
}

/// CPU ticks at one instant: the processes under test, this process, and the whole machine
/// (busy only).
#[derive(Debug, Clone, Copy)]
pub struct Ticks {
    measured: u64,
    own: u64,
    machine: u64,
}

impl Ticks {
    /// The ticks now, with `pids` as the processes under test.
    pub fn now(pids: &[u32]) -> Self {
        Ticks {
            measured: pids.iter().map(|pid| process_ticks(&pid.to_string())).sum(),
            own: process_ticks("self"),
            machine: machine_busy_ticks(),
        }
    }

    /// The rate of `count` over `elapsed` since `self`, with the CPU use of `pids` (the same
    /// processes as at the start) and of the others in between.
    pub fn rate(self, pids: &[u32], count: f64, elapsed: Duration) -> Rate {
        let after = Ticks::now(pids);
        let measured = after.measured.saturating_sub(self.measured);
        let own = after.own.saturating_sub(self.own);
        let machine = after.machine.saturating_sub(self.machine);
        let seconds = elapsed.as_secs_f64();
        Rate {
            per_second: count / seconds,
            cores: measured as f64 / USER_HZ / seconds,
            others: machine.saturating_sub(measured + own) as f64 / USER_HZ / seconds,
        }
    }
}

/// Waits (at most `max`) until other processes of the machine use less than a quarter of a
/// core, so that a build next door does not land in a measurement window.
pub async fn wait_for_quiet(max: Duration) {
    let deadline = Instant::now() + max;
    loop {
        let (ticks, started) = (Ticks::now(&[]), Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cores = ticks.rate(&[], 0.0, started.elapsed()).others;
        if cores < 0.25 {
            return;
        }
        if Instant::now() >= deadline {
            println!(
                "  (the machine is busy: other processes use {cores:.2} cores; measuring anyway)"
            );
            return;
        }
    }
}
