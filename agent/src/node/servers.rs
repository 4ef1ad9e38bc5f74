//! The servers an agent may talk to, and how it picks one each time it connects.
//!
//! `server_address` names one or more `host:port`s, and a name may resolve to several addresses
//! (a Kubernetes headless Service). Every time the channel needs a connection, [`Servers::connect`]
//! resolves every configured name again (so servers that come and go behind a name are found),
//! shuffles the addresses (so a fleet of agents spreads over the servers) and tries them in turn,
//! each with a deadline of [`CONNECT_TIMEOUT`] for TCP and the TLS handshake, so a dead or hung
//! server costs at most that before the next one is tried. tonic's channel asks again on the next
//! call after a connection broke, which is how the agent fails over.
//!
//! A server whose TLS identity does not verify against the bundle the agent holds (or that refuses
//! the agent's own certificate) is logged once and skipped for [`SKIP_FOR`]; a server a call just
//! failed on is tried after the others for [`DEMOTE_FOR`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::ServerName;
use sigil_core::sync::MutexExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long one address may take to accept TCP and finish the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long resolving one configured name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a server whose identity did not verify is left out. Long enough that a wrong server
/// does not fill the log, short enough that a fixed one (or a rotated bundle) is found again.
pub const SKIP_FOR: Duration = Duration::from_secs(30);

/// How long a server a call failed on is tried after the others.
const DEMOTE_FOR: Duration = Duration::from_secs(10);

/// The configured server addresses and what the agent learnt about them; clones share it.
#[derive(Debug, Clone)]
pub struct Servers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addresses: Vec<String>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Addresses whose TLS identity did not verify, and until when they are left out.
    skipped: HashMap<SocketAddr, Instant>,
    /// Addresses a call failed on recently, and until when they come last.
    demoted: HashMap<SocketAddr, Instant>,
    /// The address of the newest connection.
    current: Option<SocketAddr>,
}

impl From<&str> for Servers {
    fn from(address: &str) -> Self {
        Servers::new(vec![address.to_string()])
    }
}

impl From<&String> for Servers {
    fn from(address: &String) -> Self {
        Servers::from(address.as_str())
    }
}

impl From<&Servers> for Servers {
    fn from(servers: &Servers) -> Self {
        servers.clone()
    }
}

impl Servers {
    /// The servers at `addresses` (`host:port` each; a host may be a name with several addresses).
    pub fn new(addresses: Vec<String>) -> Self {
        Servers {
            inner: Arc::new(Inner {
                addresses,
                state: Mutex::default(),
            }),
        }
    }

    /// The configured addresses, as given.
    pub fn addresses(&self) -> &[String] {
        &self.inner.addresses
    }

    /// The configured addresses joined for a log line.
    pub fn describe(&self) -> String {
        self.inner.addresses.join(", ")
    }

    /// Puts the server of the newest connection last for a while: a call on it just failed.
    pub fn demote_current(&self) {
        let mut state = self.inner.state.lock_unpoisoned();
        if let Some(current) = state.current {
            state.demoted.insert(current, Instant::now() + DEMOTE_FOR);
        }
    }

    /// Forgets which servers did not verify: the roots they were checked against changed.
    pub fn forget_skipped(&self) {
        self.inner.state.lock_unpoisoned().skipped.clear();
    }

    /// Connects to one of the servers: the first, in shuffled order, that completes a TCP
    /// connection and a TLS handshake (which verifies it) within [`CONNECT_TIMEOUT`].
    pub(crate) async fn connect(
        &self,
        connector: &TlsConnector,
        server_name: &ServerName<'static>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let (candidates, mut failures) = self.candidates().await;
        for address in candidates {
            let attempt = async {
                let tcp = TcpStream::connect(address).await?;
                tcp.set_nodelay(true)?;
                connector.connect(server_name.clone(), tcp).await
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(tls)) => {
                    self.inner.state.lock_unpoisoned().current = Some(address);
                    tracing::info!(server = %address, "connected to a server");
                    return Ok(tls);
                }
                Ok(Err(e)) => {
                    if let Some(refusal) = tls_refusal(&e) {
                        self.skip(address, refusal);
                    }
                    failures.push(format!("{address}: {e}"));
                }
                Err(_) => failures.push(format!(
                    "{address}: no TLS handshake within {CONNECT_TIMEOUT:?}"
                )),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            format!(
                "no server answered at {} ({})",
                self.describe(),
                failures.join("; ")
            ),
        ))
    }

    /// Every address the configured names resolve to now, in the order to try them: shuffled,
    /// demoted ones last, skipped ones left out; and why some could not be tried.
    async fn candidates(&self) -> (Vec<SocketAddr>, Vec<String>) {
        let resolved =
            futures::future::join_all(self.inner.addresses.iter().map(|name| async move {
                let lookup =
                    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(name)).await;
                (name, lookup)
            }))
            .await;
        let mut failures = Vec::new();
        let mut addresses = Vec::new();
        for (name, lookup) in resolved {
            match lookup {
                Ok(Ok(found)) => addresses.extend(found),
                Ok(Err(e)) => failures.push(format!("{name}: cannot resolve: {e}")),
                Err(_) => failures.push(format!("{name}: not resolved within {RESOLVE_TIMEOUT:?}")),
            }
        }
        addresses.sort_unstable();
        addresses.dedup();
        shuffle(&mut addresses);

        let now = Instant::now();
        let mut state = self.inner.state.lock_unpoisoned();
        state.skipped.retain(|_, until| *until > now);
        state.demoted.retain(|_, until| *until > now);
        let (skipped, usable): (Vec<_>, Vec<_>) = addresses
            .into_iter()
            .partition(|address| state.skipped.contains_key(address));
        for address in skipped {
            failures.push(format!(
                "{address}: skipped for now, its TLS identity did not verify"
            ));
        }
        let (demoted, mut ordered): (Vec<_>, Vec<_>) = usable
            .into_iter()
            .partition(|address| state.demoted.contains_key(address));
        ordered.extend(demoted);
        (ordered, failures)
    }

    fn skip(&self, address: SocketAddr, reason: &rustls::Error) {
        tracing::warn!(
            server = %address,
            reason = %reason,
            skipped_for = ?SKIP_FOR,
            "skipping a server whose TLS identity cannot be verified against the agent's bundle (or that refuses the agent's certificate)"
        );
        self.inner
            .state
            .lock_unpoisoned()
            .skipped
            .insert(address, Instant::now() + SKIP_FOR);
    }
}

/// The TLS refusal behind a failed handshake: a certificate that does not verify on either side
/// (as opposed to a server that is away).
fn tls_refusal(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Fisher-Yates with the system's randomness; without randomness the order stays as it is.
fn shuffle(addresses: &mut [SocketAddr]) {
    let random = SystemRandom::new();
    for i in (1..addresses.len()).rev() {
        let mut bytes = [0u8; 4];
        if random.fill(&mut bytes).is_err() {
            return;
        }
        let bound = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let j = usize::try_from(u32::from_le_bytes(bytes) % bound).unwrap_or(0);
        addresses.swap(i, j);
    }
}

#[cfg(test)]
#[path = "servers_tests.rs"]
mod tests;
