//! Both forms through the one conversion: flags as clap parses them, files as the loader reads
//! them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use super::*;
use crate::path::EscapedSlashes;

/// `sigil-agent forward`'s flags, as clap parses them.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
}

fn flags(args: &[&str]) -> std::result::Result<Flags, clap::Error> {
    Cli::try_parse_from(std::iter::once("forward").chain(args.iter().copied())).map(|cli| cli.flags)
}

fn from_flags(args: &[&str]) -> Result<ForwarderConfig> {
    ForwarderConfig::load(None, &flags(args).expect("flags parse"))
}

#[test]
fn flags_make_one_listener() {
    let outbound = [
        "--socket",
        "unix:///tmp/api.sock",
        "--outbound",
        "127.0.0.1:9000",
        "--upstream",
        "localhost:8443",
        "--expect-trust-domain",
        "example.org",
    ];
    let config = from_flags(&outbound).expect("valid");
    assert_eq!(
        config.outbound[0].expect[0].to_string(),
        "spiffe://example.org"
    );
    assert_eq!(config.socket, PathBuf::from("/tmp/api.sock"));

    let both = [&outbound[..], &["--inbound", "0.0.0.0:15443"]].concat();
    let err = from_flags(&both).expect_err("both").to_string();
    assert!(err.contains("--inbound"), "{err}");
    let no_target = [
        "--socket",
        "unix:///tmp/api.sock",
        "--inbound",
        "0.0.0.0:15443",
    ];
    let err = from_flags(&no_target).expect_err("target").to_string();
    assert!(err.contains("--target"), "{err}");
    let upstream_on_inbound = [&no_target[..], &["--upstream", "x:1"]].concat();
    let err = from_flags(&upstream_on_inbound)
        .expect_err("mixed")
        .to_string();
    assert!(
        err.contains("--upstream") && err.contains("<flags>"),
        "{err}"
    );
    let err = from_flags(&["--inbound", "0.0.0.0:1", "--target", "x:1"]);
    if std::env::var_os(sigil_workload_api::ENDPOINT_ENV).is_none() {
        let err = err.expect_err("no socket").to_string();
        assert!(err.contains("SPIFFE_ENDPOINT_SOCKET"), "{err}");
    }
}

#[test]
fn path_settings_from_flags_name_their_flag() {
    let inbound = [
        "--socket",
        "unix:///tmp/api.sock",
        "--inbound",
        "0.0.0.0:15443",
        "--target",
        "127.0.0.1:8080",
        "--escaped-slashes",
        "keep",
    ];
    let http = [&inbound[..], &["--http", "--http-deny", "* * /admin"]].concat();
    let config = from_flags(&[&http[..], &["--max-path-length", "100"]].concat()).expect("valid");
    assert_eq!(config.inbound[0].escaped_slashes, EscapedSlashes::Keep);
    assert_eq!(config.limits.max_path_length, 100);
    assert!(config.inbound[0].permissive_bypass().is_none(), "strict");
    for (bad, says) in [
        (&inbound[..], "--escaped-slashes"),
        (
            &[&http[..], &["--max-path-length", "0"]].concat()[..],
            "--max-path-length",
        ),
        (
            &[&http[..], &["--http-deny", "* * //admin"]].concat()[..],
            "write `/admin`",
        ),
        (
            &[&http[..], &["--idle-timeout", "0s"]].concat()[..],
            "--idle-timeout",
        ),
    ] {
        let err = from_flags(bad).expect_err(says).to_string();
        assert!(err.contains(says), "{err}");
    }
    for (bad, says) in [
        (["--escaped-slashes", "decode"], "--escaped-slashes"),
        (["--mode", "lax"], "lax"),
        (["--idle-timeout", "soon"], "--idle-timeout"),
    ] {
        let err = flags(&[&http[..], &bad[..]].concat())
            .expect_err(says)
            .to_string();
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn flags_override_a_files_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("forward.toml");
    std::fs::write(
        &path,
        "socket = \"unix:///tmp/file.sock\"\n[limits]\nidle_timeout = \"1m\"\nmax_connections = 5\n[[outbound]]\nlisten = \"127.0.0.1:9000\"\nupstream = \"db:1\"\nexpect = [\"spiffe://a/db\"]\n",
    )
    .expect("write");
    let flags =
        flags(&["--socket", "unix:///tmp/flag.sock", "--idle-timeout", "2m"]).expect("parses");
    let config = ForwarderConfig::load(Some(&path), &flags).expect("valid");
    assert_eq!(config.socket, PathBuf::from("/tmp/flag.sock"));
    assert_eq!(config.limits.idle_timeout, Duration::from_secs(120));
    assert_eq!(config.limits.max_connections, 5);
    assert_eq!(config.outbound[0].name, "outbound-9000");
}

fn parse(text: &str) -> Result<ForwarderConfig> {
    ForwarderConfig::from_toml(text, Path::new("forward.toml"))
}

#[test]
fn a_full_file_parses() {
    let config = parse(
        r#"
socket = "unix:///tmp/api.sock"
health_address = "127.0.0.1:15021"
[limits]
handshake_timeout = "2s"
max_connections = 10
max_path_length = 2048
[[inbound]]
listen = "0.0.0.0:15443"
target = "127.0.0.1:8080"
mode = "permissive"
allow = ["spiffe://example.org/ns/prod/*"]
http = true
escaped_slashes = "keep"
[[inbound.http_rules]]
action = "deny"
methods = ["delete"]
paths = ["/admin", "/api*"]
[[outbound]]
name = "db"
listen = "127.0.0.1:9000"
upstream = "db.internal:5432"
expect = ["spiffe://example.org/db"]
"#,
    )
    .expect("valid");
    assert_eq!(config.socket, PathBuf::from("/tmp/api.sock"));
    assert_eq!(config.limits.handshake_timeout, Duration::from_secs(2));
    assert_eq!(config.limits.max_connections, 10);
    assert_eq!(config.inbound[0].name, "inbound-15443");
    assert_eq!(config.inbound[0].mode, Mode::Permissive);
    assert_eq!(config.inbound[0].http_rules[0].methods, vec!["DELETE"]);
    assert_eq!(config.inbound[0].escaped_slashes, EscapedSlashes::Keep);
    assert_eq!(config.limits.max_path_length, 2048);
    let rule = config.inbound[0].http_rules[0].to_string();
    assert_eq!(rule, "deny * DELETE /admin,/api*");
    let warning = config.inbound[0].permissive_bypass().expect("a warning");
    assert!(
        warning.contains("`inbound-15443` is permissive: plaintext callers skip"),
        "{warning}"
    );
    assert_eq!(config.outbound[0].name, "db");

    let inherited = parse(
            "mode = \"permissive\"\n[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\n[[inbound]]\nlisten = \"0.0.0.0:2\"\ntarget = \"x:2\"\nmode = \"strict\"\n",
        )
        .expect("valid");
    assert_eq!(inherited.inbound[0].mode, Mode::Permissive);
    assert_eq!(inherited.inbound[1].mode, Mode::Strict);
}

#[test]
fn errors_name_the_file_and_key() {
    for (text, says) in [
        (
            "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\ncolour = 1\n",
            "colour",
        ),
        (
            "[[inbound]]\nlisten = \"nowhere\"\ntarget = \"x:1\"\n",
            "inbound[0].listen",
        ),
        (
            "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x\"\n",
            "inbound[0].target",
        ),
        (
            "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nallow = [\"spiffe://a\", \"web\"]\n",
            "inbound[0].allow[1]",
        ),
        (
            "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nmode = \"lax\"\n",
            "lax",
        ),
        (
            "[[outbound]]\nlisten = \"0.0.0.0:1\"\nupstream = \"x:1\"\nexpect = [\"spiffe://a\"]\n",
            "loopback",
        ),
        (
            "[[outbound]]\nlisten = \"127.0.0.1:1\"\nupstream = \"x:1\"\nexpect = []\n",
            "outbound[0].expect",
        ),
        ("[limits]\nidle_timeout = \"soon\"\n", "limits.idle_timeout"),
        (
            "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nmode = \"disable\"\ndeny = [\"spiffe://a\"]\n",
            "inbound[0].allow",
        ),
        ("", "no listener"),
        (
            "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nescaped_slashes = \"keep\"\n",
            "inbound[0].escaped_slashes",
        ),
        (
            "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nhttp = true\nescaped_slashes = \"decode\"\n",
            "escaped_slashes",
        ),
        ("[limits]\nmax_path_length = 0\n", "limits.max_path_length"),
        ("[limits]\nmax_path_length = 70000\n", "between 1 and 65534"),
        (
            "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"x:1\"\nhttp = true\n[[inbound.http_rules]]\naction = \"deny\"\npaths = [\"/a/../admin\"]\n",
            "inbound[0].http_rules[0]",
        ),
    ] {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains("forward.toml"), "{err}");
        assert!(err.contains(says), "{text}: {err}");
    }
}
