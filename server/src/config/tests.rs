use std::time::Duration;

use super::*;

#[test]
fn defaults_and_overrides() {
    let config = ServerConfig::from_toml(
        "trust_domain = \"example.org\"\n[ca]\ndefault_x509_svid_ttl = \"1h\"\n",
    )
    .expect("valid");
    assert_eq!(config.ca.default_x509_svid_ttl.0, Duration::from_secs(3600));
    assert_eq!(config.bind_address.port(), 8081);
    assert!(config.datastore_url().starts_with("sqlite://"));
}

#[test]
fn unknown_keys_and_bad_values_name_the_key() {
    let err = ServerConfig::from_toml("trust_domian = \"x\"").unwrap_err();
    assert!(err.contains("trust_domian"), "{err}");
    let err = ServerConfig::from_toml("[ca]\nttl = \"forever\"").unwrap_err();
    assert!(err.contains("forever") && err.contains("line 2"), "{err}");
    let err = ServerConfig::from_toml("[ca]\nkey_type = \"rsa-1024\"").unwrap_err();
    assert!(err.contains("rsa-1024"), "{err}");
    let err = ServerConfig::from_file(Path::new("/nonexistent/server.toml")).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/server.toml"),
        "{err}"
    );
}

#[test]
fn flags_override_the_file_and_zero_durations_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("server.toml");
    std::fs::write(&path, "trust_domain = \"a.test\"\nlog_level = \"debug\"\n").expect("write");
    let flags = ServerFlags {
        trust_domain: Some("b.test".into()),
        datastore_url: Some("postgres://db/sigil".into()),
        ..ServerFlags::default()
    };
    let (config, source) = ServerConfig::load(Some(&path), flags).expect("valid");
    assert_eq!(source, path);
    assert_eq!(config.trust_domain.as_deref(), Some("b.test"));
    assert_eq!(config.log_level, "debug");
    assert_eq!(config.datastore_url(), "postgres://db/sigil");
    let (config, source) = ServerConfig::load(None, ServerFlags::default()).expect("defaults");
    assert_eq!(source, Path::new("<flags>"));
    assert!(
        config
            .trust_domain(&source)
            .unwrap_err()
            .to_string()
            .contains("trust_domain is required")
    );

    let config = ServerConfig::from_toml("[kubernetes]\nmax_staleness = \"0s\"\n").expect("parses");
    let err = config
        .validate(Path::new("x.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("kubernetes.max_staleness is zero"), "{err}");
}

#[test]
fn ca_ttl_must_cover_svids() {
    let config = ServerConfig::from_toml("trust_domain = \"example.org\"\n[ca]\nttl = \"1h\"\n")
        .expect("parses");
    assert!(config.validate(Path::new("x.toml")).is_err());
}

#[test]
fn agent_api_admission_bounds_are_checked_by_name() {
    let validate = |toml: &str| {
        ServerConfig::from_toml(&format!("trust_domain = \"example.org\"\n{toml}"))
            .expect("parses")
            .validate(Path::new("x.toml"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let err = validate("[agent_api]\nmax_attestations = 0\n").unwrap_err();
    assert!(err.contains("max_attestations"), "{err}");
    for mib in [0, 65_537] {
        let err = validate(&format!("[agent_api]\nmax_sync_page_mib = {mib}\n")).unwrap_err();
        assert!(
            err.contains(&format!("agent_api.max_sync_page_mib is {mib}")),
            "{err}"
        );
    }
    assert!(validate("[agent_api]\nmax_attestations = 1\nmax_sync_page_mib = 65536\n").is_ok());
}
