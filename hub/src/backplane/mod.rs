//! The backplane: where a notification is accepted (appended to its stream's history, which
//! assigns its id) and from where it reaches every node holding that stream's connections.
//!
//! A stream is a user's personal one or a channel, named by one string (the user id, or
//! [`crate::envelope::channel_stream`] of the channel): the backplanes store and route both
//! alike.
//!
//! [`Backplane`] is implemented in-process by [`memory::MemoryBackplane`] (one node, the
//! embedded default). A Redis implementation fills the same trait so that nodes share one
//! history and route through pub/sub. Notifications for subscribed users are handed to a
//! [`Sink`]; the node wires its local fan-out registry in as that sink.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::value::RawValue;

use crate::envelope::{Id, Notification};

/// Receives every notification of the streams this node subscribed to, per stream in id order.
pub trait Sink: Send + Sync + 'static {
    /// Called once per notification of `stream`; must not block.
    fn deliver(&self, stream: &str, notification: &Arc<Notification>);

    /// Closes every local connection of `user` (the disconnect API); returns how many.
    fn disconnect(&self, user: &str) -> usize;

    /// How many connections `user` has on this node (a sink without connections, as
    /// ingest alone, has none).
    fn connections(&self, _user: &str) -> usize {
        0
    }

    /// The users subscribed to a channel's `stream` on this node, with their connection
    /// counts.
    fn channel_members(&self, _stream: &str) -> Vec<(Arc<str>, usize)> {
        Vec::new()
    }
}

/// Who is in a channel over every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelPresence {
    /// Users with at least one subscribed connection, sorted, at most [`PRESENCE_LIST`].
    pub users: Vec<String>,
    /// How many users there are in all.
    pub count: usize,
}

/// Most users a channel's presence lists.
pub const PRESENCE_LIST: usize = 1000;

impl ChannelPresence {
    /// Presence from per-user connection counts (a user may appear more than once: the
    /// counts of several nodes).
    pub fn from_counts<'a>(counts: impl IntoIterator<Item = (&'a str, usize)>) -> Self {
        let mut users: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        for (user, n) in counts {
            if n > 0 {
                users.insert(user);
            }
        }
        ChannelPresence {
            count: users.len(),
            users: users
                .into_iter()
                .take(PRESENCE_LIST)
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// Whether a client positioned at `after` missed nothing that is gone from a history of
/// `epoch` whose retained entries run from `first` to `last` (`first` is `last + 1` when
/// none is retained). [`Id::START`] ("before the first") is contiguous while the history
/// still holds its first entry.
pub fn contiguous(after: Id, epoch: u64, first: u64, last: u64) -> bool {
    if after == Id::START {
        return first <= 1;
    }
    after.epoch == epoch && after.seq <= last && after.seq.saturating_add(1) >= first
}

/// A sink that drops everything (unit tests).
#[cfg(test)]
pub(crate) struct NoSink;

#[cfg(test)]
impl Sink for NoSink {
    fn deliver(&self, _: &str, _: &Arc<Notification>) {}
    fn disconnect(&self, _: &str) -> usize {
        0
    }
}

/// A disconnect request: close the user's connections everywhere, and optionally refuse
/// the user's tokens issued before a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revocation {
    /// Tokens with an `iat` earlier than this (unix seconds), or with no `iat`, are refused.
    pub issued_before: u64,
    /// Until when (unix seconds): no token accepted before the request outlives this.
    pub until: u64,
}

/// A notification to accept.
#[derive(Debug, Clone)]
pub struct Publish {
    /// Its stream: the recipient user id, or a channel's stream name
    /// ([`crate::envelope::channel_stream`]).
    pub user: String,
    /// Notification type (never `hub.*`).
    pub kind: String,
    /// Payload, embedded in the envelope unchanged.
    pub data: Box<RawValue>,
    /// What makes a repeat of this notification recognizable, if anything.
    pub dedupe: Option<Dedupe>,
}

/// How a repeated publish is recognized; a repeat returns the first id and publishes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dedupe {
    /// An API idempotency key: recognized for `HUB_IDEMPOTENCY_TTL` after the first publish.
    Key(String),
    /// An ingested event (route name + event id): recognized while the original is among the
    /// user's last `HUB_DEDUPE_WINDOW` ingested events and the user's history lives. Kept
    /// beside the history, so its memory follows the users, not the event count.
    Event(String),
}

impl Dedupe {
    /// The dedupe of an API idempotency key, if one was given.
    pub fn key(key: Option<String>) -> Option<Self> {
        key.map(Dedupe::Key)
    }
}

/// The result of [`Backplane::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The id the notification has in history.
    pub id: Id,
    /// True when the idempotency key had been seen and nothing was published.
    pub duplicate: bool,
}

/// What a resuming connection must be sent before live notifications.
#[derive(Debug, Default)]
pub struct Replay {
    /// The resume point is not in the retained history (too old, or the history was lost or
    /// recreated): the client must be told with `hub.gap` before anything is replayed.
    pub gap: bool,
    /// Retained notifications after the resume point (all retained ones after a gap), in order.
    pub items: Vec<Arc<Notification>>,
}

/// A backplane operation that failed; the caller answers 503 and nothing half-happened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackplaneError {
    /// The backing store cannot be reached or answered with a transient error: retry.
    #[error("backplane unavailable: {0}")]
    Unavailable(String),
    /// The store refused this notification for good (retrying the same one cannot succeed).
    #[error("notification refused: {0}")]
    Rejected(String),
}

/// Accepts, stores and routes notifications.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// Appends to the user's history (assigning the id) and routes to subscribed nodes, as one
    /// atomic step per user so ids and delivery order agree.
    async fn publish(&self, msg: Publish) -> Result<Published, BackplaneError>;

    /// Publishes several notifications at once (one round trip where the store allows),
    /// each as [`Backplane::publish`] would, in order; the results are in the same order.
    /// On an error, some of them may have been published: retrying with the same
    /// idempotency keys is safe.
    async fn publish_batch(&self, msgs: Vec<Publish>) -> Result<Vec<Published>, BackplaneError> {
        let mut out = Vec::with_capacity(msgs.len());
        for msg in msgs {
            out.push(self.publish(msg).await?);
        }
        Ok(out)
    }

    /// Makes this node receive the notifications of `stream` for a connection of `user`;
    /// returns once the subscription is live. Reference-counted: one call per local
    /// connection and stream.
    async fn subscribe(&self, stream: &Arc<str>, user: &Arc<str>) -> Result<(), BackplaneError>;

    /// Releases one [`Backplane::subscribe`]; the last release stops routing to this node.
    fn unsubscribe(&self, stream: &str, user: &Arc<str>);

    /// Retained notifications after `after` (see [`Replay`]).
    async fn history_after(&self, stream: &str, after: Id) -> Result<Replay, BackplaneError>;

    /// The id of the last notification in the stream's history (`None`: it has none). When
    /// this node is subscribed to the stream, it returns once the node has handed every
    /// notification up to that id to its sink, so a connection positioned there has all of
    /// them in its queue.
    async fn head(&self, stream: &str) -> Result<Option<Id>, BackplaneError>;

    /// Who is subscribed to the channel `stream` over every node (this node's exactly, the
    /// others' as they last reported them, a node that stopped reporting counted out).
    async fn channel_presence(&self, stream: &str) -> Result<ChannelPresence, BackplaneError>;

    /// Whether the backing store is reachable (for readiness).
    async fn ready(&self) -> bool;

    /// Closes every connection of `user` on every node and, with `revoke`, records the
    /// revocation where every node sees it; returns how many connections were closed.
    async fn disconnect(
        &self,
        user: &str,
        revoke: Option<Revocation>,
    ) -> Result<usize, BackplaneError>;

    /// The time before which the user's tokens are revoked, if any (a local lookup: every
    /// node holds the revocations in memory).
    fn revoked_before(&self, user: &str) -> Option<u64>;

    /// Whether a token of `user` issued at `iat` is revoked (one without `iat` is, when the
    /// user has a revocation).
    fn revokes(&self, user: &str, iat: Option<u64>) -> bool {
        self.revoked_before(user)
            .is_some_and(|before| iat.is_none_or(|iat| iat < before))
    }

    /// How many connections `user` has over every node (presence): this node's exactly,
    /// the others' as they last reported them (within about a second), a node that stopped
    /// reporting counted out once its heartbeat is older than the presence timeout.
    async fn presence(&self, user: &str) -> Result<usize, BackplaneError>;
}

/// The revocations a node knows of: user → (issued before, until). Locked briefly, never
/// across `.await`.
#[derive(Default)]
pub struct Revocations {
    map: parking_lot::Mutex<std::collections::HashMap<String, Revocation>>,
}

impl Revocations {
    /// Records a revocation, keeping the later cut-off when one exists.
    pub fn insert(&self, user: &str, r: Revocation) {
        let mut map = self.map.lock();
        let entry = map.entry(user.to_owned()).or_insert(r);
        if r.issued_before >= entry.issued_before {
            *entry = Revocation {
                issued_before: r.issued_before,
                until: r.until.max(entry.until),
            };
        }
    }

    /// The cut-off for `user` while it lasts.
    pub fn before(&self, user: &str) -> Option<u64> {
        let mut map = self.map.lock();
        if map.is_empty() {
            return None;
        }
        let now = crate::envelope::now_micros() / 1_000_000;
        match map.get(user) {
            Some(r) if r.until > now => Some(r.issued_before),
            Some(_) => {
                map.remove(user);
                None
            }
            None => None,
        }
    }
}
