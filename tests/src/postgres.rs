//! A fresh Postgres database per test run.
//!
//! The server is `SIGIL_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`, the
//! machine's trust-auth cluster). Each call creates a new database with a random name; it is
//! dropped again when the returned guard goes.

use std::time::Duration;

use sqlx::{Connection, Executor};

/// The admin URL tests connect to first.
pub fn admin_url() -> String {
    std::env::var("SIGIL_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database created for one test; dropped on `drop`.
#[derive(Debug)]
pub struct FreshDatabase {
    /// The URL of the new database.
    pub url: String,
    name: String,
}

/// Creates a fresh database, or returns `None` (with a printed notice) when Postgres is not
/// reachable on a developer machine. Under `CI=true` an unreachable Postgres is an error.
pub async fn fresh_database(test: &str) -> anyhow::Result<Option<FreshDatabase>> {
    sqlx::any::install_default_drivers();
    let admin = admin_url();
    let connection =
        tokio::time::timeout(Duration::from_secs(5), sqlx::AnyConnection::connect(&admin)).await;
    let mut connection = match connection {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => return unavailable(test, &admin, &e.to_string()),
        Err(_) => return unavailable(test, &admin, "timed out after 5 s"),
    };
    let mut random = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    let name = format!(
        "sigil_test_{}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    connection
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    connection.close().await?;
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    Ok(Some(FreshDatabase {
        url: format!("{base}/{name}"),
        name,
    }))
}

fn unavailable(test: &str, url: &str, why: &str) -> anyhow::Result<Option<FreshDatabase>> {
    crate::skip_unless_ci(
        &format!("the Postgres part of {test}"),
        &format!("Postgres at {url} is unreachable ({why})"),
        "start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or set SIGIL_TEST_POSTGRES",
    )?;
    Ok(None)
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        // Best effort, on a thread of its own so it works inside and outside a runtime.
        let admin = admin_url();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut connection = sqlx::AnyConnection::connect(&admin).await?;
                connection
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await?;
                Ok::<_, sqlx::Error>(())
            })?;
            Ok::<_, anyhow::Error>(())
        })
        .join();
    }
}

/// The datastore a benchmark was asked to measure (`sqlite` or `postgres`).
#[derive(Debug)]
pub enum BenchDatastore {
    /// The server's embedded default.
    Sqlite,
    /// A fresh database on the machine's Postgres.
    Postgres(FreshDatabase),
}

impl BenchDatastore {
    /// The `[datastore] url` to start the server with (`None`: the SQLite default).
    pub fn url(&self) -> Option<&str> {
        match self {
            BenchDatastore::Sqlite => None,
            BenchDatastore::Postgres(database) => Some(&database.url),
        }
    }
}

/// The datastore named `choice` for benchmark `bench`; `None` when it is Postgres and Postgres
/// cannot be reached on a developer machine (a notice is printed; the benchmark skips it).
pub async fn bench_datastore(choice: &str, bench: &str) -> anyhow::Result<Option<BenchDatastore>> {
    match choice {
        "sqlite" => Ok(Some(BenchDatastore::Sqlite)),
        "postgres" => Ok(fresh_database(bench).await?.map(BenchDatastore::Postgres)),
        other => anyhow::bail!("unknown datastore `{other}`; use sqlite or postgres"),
    }
}
