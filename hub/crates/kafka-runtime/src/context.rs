//! The client context of every Kafka client of a process: librdkafka's errors go to `tracing`,
//! a refusal of the credentials or of the brokers' certificate is recorded once (neither heals
//! by retrying, so the process can report it and stop), consumer lag goes to an [`Observer`],
//! and a consumer commits what it has stored before its partitions move.

use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use tokio::sync::watch;

/// Hooks through which each consumer keeps its own metrics (nothing by default).
pub trait Observer: Send + Sync + 'static {
    /// The consumer group's lag on a partition (from librdkafka's statistics).
    fn lag(&self, _topic: &str, _partition: i32, _lag: i64) {}
    /// A record of `topic` was written to its DLQ.
    fn dlq(&self, _topic: &str) {}
    /// Records of `topic` are handed to the handler again after a transient failure.
    fn retry(&self, _topic: &str) {}
}

/// An observer that counts nothing.
pub struct Unobserved;

impl Observer for Unobserved {}

/// A failure of the secured connection to the brokers that retrying cannot mend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// SASL: the brokers refused the user name, password or mechanism.
    Credentials(String),
    /// TLS: the brokers' certificate could not be verified with the trusted CAs (or does not
    /// name the address connected to).
    Certificate(String),
}

impl Refusal {
    /// librdkafka's words.
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Credentials(r) | Refusal::Certificate(r) => r,
        }
    }

    /// A short phrase for a readiness answer.
    pub fn summary(&self) -> &'static str {
        match self {
            Refusal::Credentials(_) => "kafka refused our credentials",
            Refusal::Certificate(_) => "kafka's certificate is not trusted",
        }
    }

    /// One line naming the settings to check, with the process's variable prefix (`HUB_`,
    /// `PAYMENT_`) and the SASL user when there is one.
    pub fn explain(&self, prefix: &str, user: Option<&str>) -> String {
        let reason = self.reason();
        match self {
            Refusal::Credentials(_) => {
                let user = user.map(|u| format!(" as {u:?}")).unwrap_or_default();
                format!(
                    "kafka: the brokers refused authentication{user} (check {prefix}KAFKA_SASL_USERNAME, {prefix}KAFKA_SASL_PASSWORD, {prefix}KAFKA_SASL_MECHANISM, {prefix}KAFKA_SECURITY_PROTOCOL): {reason}"
                )
            }
            Refusal::Certificate(_) => format!(
                "kafka: the brokers' certificate is not trusted (check {prefix}KAFKA_SSL_CA_FILE, and that {prefix}KAFKA_BROKERS names the hosts the certificate is for): {reason}"
            ),
        }
    }

    /// The refusal an error of a client stands for, if any.
    fn of(error: &KafkaError, reason: &str) -> Option<Refusal> {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                Some(Refusal::Credentials(reason.to_owned()))
            }
            // Other TLS errors (a handshake cut short by a restarting broker) heal.
            Some(RDKafkaErrorCode::SSL) if reason.contains("certificate verify failed") => {
                Some(Refusal::Certificate(reason.to_owned()))
            }
            _ => None,
        }
    }
}

/// Why the brokers' security refused this process, once it has.
#[derive(Clone)]
pub struct AuthFailure {
    rx: watch::Receiver<Option<Refusal>>,
}

impl AuthFailure {
    /// The refusal, when there has been one.
    pub fn get(&self) -> Option<Refusal> {
        self.rx.borrow().clone()
    }

    /// Completes with the refusal once there is one.
    pub async fn wait(mut self) -> Refusal {
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

/// The context of every producer and consumer of one process.
#[derive(Clone)]
pub struct KafkaContext {
    auth: Arc<watch::Sender<Option<Refusal>>>,
    observer: Arc<dyn Observer>,
}

impl KafkaContext {
    /// A context and the handle that reports its authentication failure.
    pub fn new() -> (Self, AuthFailure) {
        let (tx, rx) = watch::channel(None);
        let context = KafkaContext {
            auth: Arc::new(tx),
            observer: Arc::new(Unobserved),
        };
        (context, AuthFailure { rx })
    }

    /// The same context (sharing its authentication failure), reporting lag to `observer`.
    pub fn observed(&self, observer: Arc<dyn Observer>) -> Self {
        KafkaContext {
            auth: self.auth.clone(),
            observer,
        }
    }
}

/// A subscribed topic that does not exist yet: expected (a route's topic on a cluster that
/// does not carry it), retried by the client, so not worth shouting about.
pub(crate) fn is_missing_topic(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
}

impl ClientContext for KafkaContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(refusal) = Refusal::of(&error, reason) {
            tracing::error!(%reason, "{}", refusal.summary());
            self.auth.send_if_modified(|current| {
                let first = current.is_none();
                if first {
                    *current = Some(refusal);
                }
                first
            });
        } else if is_missing_topic(&error) {
            tracing::debug!(%reason, "kafka: subscribed topic not available yet");
        } else {
            tracing::warn!(error = %error, %reason, "kafka: client error");
        }
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for p in t.partitions.values() {
                if p.partition >= 0 && p.consumer_lag >= 0 {
                    self.observer.lag(topic, p.partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Hand over what is done before the partitions move to another member. Never a
        // synchronous commit here: when the assignment was lost (the group session timed out
        // while the brokers were away) it waits on the group this callback holds up, and the
        // consumer never rejoins. The consumers are idempotent, so a commit that loses the race
        // costs a duplicate they skip, never a loss.
        if let Rebalance::Revoke(_) = rebalance
            && let Err(e) = consumer.commit_consumer_state(CommitMode::Async)
        {
            tracing::debug!(error = %e, "kafka: commit on revoke");
        }
    }
}
