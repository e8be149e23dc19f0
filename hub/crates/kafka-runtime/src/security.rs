//! The security settings of every Kafka client (`security.protocol`, SASL, the CA bundle),
//! validated the same way for the hub and the services: a contradictory setting, or one this
//! build's librdkafka cannot honour, is refused at start with one line naming the setting.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use rdkafka::ClientConfig;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `KAFKA_SECURITY_PROTOCOL`: librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL authentication without TLS.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The name librdkafka (and the setting) uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// Authenticates with SASL.
    pub fn is_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    /// Uses TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

impl FromStr for SecurityProtocol {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            SecurityProtocol::Plaintext,
            SecurityProtocol::Ssl,
            SecurityProtocol::SaslPlaintext,
            SecurityProtocol::SaslSsl,
        ]
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
        .ok_or("must be plaintext, ssl, sasl_plaintext or sasl_ssl")
    }
}

/// `KAFKA_SASL_MECHANISM`: librdkafka's `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// User name and password sent as they are (use TLS outside a trusted network).
    Plain,
    /// SCRAM with SHA-256.
    ScramSha256,
    /// SCRAM with SHA-512.
    ScramSha512,
}

impl SaslMechanism {
    /// The name librdkafka (and the setting) uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    /// Needs librdkafka's `sasl_scram` feature.
    pub fn is_scram(self) -> bool {
        !matches!(self, SaslMechanism::Plain)
    }
}

impl FromStr for SaslMechanism {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            SaslMechanism::Plain,
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
        ]
        .into_iter()
        .find(|m| m.as_str().eq_ignore_ascii_case(s.trim()))
        .ok_or("must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    }
}

/// Both enums are read and written as the names librdkafka uses (any ASCII case accepted).
macro_rules! serde_by_name {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_by_name!(SecurityProtocol);
serde_by_name!(SaslMechanism);

/// The security settings of every client of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// `sasl.mechanism` (with a `sasl_*` protocol; `PLAIN` when unset).
    pub mechanism: Option<SaslMechanism>,
    /// SASL user name.
    pub username: Option<String>,
    /// SASL password. Never logged.
    pub password: Option<String>,
    /// PEM CA bundle that signs the brokers' certificates (`ssl.ca.location`).
    pub ca_file: Option<PathBuf>,
}

/// Which security setting is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecuritySetting {
    /// `KAFKA_SECURITY_PROTOCOL`.
    Protocol,
    /// `KAFKA_SASL_MECHANISM`.
    Mechanism,
    /// `KAFKA_SASL_USERNAME`.
    Username,
    /// `KAFKA_SASL_PASSWORD`.
    Password,
    /// `KAFKA_SSL_CA_FILE`.
    CaFile,
}

impl SecuritySetting {
    /// The settings key (`kafka_sasl_username`); the variable is its upper case after the
    /// process's prefix.
    pub fn key(self) -> &'static str {
        match self {
            SecuritySetting::Protocol => "kafka_security_protocol",
            SecuritySetting::Mechanism => "kafka_sasl_mechanism",
            SecuritySetting::Username => "kafka_sasl_username",
            SecuritySetting::Password => "kafka_sasl_password",
            SecuritySetting::CaFile => "kafka_ssl_ca_file",
        }
    }

    /// The environment variable under `prefix` (`HUB_`, `PAYMENT_`, ...).
    pub fn variable(self, prefix: &str) -> String {
        format!("{prefix}{}", self.key().to_ascii_uppercase())
    }
}

/// A security setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}")]
pub struct SecurityError {
    /// The setting at fault.
    pub setting: SecuritySetting,
    /// What is wrong with it (naming other settings with the process's prefix).
    pub problem: String,
}

/// The features this build's librdkafka has (`ssl`, `sasl_plain`, `sasl_scram`, ...).
pub fn builtin_features() -> Vec<String> {
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .map(|f| f.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_default()
}

impl Security {
    /// The SASL mechanism (`PLAIN` unless set).
    pub fn sasl_mechanism(&self) -> SaslMechanism {
        self.mechanism.unwrap_or(SaslMechanism::Plain)
    }

    /// Refuses contradictory settings and ones this build's librdkafka cannot honour;
    /// `prefix` is the process's variable prefix, used to name the other settings.
    pub fn validate(&self, prefix: &str) -> Result<(), SecurityError> {
        self.validate_with(prefix, &builtin_features())
    }

    /// [`Security::validate`] against the given librdkafka features.
    pub fn validate_with(&self, prefix: &str, features: &[String]) -> Result<(), SecurityError> {
        let fail = |setting, problem: String| Err(SecurityError { setting, problem });
        let protocol = self.protocol.as_str();
        let var = |s: SecuritySetting| s.variable(prefix);
        if !self.protocol.is_sasl() {
            for (setting, set) in [
                (SecuritySetting::Mechanism, self.mechanism.is_some()),
                (SecuritySetting::Username, self.username.is_some()),
                (SecuritySetting::Password, self.password.is_some()),
            ] {
                if set {
                    let needs = var(SecuritySetting::Protocol);
                    return fail(
                        setting,
                        format!("needs {needs} sasl_plaintext or sasl_ssl (it is {protocol})"),
                    );
                }
            }
        } else if self.username.is_none() {
            return fail(
                SecuritySetting::Username,
                format!("missing (required with {protocol})"),
            );
        } else if self.password.is_none() {
            let with = var(SecuritySetting::Username);
            return fail(
                SecuritySetting::Password,
                format!("missing (required with {with})"),
            );
        }
        if let Some(ca) = &self.ca_file {
            if !self.protocol.is_tls() {
                let needs = var(SecuritySetting::Protocol);
                return fail(
                    SecuritySetting::CaFile,
                    format!("needs {needs} ssl or sasl_ssl (it is {protocol})"),
                );
            }
            if !ca.is_file() {
                let problem = format!("{} is not a readable file", ca.display());
                return fail(SecuritySetting::CaFile, problem);
            }
        }
        let has = |f: &str| features.iter().any(|x| x == f);
        let no_ssl = "needs librdkafka with SSL, and this build has none (the rdkafka crate's `ssl` feature)";
        if self.protocol.is_tls() && !has("ssl") {
            return fail(SecuritySetting::Protocol, format!("{protocol} {no_ssl}"));
        }
        let mechanism = self.sasl_mechanism();
        if self.protocol.is_sasl() && mechanism.is_scram() && !has("sasl_scram") {
            let name = mechanism.as_str();
            return fail(SecuritySetting::Mechanism, format!("{name} {no_ssl}"));
        }
        Ok(())
    }

    /// A client config with the bootstrap servers and these settings.
    pub fn client_config(&self, brokers: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("security.protocol", self.protocol.as_str());
        if self.protocol.is_sasl() {
            // librdkafka's own default is GSSAPI (Kerberos); PLAIN is what a user name and
            // password mean everywhere else.
            config.set("sasl.mechanism", self.sasl_mechanism().as_str());
            if let Some(user) = &self.username {
                config.set("sasl.username", user);
            }
            if let Some(password) = &self.password {
                config.set("sasl.password", password);
            }
        }
        if let Some(ca) = &self.ca_file {
            config.set("ssl.ca.location", ca.display().to_string());
        }
        config
    }
}

impl fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl(user: Option<&str>, password: Option<&str>) -> Security {
        Security {
            protocol: SecurityProtocol::SaslPlaintext,
            username: user.map(str::to_owned),
            password: password.map(str::to_owned),
            ..Security::default()
        }
    }

    fn refused(security: &Security, features: &[&str]) -> (String, String) {
        let features: Vec<String> = features.iter().map(|f| (*f).to_owned()).collect();
        let e = security
            .validate_with("PAYMENT_", &features)
            .expect_err("refused");
        (e.setting.variable("PAYMENT_"), e.problem)
    }

    #[test]
    fn names_are_read_in_any_case() {
        assert_eq!("SASL_SSL".parse(), Ok(SecurityProtocol::SaslSsl));
        assert_eq!("scram-sha-512".parse(), Ok(SaslMechanism::ScramSha512));
        assert_eq!(
            "tls".parse::<SecurityProtocol>(),
            Err("must be plaintext, ssl, sasl_plaintext or sasl_ssl")
        );
    }

    #[test]
    fn contradictions_name_the_setting_at_fault() {
        let mechanism_alone = Security {
            mechanism: Some(SaslMechanism::Plain),
            ..Security::default()
        };
        let ca_alone = Security {
            ca_file: Some(PathBuf::from("/etc/hostname")),
            ..Security::default()
        };
        let cases = [
            (
                mechanism_alone,
                "PAYMENT_KAFKA_SASL_MECHANISM",
                "needs PAYMENT_KAFKA_SECURITY_PROTOCOL sasl_plaintext or sasl_ssl (it is plaintext)",
            ),
            (
                sasl(None, None),
                "PAYMENT_KAFKA_SASL_USERNAME",
                "missing (required with sasl_plaintext)",
            ),
            (
                sasl(Some("hub"), None),
                "PAYMENT_KAFKA_SASL_PASSWORD",
                "missing (required with PAYMENT_KAFKA_SASL_USERNAME)",
            ),
            (
                ca_alone,
                "PAYMENT_KAFKA_SSL_CA_FILE",
                "needs PAYMENT_KAFKA_SECURITY_PROTOCOL ssl or sasl_ssl (it is plaintext)",
            ),
        ];
        for (security, setting, problem) in cases {
            assert_eq!(
                refused(&security, &["ssl", "sasl_scram"]),
                (setting.to_owned(), problem.to_owned())
            );
        }
    }

    #[test]
    fn features_this_build_lacks_are_refused() {
        let tls = Security {
            protocol: SecurityProtocol::Ssl,
            ..Security::default()
        };
        let (setting, problem) = refused(&tls, &["sasl_plain"]);
        assert_eq!(setting, "PAYMENT_KAFKA_SECURITY_PROTOCOL");
        assert!(
            problem.starts_with("ssl needs librdkafka with SSL"),
            "{problem}"
        );
        let scram = Security {
            mechanism: Some(SaslMechanism::ScramSha256),
            ..sasl(Some("hub"), Some("secret"))
        };
        let (setting, _) = refused(&scram, &["sasl_plain"]);
        assert_eq!(setting, "PAYMENT_KAFKA_SASL_MECHANISM");
        assert!(
            scram
                .validate_with("P_", &["sasl_scram".to_owned()])
                .is_ok()
        );
    }

    #[test]
    fn this_build_speaks_tls_and_scram() {
        // Every protocol and mechanism the settings accept is honoured by the linked
        // librdkafka (built with OpenSSL), so none of them is refused at start.
        let features = builtin_features();
        for needed in ["ssl", "sasl_plain", "sasl_scram"] {
            assert!(
                features.iter().any(|f| f == needed),
                "librdkafka lacks {needed}: {features:?}"
            );
        }
        let scram_tls = Security {
            protocol: SecurityProtocol::SaslSsl,
            mechanism: Some(SaslMechanism::ScramSha512),
            ..sasl(Some("hub"), Some("secret"))
        };
        assert_eq!(scram_tls.validate("HUB_"), Ok(()));
    }

    #[test]
    fn sasl_defaults_to_plain_in_the_client_config() {
        let security = sasl(Some("services"), Some("secret"));
        assert!(security.validate_with("HUB_", &[]).is_ok());
        let config = security.client_config("127.0.0.1:9094");
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:9094"));
        assert_eq!(config.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(config.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(config.get("sasl.username"), Some("services"));
        let plain = Security::default().client_config("k:9092");
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.mechanism"), None);
    }
}
