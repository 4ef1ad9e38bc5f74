//! What every binary's configuration shares: the duration type of its settings and flags, the
//! TOML loader whose errors name the file, the line and column, the key and the reason, and the
//! required trust domain.
//!
//! Each binary keeps its own settings and checks; this module only makes sure a duration reads
//! the same and a bad file is reported the same everywhere.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::id::{TrustDomain, parse_trust_domain};

/// A duration as a person writes it in a file or a flag: `500ms`, `30s`, `10m`, `24h`, `7d`, or
/// a combination such as `1h30m`. Zero (`0s`) parses; the settings that must be positive say so
/// in their own checks, since only they know why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// A duration of `secs` seconds, for defaults.
    pub const fn from_secs(secs: u64) -> Self {
        HumanDuration(Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds, for defaults.
    pub const fn from_millis(millis: u64) -> Self {
        HumanDuration(Duration::from_millis(millis))
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text)
            .map(HumanDuration)
            .map_err(|e| {
                format!(
                    "`{}` is not a duration ({e}); write e.g. 500ms, 30s, 10m, 24h or 7d",
                    crate::untrusted::untrusted(text)
                )
            })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl From<HumanDuration> for Duration {
    fn from(value: HumanDuration) -> Self {
        value.0
    }
}

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML, or does not have the shape the settings expect (an unknown key, a
    /// missing one, a value of the wrong type or that does not parse).
    #[error("{}: {}", path.display(), describe(*location, key, message))]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where in the file, when the parser knows.
        location: Option<Location>,
        /// The key, dotted as in the file (`limits.idle_timeout`, `inbound[0].mode`); empty at
        /// the top level or when the text is not TOML at all.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value that parsed but is wrong: a trust domain that is not one, a file a setting names
    /// that holds no certificate, settings that contradict each other.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file (or [`FLAGS_SOURCE`]) the value came from.
        path: PathBuf,
        /// The key and what is wrong with it.
        reason: String,
    },
}

/// A place in a file, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The line.
    pub line: usize,
    /// The column, in characters.
    pub column: usize,
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] value of the file (or [`FLAGS_SOURCE`]) at `path`.
    pub fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Parse { path, .. }
            | ConfigError::Invalid { path, .. } => path,
        }
    }

    /// The message without the file's name, for errors that show the file apart.
    pub fn reason(&self) -> String {
        match self {
            ConfigError::Read { source, .. } => format!("cannot read the file: {source}"),
            ConfigError::Parse {
                location,
                key,
                message,
                ..
            } => describe(*location, key, message),
            ConfigError::Invalid { reason, .. } => reason.clone(),
        }
    }
}

/// `line 2, column 7: key `ca.ttl`: <message>`, leaving out what is not known.
fn describe(location: Option<Location>, key: &str, message: &str) -> String {
    let mut text = String::new();
    if let Some(Location { line, column }) = location {
        text.push_str(&format!("line {line}, column {column}: "));
    }
    if !key.is_empty() {
        text.push_str(&format!("key `{key}`: "));
    }
    text.push_str(message);
    text
}

/// Reads and parses the TOML file at `path` into `T`. Keys `T` does not know are refused where
/// `T` says `#[serde(deny_unknown_fields)]`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

/// The source that errors name when no file was given and only flags and defaults apply.
pub const FLAGS_SOURCE: &str = "<flags>";

/// The settings of the file at `path`, or the defaults when no file is given, with the source
/// to name in later errors (the file, or [`FLAGS_SOURCE`]). Flags are merged on top by the caller.
pub fn load_or_default<T: DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<(T, PathBuf), ConfigError> {
    match path {
        Some(path) => Ok((load_toml(path)?, path.to_path_buf())),
        None => Ok((T::default(), PathBuf::from(FLAGS_SOURCE))),
    }
}

/// The trust domain a server or agent configuration must name (`trust_domain`, or the
/// `--trust-domain` flag), checked; the error is the reason, for the caller's own error type.
pub fn required_trust_domain(name: Option<&str>) -> Result<TrustDomain, String> {
    let name = name.ok_or_else(|| {
        "trust_domain is required: set it in the file or pass --trust-domain example.org"
            .to_string()
    })?;
    parse_trust_domain("trust_domain", name).map_err(|e| e.to_string())
}

/// Parses TOML `text` that came from `path` (which only names the file in errors) into `T`.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    let failed = |error: &toml::de::Error, key: String| ConfigError::Parse {
        path: path.to_path_buf(),
        location: error.span().map(|span| location(text, span.start)),
        key,
        message: error.message().trim_end().to_string(),
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|e| failed(&e, String::new()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        // The path of an error at the top level prints as `.`.
        let key = if key == "." { String::new() } else { key };
        failed(e.inner(), key)
    })
}

/// The line and column of byte `offset` in `text`.
fn location(text: &str, offset: usize) -> Location {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        #[serde(default)]
        wait: Option<HumanDuration>,
        #[serde(default)]
        limits: Limits,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        #[serde(default)]
        idle_timeout: Option<HumanDuration>,
    }

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        parse_toml(text, Path::new("x.toml"))
    }

    #[test]
    fn durations_read_as_people_write_them() {
        for (text, secs) in [("30s", 30), ("10m", 600), ("1h30m", 5400), ("7d", 604_800)] {
            let parsed: HumanDuration = text.parse().expect(text);
            assert_eq!(parsed, HumanDuration::from_secs(secs));
        }
        assert_eq!("0s".parse(), Ok(HumanDuration::default()));
        assert_eq!(HumanDuration::from_millis(1500).to_string(), "1s 500ms");
        let err = "soon".parse::<HumanDuration>().unwrap_err();
        assert!(err.starts_with("`soon` is not a duration"), "{err}");
        let settings = parse("wait = \"5ms\"\n[limits]\nidle_timeout = \"1h\"\n").expect("valid");
        assert_eq!(settings.wait, Some(HumanDuration::from_millis(5)));
        assert_eq!(
            settings.limits.idle_timeout,
            Some(HumanDuration::from_secs(3600))
        );
    }

    #[test]
    fn errors_name_the_file_line_key_and_reason() {
        let err = parse("wait = \"1s\"\n[limits]\nidle_timeout = \"soon\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "x.toml: line 3, column 16: key `limits.idle_timeout`: `soon` is not a duration"
            ),
            "{text}"
        );
        assert_eq!(err.path(), Path::new("x.toml"));
        assert!(!err.reason().contains("x.toml"), "{err}");

        let err = parse("[limits]\ncolour = 1\n").unwrap_err().to_string();
        assert!(
            err.contains("line 2, column 1") && err.contains("unknown field `colour`"),
            "{err}"
        );
        assert!(err.contains("key `limits.colour`"), "{err}");

        let err = parse("wait = \n").unwrap_err().to_string();
        assert!(err.starts_with("x.toml: line 1"), "{err}");

        assert!(
            required_trust_domain(None)
                .unwrap_err()
                .contains("trust_domain is required")
        );
        assert!(required_trust_domain(Some("Not A Domain")).is_err());
        assert_eq!(
            required_trust_domain(Some("example.org"))
                .expect("valid")
                .to_string(),
            "example.org"
        );
        let err = load_or_default::<Settings>(Some(Path::new("/nonexistent/x.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("/nonexistent/x.toml: cannot read the file"),
            "{err}"
        );
    }
}
