//! The fault matrix of high availability (issue 12): three real servers on one private Postgres,
//! two agents that each know all three, and a workload per agent fetching continuously with the
//! `spiffe` crate's client, with 20 s SVIDs so rotation happens during every fault. Each fault in
//! turn, and after each: no failed workload fetch (every answer unexpired and verifying against
//! the bundle served with it), no lost entry, no SVID without an issuance record; the recovery
//! times are printed.
//!
//! Two tests, each with its own cluster, so the two long outages (every server for 30 s, Postgres
//! for 20 s) run side by side. Inside a test the steps run in order on one cluster; a step that
//! fails is reported and the next one still runs, and the test fails at the end naming them all.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sigil_tests::ha::{Cluster, Excuse, Excused, fast_id};

/// Measured recovery times of one step, by what they measure.
type Recovery = Vec<(String, Duration)>;

/// What the steps of one test gave: each step's recovery times, or why it failed.
struct Report {
    steps: Vec<(&'static str, anyhow::Result<()>)>,
}

impl Report {
    fn new() -> Self {
        Report { steps: Vec::new() }
    }

    /// Keeps the outcome of step `name` and prints it with the times it measured, at once (so a
    /// hung later step still shows this one).
    fn record(&mut self, name: &'static str, times: Recovery, outcome: anyhow::Result<()>) {
        match &outcome {
            Ok(()) => eprintln!("STEP PASSED: {name}"),
            Err(e) => eprintln!("STEP FAILED: {name}: {e:#}"),
        }
        for (what, took) in times {
            eprintln!("    recovery: {what}: {took:?}");
        }
        self.steps.push((name, outcome));
    }

    /// Fails naming every failed step.
    fn finish(self) -> anyhow::Result<()> {
        let failed: Vec<String> = self
            .steps
            .iter()
            .filter_map(|(name, outcome)| outcome.as_ref().err().map(|e| format!("{name}: {e:#}")))
            .collect();
        ensure!(
            failed.is_empty(),
            "{} of {} fault steps failed:\n{}",
            failed.len(),
            self.steps.len(),
            failed.join("\n")
        );
        Ok(())
    }
}

/// Runs `step(cluster, &mut times)` and records it in `report` under `name`.
macro_rules! run_step {
    ($report:ident, $name:expr, $step:ident($cluster:expr)) => {{
        let mut times = Recovery::new();
        let outcome = $step($cluster, &mut times).await;
        $report.record($name, times, outcome);
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_servers_and_agents_lose_nothing() -> anyhow::Result<()> {
    let test = "killed_servers_and_agents_lose_nothing";
    let Some(mut cluster) = Cluster::start(test, 3, 2).await? else {
        return Ok(());
    };
    let mut report = Report::new();
    run_step!(
        report,
        "kill -9 of the server agent 0 is connected to",
        kill_the_connected_server(&mut cluster)
    );
    run_step!(
        report,
        "kill -9 of every server for 30 s, agent 1 restarted in the middle",
        kill_every_server(&mut cluster)
    );
    run_step!(report, "kill -9 of agent 0", kill_an_agent(&mut cluster));
    report.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outages_and_a_ca_rotation_lose_nothing() -> anyhow::Result<()> {
    let test = "postgres_outages_and_a_ca_rotation_lose_nothing";
    let Some(mut cluster) = Cluster::start(test, 3, 2).await? else {
        return Ok(());
    };
    let mut report = Report::new();
    run_step!(report, "Postgres restarted", restart_postgres(&mut cluster));
    run_step!(
        report,
        "Postgres stopped for 20 s",
        stop_postgres(&mut cluster)
    );
    run_step!(
        report,
        "full CA rotation on one server while the others serve",
        rotate_the_ca(&mut cluster)
    );
    report.finish()
}

/// The server agent 0 syncs with is killed: the agents on it move to another within the
/// failover target, a new entry created elsewhere reaches the workload, and the killed server
/// comes back.
async fn kill_the_connected_server(
    cluster: &mut Cluster,
    times: &mut Recovery,
) -> anyhow::Result<()> {
    let marks = cluster.marks();
    let victim = cluster.connected_server(0)?;
    let mut on_victim = Vec::new();
    for agent in 0..cluster.agents.len() {
        if cluster.synced_server(agent)? == Some(victim) {
            on_victim.push(agent);
        }
    }
    let killed = Instant::now();
    cluster.servers[victim].crash()?;
    for &agent in &on_victim {
        let (to, at) = cluster
            .wait_synced(agent, Some(victim), Duration::from_secs(10))
            .await?;
        times.push((
            format!("agent {agent}: server {victim} killed to sync stream on server {to}"),
            at - killed,
        ));
    }
    let other = (victim + 1) % cluster.servers.len();
    let created = Instant::now();
    let spiffe_id = cluster.create_entry_on(other, 0, "after-server-kill")?;
    let delivered = cluster
        .wait_delivered(0, &spiffe_id, marks[0], Duration::from_secs(10))
        .await?;
    times.push((
        format!("entry created on server {other} to agent 0's workload, server {victim} down"),
        delivered - created,
    ));
    cluster.servers[victim].restart_stopped()?;
    times.push((format!("server {victim} restarted"), killed.elapsed()));
    lost_nothing(cluster, &marks, &[], times).await?;
    Ok(())
}

/// Every server is killed for 30 s. The agents keep serving what they hold; agent 1 restarts in
/// the middle and must serve its cached SVIDs with no server to talk to. The fast 20 s SVIDs may
/// expire meanwhile (nothing can sign them), but no expired SVID may be served. When the servers
/// return, the agents resync and the fast identities come back.
async fn kill_every_server(cluster: &mut Cluster, times: &mut Recovery) -> anyhow::Result<()> {
    let marks = cluster.marks();
    let down = Instant::now();
    for server in &mut cluster.servers {
        server.crash()?;
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut agent = cluster.agents.remove(1);
    let agent_down = Instant::now();
    // The start may block until a server answers (if the agent cannot serve from its cache);
    // the servers must come back at 30 s whatever it does, so it runs beside the clock.
    let restart = tokio::task::spawn_blocking(move || {
        let outcome = agent.stop().and_then(|()| agent.start_again());
        (agent, outcome, Instant::now())
    });
    let restart = tokio::time::timeout_at((down + Duration::from_secs(30)).into(), restart).await;
    let restarted_alone = match restart {
        Ok(joined) => {
            let (agent, outcome, up) = joined?;
            cluster.agents.insert(1, agent);
            outcome.context("agent 1 did not start while no server answers")?;
            times.push(("agent 1 restart with no server".into(), up - agent_down));
            Some(up)
        }
        Err(_) => None,
    };
    if let Some(up) = restarted_alone {
        let served = cluster.watchers[1]
            .wait_for(marks[1], Duration::from_secs(5), |a| {
                a.at > up && a.failure.is_none() && !a.ids.is_empty()
            })
            .await
            .context("agent 1, restarted with no server, served nothing from its cache")?;
        times.push(("agent 1 up to serving from its cache".into(), served - up));
    }
    tokio::time::sleep_until((down + Duration::from_secs(30)).into()).await;
    let back = cluster.restart_stopped_servers()?;
    ensure!(
        restarted_alone.is_some(),
        "agent 1 did not finish starting within the 30 s no server answered"
    );
    let synced = cluster.wait_all_synced(Duration::from_secs(15)).await?;
    times.push(("servers back to every agent synced".into(), synced - back));
    let mut served_again = back;
    for agent in 0..cluster.agents.len() {
        let at = cluster.wait_served(agent, Duration::from_secs(15)).await?;
        served_again = served_again.max(at);
    }
    times.push((
        "servers back to fresh fast SVIDs served".into(),
        served_again - back,
    ));
    let mut excuses = vec![Excuse {
        agent: 1,
        from: agent_down,
        to: restarted_alone.unwrap_or(back),
        what: Excused::AgentDown,
    }];
    for agent in 0..cluster.agents.len() {
        excuses.push(Excuse {
            agent,
            from: down,
            to: served_again,
            what: Excused::NoSigner,
        });
    }
    lost_nothing(cluster, &marks, &excuses, times).await?;
    Ok(())
}

/// Agent 0 is killed and started again: its workload is served again at once.
async fn kill_an_agent(cluster: &mut Cluster, times: &mut Recovery) -> anyhow::Result<()> {
    let marks = cluster.marks();
    let killed = Instant::now();
    cluster.agents[0].crash()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    cluster.agents[0].start_again()?;
    let up = Instant::now();
    let served = cluster.wait_served(0, Duration::from_secs(10)).await?;
    let (_, synced) = cluster
        .wait_synced(0, None, Duration::from_secs(10))
        .await?;
    times.push(("agent 0 start".into(), up - started));
    times.push((
        "agent 0 up to its workload served".into(),
        served.saturating_duration_since(up),
    ));
    times.push((
        "agent 0 up to its sync stream".into(),
        synced.saturating_duration_since(up),
    ));
    let excuses = [Excuse {
        agent: 0,
        from: killed,
        to: served,
        what: Excused::AgentDown,
    }];
    lost_nothing(cluster, &marks, &excuses, times).await?;
    Ok(())
}

/// Postgres restarts under the servers: admin writes work again soon after and reach workloads.
async fn restart_postgres(cluster: &mut Cluster, times: &mut Recovery) -> anyhow::Result<()> {
    let marks = cluster.marks();
    let started = Instant::now();
    cluster.postgres.restart()?;
    let back = Instant::now();
    times.push(("pg_ctl restart".into(), back - started));
    writes_reach_workloads(cluster, back, "after-postgres-restart", times).await?;
    lost_nothing(cluster, &marks, &[], times).await?;
    Ok(())
}

/// Postgres is down for 20 s: admin calls fail fast, `/ready` answers at once, signing goes on
/// (the fast SVIDs rotate during the outage) with the records spooled on the servers' disks, and
/// once Postgres is back the records are replayed and writes work again. At the end of the
/// outage the server agent 0 syncs with is killed with `kill -9` while its spool holds records,
/// and started again after Postgres: what it spooled must still reach the datastore.
async fn stop_postgres(cluster: &mut Cluster, times: &mut Recovery) -> anyhow::Result<()> {
    let marks = cluster.marks();
    let before: Vec<_> = cluster.watchers.iter().map(|w| w.serials()).collect();
    let down = Instant::now();
    cluster.postgres.stop()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server = &cluster.servers[0];
    let asked = Instant::now();
    let refused = server.cli(&["entry", "list"]);
    times.push((
        "an admin call fails during the outage".into(),
        asked.elapsed(),
    ));
    ensure!(refused.is_err(), "entry list succeeded with Postgres down");
    let asked = Instant::now();
    let ready = sigil_tests::steps::http_response(&server.health, "/ready");
    times.push(("/ready answers during the outage".into(), asked.elapsed()));
    eprintln!("/ready during the outage: {ready:?}");
    tokio::time::sleep_until((down + Duration::from_secs(20)).into()).await;
    for (agent, watcher) in cluster.watchers.iter().enumerate() {
        let fast = fast_id(agent);
        let rotated = watcher
            .serials()
            .into_iter()
            .any(|(serial, id)| id == fast && !before[agent].contains_key(&serial));
        ensure!(
            rotated,
            "agent {agent}'s {fast} did not rotate during the 20 s outage: signing stopped"
        );
    }
    let victim = cluster.connected_server(0)?;
    let spool = cluster.servers[victim]
        .data_dir
        .join("issuance-spool.jsonl");
    let spooled = std::fs::read_to_string(&spool)
        .map(|s| s.lines().count())
        .unwrap_or(0);
    ensure!(
        spooled > 0,
        "server {victim} signed during the outage but its spool {} is empty",
        spool.display()
    );
    cluster.servers[victim].crash()?;
    eprintln!("    server {victim} killed with {spooled} records in its spool");
    cluster.postgres.start_again()?;
    let back = Instant::now();
    cluster.servers[victim].restart_stopped()?;
    times.push((
        format!("Postgres back to server {victim} restarted after its kill -9"),
        back.elapsed(),
    ));
    writes_reach_workloads(cluster, back, "after-postgres-outage", times).await?;
    lost_nothing(cluster, &marks, &[], times).await?;
    Ok(())
}

/// From `back` (Postgres answering again): an entry create on server 1 succeeds (retried while
/// it fails) and reaches agent 0's workload; both times go into `times`.
async fn writes_reach_workloads(
    cluster: &mut Cluster,
    back: Instant,
    name: &str,
    times: &mut Recovery,
) -> anyhow::Result<()> {
    let mark = cluster.watchers[0].mark();
    let spiffe_id = loop {
        match cluster.create_entry_on(1, 0, name) {
            Ok(id) => break id,
            Err(e) if back.elapsed() < Duration::from_secs(20) => {
                eprintln!("entry create after Postgres came back: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("entry create 20 s after Postgres came back")),
        }
    };
    times.push(("Postgres back to an entry created".into(), back.elapsed()));
    let delivered = cluster
        .wait_delivered(0, &spiffe_id, mark, Duration::from_secs(10))
        .await?;
    times.push((
        "Postgres back to the new entry's SVID at the workload".into(),
        delivered - back,
    ));
    Ok(())
}

/// The three checks after every step; the time the records took goes into `times`.
async fn lost_nothing(
    cluster: &Cluster,
    marks: &[usize],
    excuses: &[Excuse],
    times: &mut Recovery,
) -> anyhow::Result<()> {
    let (tally, records) = cluster.nothing_lost(marks, excuses).await?;
    eprintln!("    answers: {tally}");
    times.push(("every served SVID recorded".into(), records));
    Ok(())
}

/// A full CA rotation (prepare, activate, taint, revoke) on the server agent 0 syncs with, so
/// agent 0's SVIDs are the ones replaced, while the other servers serve on: the prepared root
/// reaches every workload before it signs, the tainted CA's SVIDs are replaced at once, and the
/// revoked root leaves every bundle; the other servers' CAs are untouched.
async fn rotate_the_ca(cluster: &mut Cluster, times: &mut Recovery) -> anyhow::Result<()> {
    let marks = cluster.marks();
    let index = cluster.connected_server(0)?;
    let actives: Vec<String> = cluster
        .servers
        .iter()
        .map(active_x509_authority)
        .collect::<anyhow::Result<_>>()?;
    let old = actives[index].clone();
    let server = &cluster.servers[index];
    let roots = server.trust()?.roots.len();

    let prepared = Instant::now();
    server.cli(&["ca", "prepare"])?;
    let published = every_workload(cluster, Duration::from_secs(15), |a| a.roots == roots + 1)
        .await
        .context("the prepared root did not reach every workload")?;
    times.push((
        format!("server {index}: prepared CA in every workload's bundle"),
        published - prepared,
    ));
    server.cli(&["ca", "activate"])?;
    let tainted = Instant::now();
    server.cli(&["ca", "taint", "--id", &old])?;
    let replaced = every_workload(cluster, Duration::from_secs(20), |a| {
        !a.issuers.contains(&old)
    })
    .await
    .context("the tainted CA's SVIDs were not replaced")?;
    times.push((
        "taint to no SVID of the tainted CA served".into(),
        replaced - tainted,
    ));

    let revoked = revoke_when_replaced(server, &old, Duration::from_secs(40)).await?;
    times.push(("taint to revoke accepted".into(), revoked - tainted));
    let gone = every_workload(cluster, Duration::from_secs(15), |a| a.roots == roots)
        .await
        .context("the revoked root did not leave every workload's bundle")?;
    times.push((
        "revoke to the root out of every workload's bundle".into(),
        gone - revoked,
    ));

    for (other, server) in cluster.servers.iter().enumerate() {
        if other != index {
            let now = active_x509_authority(server)?;
            ensure!(
                now == actives[other],
                "server {other}'s CA changed: {} to {now}",
                actives[other]
            );
        }
    }
    lost_nothing(cluster, &marks, &[], times).await?;
    Ok(())
}

/// The id of `server`'s own active X.509 CA, from `ca show` (rows of its instance id).
fn active_x509_authority(server: &sigil_tests::ServerProcess) -> anyhow::Result<String> {
    let owner = std::fs::read_to_string(server.data_dir.join("instance-id"))?;
    let shown = server.cli_json(&["ca", "show"])?;
    let authorities = shown["authorities"].as_array().context("no authorities")?;
    let active = authorities
        .iter()
        .find(|a| a["kind"] == "x509" && a["state"] == "active" && a["owner"] == owner.trim());
    let id = active.and_then(|a| a["id"].as_str());
    Ok(id
        .with_context(|| format!("no active X.509 CA of {} in {shown}", owner.trim()))?
        .to_string())
}

/// Revokes authority `id` on `server` as soon as the server accepts it (it refuses while SVIDs
/// of that authority have not been replaced); when it did.
async fn revoke_when_replaced(
    server: &sigil_tests::ServerProcess,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        match server.cli(&["ca", "revoke", "--id", id]) {
            Ok(_) => return Ok(Instant::now()),
            Err(e)
                if Instant::now() < deadline && format!("{e:#}").contains("not been replaced") =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.context(format!("ca revoke --id {id}"))),
        }
    }
}

/// Waits until every workload was served a valid answer that `wanted` accepts (from now on);
/// when the last one was.
async fn every_workload(
    cluster: &Cluster,
    timeout: Duration,
    wanted: impl Fn(&sigil_tests::ha::Answer) -> bool + Copy,
) -> anyhow::Result<Instant> {
    let mut last = Instant::now();
    for (agent, watcher) in cluster.watchers.iter().enumerate() {
        let mark = watcher.mark();
        let at = watcher
            .wait_for(mark, timeout, |a| a.failure.is_none() && wanted(a))
            .await
            .with_context(|| format!("not within {timeout:?} for agent {agent}'s workload"))?;
        last = last.max(at);
    }
    Ok(last)
}
