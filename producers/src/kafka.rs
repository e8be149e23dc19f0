//! What every Kafka client of a service shares: the bootstrap servers and the security settings
//! (validated by [`crate::config`] with the workspace's rules), and the runtime's client context,
//! which notices a refused authentication or an untrusted broker certificate. Neither a wrong
//! password nor a wrong CA heals by retrying, so it is reported once, clearly, and stops the
//! service (see [`crate::service`]) instead of leaving it retrying in silence.

use rdkafka::ClientConfig;

use crate::config::Settings;

pub use kafka_runtime::{AuthFailure, KafkaContext, Producer};

/// A client config with the bootstrap servers and the security settings.
pub fn client_config(settings: &Settings) -> ClientConfig {
    settings
        .kafka_security()
        .client_config(settings.kafka_brokers())
}
