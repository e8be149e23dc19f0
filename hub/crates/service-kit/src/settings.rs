//! Helpers for typed settings read from a TOML file and prefixed environment variables: the
//! one-line error naming the setting, range checks, and serde helpers for values the
//! environment parser turns into numbers or lists.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::{Deserialize, Deserializer, Serialize};

/// A setting that cannot be used; `Display` is the one line printed before exiting.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The environment variable (with its prefix), TOML key or flag at fault.
    pub setting: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    /// An error about `setting`.
    pub fn new(setting: &str, problem: impl Into<String>) -> Self {
        Self {
            setting: setting.to_owned(),
            problem: problem.into(),
        }
    }

    /// Names the setting `key` (a field name) as its environment variable under `prefix`.
    pub fn for_key(prefix: &str, key: &str, problem: impl Into<String>) -> Self {
        Self::new(
            &format!("{prefix}{}", key.to_ascii_uppercase()),
            problem.into(),
        )
    }

    /// The error figment reports while extracting settings, naming the variable at fault.
    pub fn from_figment(prefix: &str, e: &figment::Error) -> Self {
        match &e.kind {
            figment::error::Kind::UnknownField(field, _) => {
                Self::for_key(prefix, field, "unknown setting")
            }
            kind => Self::for_key(
                prefix,
                e.path.last().map(String::as_str).unwrap_or("*"),
                kind.to_string(),
            ),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config: {}: {}", self.setting, self.problem)
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the fields of the enclosing spans.
    Json,
}

/// `figment` merged with the TOML file at `file`, if any; a missing file is an error naming
/// `--config` rather than an empty configuration.
pub fn with_file(figment: Figment, file: Option<&Path>) -> Result<Figment, ConfigError> {
    let Some(path) = file else {
        return Ok(figment);
    };
    if !path.is_file() {
        return Err(ConfigError::new(
            "--config",
            format!("{} is not a readable file", path.display()),
        ));
    }
    Ok(figment.merge(Toml::file(path)))
}

/// `figment` merged with explicit pairs (names with or without `prefix`), each value parsed
/// as the environment provider parses a variable (for tests and tools).
pub fn with_pairs<'a>(
    mut figment: Figment,
    prefix: &str,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Figment {
    for (key, value) in pairs {
        let key = key.strip_prefix(prefix).unwrap_or(key).to_ascii_lowercase();
        let value = value
            .parse::<figment::value::Value>()
            .unwrap_or_else(|_| figment::value::Value::from(value.to_owned()));
        figment = figment.merge((key.as_str(), value));
    }
    figment
}

/// `value` must lie within `min..=max`.
pub fn within(setting: &str, value: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(
            setting,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// `value` must be at least `min`.
pub fn at_least(setting: &str, value: Duration, min: Duration) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::new(
            setting,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(())
}

/// Accepts a string, or a number or boolean the environment parser produced from one (a
/// numeric API key or secret must stay text); blank is absent.
pub fn opt_text<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Signed(i64),
        Unsigned(u64),
        Float(f64),
        Flag(bool),
    }
    let value = Option::<Scalar>::deserialize(de)?.map(|v| match v {
        Scalar::Text(s) => s,
        Scalar::Signed(n) => n.to_string(),
        Scalar::Unsigned(n) => n.to_string(),
        Scalar::Float(n) => n.to_string(),
        Scalar::Flag(b) => b.to_string(),
    });
    Ok(value.filter(|s| !s.trim().is_empty()))
}

/// As [`opt_text`], absent read as empty.
pub fn text<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    Ok(opt_text(de)?.unwrap_or_default())
}

/// Accepts `"a,b"` (environment) or `["a", "b"]` (TOML); items trimmed, blanks dropped.
pub fn text_list<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        One(String),
        Many(Vec<String>),
    }
    let items = match List::deserialize(de)? {
        List::One(s) => s.split(',').map(str::to_owned).collect(),
        List::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        #[serde(default, deserialize_with = "opt_text")]
        key: Option<String>,
        #[serde(default, deserialize_with = "text_list")]
        list: Vec<String>,
        #[serde(default)]
        count: usize,
    }

    fn extract(pairs: &[(&str, &str)]) -> Result<Demo, ConfigError> {
        with_pairs(
            Figment::from(Serialized::defaults(Demo::default())),
            "X_",
            pairs.iter().copied(),
        )
        .extract()
        .map_err(|e| ConfigError::from_figment("X_", &e))
    }

    #[test]
    fn numbers_stay_text_and_lists_split_on_commas() {
        let d = extract(&[("X_KEY", "123"), ("X_LIST", "a, b,,c")]).expect("valid");
        assert_eq!(d.key.as_deref(), Some("123"));
        assert_eq!(d.list, ["a", "b", "c"]);
    }

    #[test]
    fn errors_name_the_variable() {
        let e = extract(&[("X_COUNT", "many")]).expect_err("not a number");
        assert_eq!(e.setting, "X_COUNT");
        let e = extract(&[("X_OTHER", "1")]).expect_err("unknown");
        assert_eq!(e.to_string(), "config: X_OTHER: unknown setting");
    }

    #[test]
    fn ranges_and_minimums_name_the_setting() {
        assert!(within("X_N", 5, 1, 10).is_ok());
        let e = within("X_N", 0, 1, 10).expect_err("below");
        assert_eq!(
            e.to_string(),
            "config: X_N: must be between 1 and 10, got 0"
        );
        let e =
            at_least("X_T", Duration::from_millis(1), Duration::from_secs(1)).expect_err("short");
        assert_eq!(e.to_string(), "config: X_T: must be at least 1s");
    }

    #[test]
    fn a_missing_file_names_the_flag() {
        let e =
            with_file(Figment::new(), Some(Path::new("/nonexistent/x.toml"))).expect_err("missing");
        assert_eq!(e.setting, "--config");
    }
}
