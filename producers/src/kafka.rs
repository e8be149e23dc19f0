//! What every Kafka client of a service shares: the bootstrap servers and the security settings
//! (`KAFKA_SECURITY_PROTOCOL`, SASL, CA file), and a client context that notices a refused
//! authentication. A wrong password never heals by retrying, so it is reported once, clearly,
//! and stops the service (see [`crate::service`]) instead of leaving it retrying in silence.

use std::sync::Arc;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;

use crate::config::Settings;

/// The producer every part of a service shares (relay, DLQ writer).
pub type Producer = FutureProducer<Context>;

/// librdkafka's `builtin.features` of this build (e.g. `ssl`, `sasl_plain`, `sasl_scram`).
pub fn builtin_features() -> Vec<String> {
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .map(|f| f.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_default()
}

/// A client config with the bootstrap servers and the security settings.
pub fn client_config(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", settings.kafka_brokers())
        .set(
            "security.protocol",
            settings.kafka_security_protocol.as_str(),
        );
    if settings.kafka_security_protocol.is_sasl() {
        config.set("sasl.mechanism", settings.sasl_mechanism().as_str());
        if let Some(user) = &settings.kafka_sasl_username {
            config.set("sasl.username", user);
        }
        if let Some(password) = &settings.kafka_sasl_password {
            config.set("sasl.password", password);
        }
    }
    if let Some(ca) = &settings.kafka_ssl_ca_file {
        config.set("ssl.ca.location", ca);
    }
    config
}

/// Why the brokers refused this service's credentials, once they have.
#[derive(Clone)]
pub struct AuthFailure {
    rx: watch::Receiver<Option<String>>,
}

impl AuthFailure {
    /// The reason, when the brokers have refused the credentials.
    pub fn get(&self) -> Option<String> {
        self.rx.borrow().clone()
    }

    /// Completes with the reason once the brokers refuse the credentials.
    pub async fn wait(mut self) -> String {
        loop {
            if let Some(reason) = self.rx.borrow_and_update().clone() {
                return reason;
            }
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// The context of every producer and consumer of one service: logs librdkafka's errors with
/// `tracing` and records a refused authentication.
#[derive(Clone)]
pub struct Context {
    auth: Arc<watch::Sender<Option<String>>>,
}

impl Context {
    /// A context and the handle that reports its authentication failure.
    pub fn new() -> (Self, AuthFailure) {
        let (tx, rx) = watch::channel(None);
        (Context { auth: Arc::new(tx) }, AuthFailure { rx })
    }
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
        );
        if refused {
            tracing::error!(%reason, "kafka: the brokers refused our credentials");
            self.auth.send_if_modified(|current| {
                if current.is_none() {
                    *current = Some(reason.to_owned());
                    true
                } else {
                    false
                }
            });
        } else {
            tracing::warn!(error = %error, %reason, "kafka: client error");
        }
    }
}

impl ConsumerContext for Context {}
