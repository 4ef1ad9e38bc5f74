//! What a fault step checks afterwards: that no workload fetch failed (outside what the fault
//! makes impossible, named by an [`Excuse`]), that no entry was lost, and that every serial a
//! workload was served has an issuance record (`sigil-server svid list`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{Cluster, Failure, fast_id, steady_id};

/// A window in which one agent's workload may see something a fault makes unavoidable.
#[derive(Debug, Clone)]
pub struct Excuse {
    /// The agent whose workload it concerns.
    pub agent: usize,
    /// From when.
    pub from: Instant,
    /// Until when.
    pub to: Instant,
    /// What is excused.
    pub what: Excused,
}

/// What an [`Excuse`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excused {
    /// The agent process is not running: fetches cannot connect. Answers that arrive are still
    /// judged in full.
    AgentDown,
    /// No server can sign: the fast identity's 20 s SVID may expire and leave the answer (an
    /// expired SVID served is still a failure). The steady identity must stay.
    NoSigner,
}

/// How the workloads' answers in a step added up.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Answers that were complete and valid.
    pub good: usize,
    /// Fetches that failed while the agent was down.
    pub agent_down: usize,
    /// Answers without the fast identity while no server could sign.
    pub unsigned: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} good answers, {} fetches while the agent was down, {} answers without the fast identity while no server could sign",
            self.good, self.agent_down, self.unsigned
        )
    }
}

impl Cluster {
    /// Judges every answer after `marks` (one per workload, from [`Cluster::marks`]): each must be
    /// valid and hold both identities of its agent, unless an excuse covers it.
    pub fn check_answers(&self, marks: &[usize], excuses: &[Excuse]) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        let mut failures = Vec::new();
        for (agent, watcher) in self.watchers.iter().enumerate() {
            let excused = |at: Instant, what: Excused| {
                excuses
                    .iter()
                    .any(|e| e.agent == agent && e.what == what && e.from <= at && at <= e.to)
            };
            let (fast, steady) = (fast_id(agent), steady_id(agent));
            let answers = watcher.since(marks[agent]);
            let Some(first) = answers.first().map(|a| a.at) else {
                failures.push(format!("agent {agent}: no answer at all"));
                continue;
            };
            let mut failed = Vec::new();
            for answer in answers {
                let verdict = match &answer.failure {
                    Some(Failure::Fetch(_)) if excused(answer.at, Excused::AgentDown) => {
                        tally.agent_down += 1;
                        continue;
                    }
                    Some(failure) => failure.to_string(),
                    None if !answer.ids.contains(&steady) => format!("{steady} was not served"),
                    None if !answer.ids.contains(&fast) => {
                        if excused(answer.at, Excused::NoSigner) {
                            tally.unsigned += 1;
                            continue;
                        }
                        format!("{fast} was not served")
                    }
                    None => {
                        tally.good += 1;
                        continue;
                    }
                };
                failed.push((answer.at - first, verdict));
            }
            if let Some(summary) = summarize(agent, &failed) {
                failures.push(summary);
            }
        }
        anyhow::ensure!(
            failures.is_empty(),
            "failed workload fetches ({tally}):\n{}",
            failures.join("\n")
        );
        Ok(tally)
    }

    /// Fails unless every entry the cluster created is listed by every running server (retrying
    /// for `timeout`, as a server may just have come back).
    pub async fn check_entries(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for server in self.servers.iter().filter(|s| s.is_running()) {
            loop {
                let missing = match server.cli_json(&["entry", "list"]) {
                    Ok(listed) => {
                        let ids: BTreeSet<&str> = listed["entries"]
                            .as_array()
                            .context("no entries in `entry list`")?
                            .iter()
                            .filter_map(|e| e["id"].as_str())
                            .collect();
                        let missing: Vec<&String> = self
                            .entries
                            .iter()
                            .filter(|id| !ids.contains(id.as_str()))
                            .collect();
                        if missing.is_empty() {
                            break;
                        }
                        format!("{} entries missing: {missing:?}", missing.len())
                    }
                    Err(e) => format!("entry list failed: {e:#}"),
                };
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "server {}: {missing}",
                    server.agent_api
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Waits (at most `timeout`) until every serial any workload was served has an issuance
    /// record; how long that took (records spooled during a database outage are replayed late).
    pub async fn check_records(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut seen = std::collections::BTreeMap::new();
        for watcher in &self.watchers {
            seen.extend(watcher.serials());
        }
        loop {
            let missing = match self.any_running_server()?.cli_json(&["svid", "list"]) {
                Ok(listed) => {
                    let recorded: BTreeSet<&str> = listed["svids"]
                        .as_array()
                        .context("no svids in `svid list`")?
                        .iter()
                        .filter_map(|s| s["serial"].as_str())
                        .collect();
                    let missing: Vec<(&String, &String)> = seen
                        .iter()
                        .filter(|(serial, _)| !recorded.contains(serial.as_str()))
                        .collect();
                    if missing.is_empty() {
                        return Ok(started.elapsed());
                    }
                    format!(
                        "{} of the {} SVIDs the workloads were served have no issuance record: {:?}",
                        missing.len(),
                        seen.len(),
                        &missing[..missing.len().min(5)]
                    )
                }
                Err(e) => format!("svid list failed: {e:#}"),
            };
            anyhow::ensure!(started.elapsed() < timeout, "after {timeout:?}: {missing}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The three checks after a fault: answers since `marks` (with `excuses`), entries, records.
    /// The time the records took to be complete, and the tally of answers.
    pub async fn nothing_lost(
        &self,
        marks: &[usize],
        excuses: &[Excuse],
    ) -> anyhow::Result<(Tally, Duration)> {
        let tally = self.check_answers(marks, excuses)?;
        self.check_entries(Duration::from_secs(10)).await?;
        let records = self.check_records(Duration::from_secs(20)).await?;
        Ok((tally, records))
    }
}

/// One line for agent `agent`'s failed fetches (time since the step's first answer, verdict):
/// how many, from when to when, and each distinct verdict once.
fn summarize(agent: usize, failed: &[(Duration, String)]) -> Option<String> {
    let (first, last) = (failed.first()?.0, failed.last()?.0);
    let mut verdicts: Vec<&str> = Vec::new();
    for (_, verdict) in failed {
        // Verdicts differ in their details (ports, serials); the first words tell them apart.
        let kind = verdict.get(..verdict.len().min(60)).unwrap_or(verdict);
        if !verdicts.iter().any(|v| v.starts_with(kind)) {
            verdicts.push(verdict);
        }
    }
    Some(format!(
        "agent {agent}: {} failed fetches from {first:.1?} to {last:.1?} into the step: {}",
        failed.len(),
        verdicts.join(" | ")
    ))
}
