//! The one Kafka consumer runtime of the workspace: the hub's ingest and every producer service
//! consume through it, each supplying only a [`Handler`] (decode, route, act).
//!
//! What it guarantees to every consumer:
//!
//! - **Order:** one worker task per partition handles that partition's records in order;
//!   partitions proceed in parallel. A worker takes what is ready, up to
//!   [`ConsumerSettings::max_batch`] records, and hands them to the handler together.
//! - **At least once:** offsets are stored by hand only after a whole batch is done (handled,
//!   or in the DLQ), committed every [`ConsumerSettings::commit_interval`], on revoke and once
//!   more when the consumer drains at shutdown.
//! - **Failures:** a transient failure ([`Outcome::Retry`]) hands the same records again with
//!   backoff (`service_kit::Backoff`), never skipping one; a poison record ([`Outcome::Dlq`],
//!   an unsupported `content-type`, or a handler panic) goes to `<topic>.dlq` with the headers
//!   of [`dlq`] and the partition moves on.
//!
//! # Layout
//!
//! - [`security`]: the Kafka client's security settings, their validation and the client config.
//! - [`context`]: the client context (error logging, refused credentials or certificates, lag
//!   statistics).
//! - [`record`]: a consumed record as a handler sees it, and the content-type decision.
//! - [`dlq`]: the DLQ header scheme and writer.
//! - [`consumer`]: the subscription, the partition workers, offset storing and the drain.

pub mod consumer;
pub mod context;
pub mod dlq;
mod pause;
pub mod record;
pub mod security;

pub use consumer::{Consumer, ConsumerError, ConsumerSettings, Handler, Outcome};
pub use context::{AuthFailure, KafkaContext, Observer, Refusal};
pub use record::Record;
pub use security::{SaslMechanism, Security, SecurityError, SecurityProtocol, SecuritySetting};

/// The producer a consumer writes its DLQ records with (and the services their outbox).
pub type Producer = rdkafka::producer::FutureProducer<KafkaContext>;
