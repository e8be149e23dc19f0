//! The node-local registry stream → connections, and delivery into bounded per-connection
//! queues. A connection is registered under its user's personal stream and joins the stream
//! of each channel it follows: one queue, several entries.
//!
//! Delivery never blocks and never allocates per connection: a notification is an
//! `Arc<Notification>` whose bytes were rendered once, and each connection's queue receives a
//! pointer to it. A queue that is full means the client is not keeping up; its slot is removed,
//! which closes the queue, and the connection's task ends it as a slow consumer. The client then
//! resumes from history, so the node never buffers more than `send_queue` notifications per
//! connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

use crate::envelope::Notification;
use crate::sharded::ShardedMap;

/// The receiving end of one connection's queue.
pub type Queue = mpsc::Receiver<Arc<Notification>>;

/// Cheap-to-clone handle on the registry.
#[derive(Clone)]
pub struct Fanout {
    shared: Arc<Shared>,
}

struct Shared {
    /// Sharded so that deliveries to different streams rarely contend. A shard lock is held
    /// only for map updates and non-blocking `try_send`s, never across an `.await`.
    users: ShardedMap<Arc<str>, Vec<Slot>>,
    /// Channels (streams) with at least one local subscriber, and subscriptions in all
    /// (`hub_channels`, `hub_channel_subscriptions` when the node exports them).
    channels: prometheus::IntGauge,
    subscriptions: prometheus::IntGauge,
    /// Holds one token per registered connection, so a drain can wait for the last to close.
    tracker: TaskTracker,
    next_id: AtomicU64,
    open: AtomicUsize,
    limits: Limits,
}

struct Slot {
    id: u64,
    tx: Tx,
    eviction: Arc<Eviction>,
    /// The connection's user (channel presence lists the users of a channel's slots).
    user: Arc<str>,
}

/// A slot's end of its connection's queue. Only the personal slot holds the queue open: when
/// the node drops it (slow consumer, disconnect API) the queue closes, which is how the
/// session learns it, whatever channels the connection follows.
enum Tx {
    /// The personal stream's slot.
    Strong(mpsc::Sender<Arc<Notification>>),
    /// A channel's slot.
    Weak(mpsc::WeakSender<Arc<Notification>>),
}

impl Tx {
    fn try_send(
        &self,
        n: Arc<Notification>,
    ) -> Result<(), mpsc::error::TrySendError<Arc<Notification>>> {
        match self {
            Tx::Strong(tx) => tx.try_send(n),
            Tx::Weak(weak) => match weak.upgrade() {
                Some(tx) => tx.try_send(n),
                None => Err(mpsc::error::TrySendError::Closed(n)),
            },
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Tx::Strong(tx) => tx.is_closed(),
            Tx::Weak(weak) => weak.strong_count() == 0,
        }
    }
}

/// Why and when a connection was removed from the registry by the node.
#[derive(Default)]
struct Eviction {
    /// Cancelled when the slot is dropped (queue full, or the disconnect API), so a
    /// connection blocked in a socket write learns it at once instead of at its write timeout.
    token: CancellationToken,
    /// Set before the token is cancelled when the disconnect API removed the connection.
    by_api: AtomicBool,
}

/// Capacity settings of the registry.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections on this node.
    pub max_connections: usize,
    /// Connections of one user on this node.
    pub max_per_user: usize,
    /// Notifications queued per connection.
    pub queue: usize,
    /// Connections subscribed to one channel on this node.
    pub max_channel_subscribers: usize,
}

/// Why a connection could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The user already has the maximum number of connections here.
    #[error("too many connections for this user")]
    UserLimit,
    /// The node holds the maximum number of connections.
    #[error("node at connection capacity")]
    NodeLimit,
}

/// Why a connection could not join a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The channel has the maximum number of subscribers on this node.
    #[error("channel at its subscriber limit on this node")]
    ChannelFull,
}

/// What one delivery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Connections whose queue took the notification.
    pub queued: usize,
    /// Connections dropped because their queue was full.
    pub slow: usize,
}

/// A registered connection; dropping it removes the connection from the registry.
pub struct Registration {
    fanout: Fanout,
    user: Arc<str>,
    id: u64,
    eviction: Arc<Eviction>,
    tx: mpsc::WeakSender<Arc<Notification>>,
    /// The channel streams this connection joined.
    joined: Vec<Arc<str>>,
    /// Counts this connection in [`Fanout::all_closed`] until it is dropped.
    _open: TaskTrackerToken,
}

impl Registration {
    /// The user this connection belongs to.
    pub fn user(&self) -> &Arc<str> {
        &self.user
    }

    /// Resolves when the node dropped the connection (slow consumer or disconnect API).
    pub async fn evicted(&self) {
        self.eviction.token.cancelled().await;
    }

    /// Whether the disconnect API (rather than a full queue) removed the connection.
    pub fn disconnected_by_api(&self) -> bool {
        self.eviction.by_api.load(Ordering::Acquire)
    }

    /// The channel streams this connection joined.
    pub fn joined(&self) -> &[Arc<str>] {
        &self.joined
    }

    /// Makes this connection receive a channel's `stream` as well.
    pub fn join(&mut self, stream: Arc<str>) -> Result<(), JoinError> {
        let shared = &self.fanout.shared;
        let mut shard = shared.users.lock(&*stream);
        let fresh = !shard.contains_key(&*stream);
        let slots = shard.entry(stream.clone()).or_default();
        if slots.len() >= shared.limits.max_channel_subscribers {
            if fresh {
                shard.remove(&stream);
            }
            return Err(JoinError::ChannelFull);
        }
        if fresh {
            shared.channels.inc();
        }
        slots.push(Slot {
            id: self.id,
            tx: Tx::Weak(self.tx.clone()),
            eviction: self.eviction.clone(),
            user: self.user.clone(),
        });
        drop(shard);
        shared.subscriptions.inc();
        self.joined.push(stream);
        Ok(())
    }

    /// Stops this connection receiving a channel's `stream`.
    pub fn leave(&mut self, stream: &str) {
        if let Some(i) = self.joined.iter().position(|s| &**s == stream) {
            self.joined.swap_remove(i);
            self.fanout.remove_slot(stream, self.id, true);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.fanout.unregister(&self.user, self.id);
        for stream in std::mem::take(&mut self.joined) {
            self.fanout.remove_slot(&stream, self.id, true);
        }
    }
}

impl Fanout {
    /// An empty registry.
    pub fn new(limits: Limits) -> Self {
        Fanout {
            shared: Arc::new(Shared {
                users: ShardedMap::new(),
                channels: prometheus::IntGauge::with_opts(prometheus::Opts::new("channels", "-"))
                    .unwrap_or_else(|e| panic!("gauge: {e}")),
                subscriptions: prometheus::IntGauge::with_opts(prometheus::Opts::new(
                    "subscriptions",
                    "-",
                ))
                .unwrap_or_else(|e| panic!("gauge: {e}")),
                tracker: TaskTracker::new(),
                next_id: AtomicU64::new(1),
                open: AtomicUsize::new(0),
                limits,
            }),
        }
    }

    /// Registers a connection of `user`, enforcing the node and per-user caps atomically.
    pub fn register(&self, user: Arc<str>) -> Result<(Registration, Queue), RegisterError> {
        let limits = self.shared.limits;
        let mut shard = self.shared.users.lock(&*user);
        let slots = shard.entry(user.clone()).or_default();
        if slots.len() >= limits.max_per_user {
            if slots.is_empty() {
                shard.remove(&user);
            }
            return Err(RegisterError::UserLimit);
        }
        // Reserve the node-wide slot; give it back if that overshoots the cap.
        if self.shared.open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.shared.open.fetch_sub(1, Ordering::AcqRel);
            if slots.is_empty() {
                shard.remove(&user);
            }
            return Err(RegisterError::NodeLimit);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(limits.queue);
        let eviction = Arc::new(Eviction::default());
        let weak = tx.downgrade();
        slots.push(Slot {
            id,
            tx: Tx::Strong(tx),
            eviction: eviction.clone(),
            user: user.clone(),
        });
        drop(shard);
        Ok((
            Registration {
                fanout: self.clone(),
                user,
                id,
                eviction,
                tx: weak,
                joined: Vec::new(),
                _open: self.shared.tracker.token(),
            },
            rx,
        ))
    }

    fn unregister(&self, user: &str, id: u64) {
        self.shared.open.fetch_sub(1, Ordering::AcqRel);
        self.remove_slot(user, id, false);
    }

    /// Removes connection `id`'s slot from `stream` (a channel's, counted, or a user's).
    fn remove_slot(&self, stream: &str, id: u64, channel: bool) {
        let mut shard = self.shared.users.lock(stream);
        if let Some(slots) = shard.get_mut(stream) {
            slots.retain(|s| s.id != id);
            if slots.is_empty() {
                shard.remove(stream);
                if channel {
                    self.shared.channels.dec();
                }
            }
        }
        if channel {
            self.shared.subscriptions.dec();
        }
    }

    /// Queues `n` for every local connection of `user`, dropping the ones that are full.
    pub fn deliver(&self, stream: &str, n: &Arc<Notification>) -> Delivered {
        let mut out = Delivered::default();
        let mut shard = self.shared.users.lock(stream);
        let Some(slots) = shard.get_mut(stream) else {
            return out;
        };
        // Most deliveries remove nothing: only a failed send makes the slots be rewritten.
        let mut failed = false;
        // Connections found too slow on a channel: their personal slot (which holds their
        // queue open) goes too, once this stream's lock is released.
        let mut slow_elsewhere: Vec<(Arc<str>, u64)> = Vec::new();
        for slot in slots.iter() {
            match slot.tx.try_send(n.clone()) {
                Ok(()) => out.queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    out.slow += 1;
                    slot.eviction.token.cancel();
                    failed = true;
                    if matches!(slot.tx, Tx::Weak(_)) {
                        slow_elsewhere.push((slot.user.clone(), slot.id));
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => failed = true,
            }
        }
        if failed {
            // Only dead slots go; their connections' registrations remove the rest of their
            // entries (and the counts) when they drop. A channel's list is kept even when
            // empty, so its count stays with the registrations.
            slots.retain(|slot| !slot.eviction.token.is_cancelled() && !slot.tx.is_closed());
            if slots.is_empty() && crate::envelope::channel_of(stream).is_none() {
                shard.remove(stream);
            }
        }
        drop(shard);
        for (user, id) in slow_elsewhere {
            self.remove_slot(&user, id, false);
        }
        out
    }

    /// Removes every local connection of `user` and tells each it was disconnected by the
    /// server API; returns how many there were.
    pub fn disconnect(&self, user: &str) -> usize {
        let Some(slots) = self.shared.users.lock(user).remove(user) else {
            return 0;
        };
        for slot in &slots {
            slot.eviction.by_api.store(true, Ordering::Release);
            slot.eviction.token.cancel();
        }
        slots.len()
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Resolves once no connection is registered (for the drain; the node refuses new
    /// connections by then).
    pub async fn all_closed(&self) {
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }

    /// Local connections of one user.
    pub fn user_connections(&self, user: &str) -> usize {
        self.shared.users.lock(user).get(user).map_or(0, Vec::len)
    }

    /// The users of the live local connections subscribed to a channel's `stream`, with how
    /// many connections each.
    pub fn channel_members(&self, stream: &str) -> Vec<(Arc<str>, usize)> {
        let shard = self.shared.users.lock(stream);
        let Some(slots) = shard.get(stream) else {
            return Vec::new();
        };
        let mut counts: std::collections::HashMap<&Arc<str>, usize> =
            std::collections::HashMap::new();
        for slot in slots.iter().filter(|s| !s.eviction.token.is_cancelled()) {
            *counts.entry(&slot.user).or_default() += 1;
        }
        counts.into_iter().map(|(u, n)| (u.clone(), n)).collect()
    }

    /// Channels with at least one local subscriber, and channel subscriptions in all.
    pub fn channel_counts(&self) -> (i64, i64) {
        (self.shared.channels.get(), self.shared.subscriptions.get())
    }

    /// Keeps the channel counts in these gauges (before the handle is shared).
    pub fn with_gauges(
        mut self,
        channels: prometheus::IntGauge,
        subscriptions: prometheus::IntGauge,
    ) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.channels = channels;
            shared.subscriptions = subscriptions;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Id;
    use serde_json::value::RawValue;

    fn limits(per_user: usize, total: usize, queue: usize) -> Limits {
        Limits {
            max_connections: total,
            max_per_user: per_user,
            queue,
            max_channel_subscribers: 2,
        }
    }

    fn note(seq: u64) -> Arc<Notification> {
        let data = RawValue::from_string("{}".to_owned()).unwrap();
        Arc::new(Notification::render(
            "u",
            Id { epoch: 1, seq },
            "t",
            &data,
            0,
        ))
    }

    #[test]
    fn delivers_only_to_the_users_connections() {
        let f = Fanout::new(limits(4, 10, 8));
        let (_a, mut qa) = f.register("a".into()).unwrap();
        let (_b, mut qb) = f.register("b".into()).unwrap();
        assert_eq!(f.deliver("a", &note(1)).queued, 1);
        assert_eq!(qa.try_recv().unwrap().id.seq, 1);
        assert!(qb.try_recv().is_err());
    }

    #[test]
    fn caps_are_enforced_and_released_on_drop() {
        let f = Fanout::new(limits(2, 3, 8));
        let a1 = f.register("a".into()).unwrap();
        let _a2 = f.register("a".into()).unwrap();
        assert_eq!(f.register("a".into()).err(), Some(RegisterError::UserLimit));
        let _b = f.register("b".into()).unwrap();
        assert_eq!(f.register("c".into()).err(), Some(RegisterError::NodeLimit));
        assert_eq!(f.connections(), 3);
        drop(a1);
        assert_eq!(f.connections(), 2);
        assert!(f.register("c".into()).is_ok());
    }

    #[test]
    fn disconnect_removes_every_connection_of_the_user_only() {
        let f = Fanout::new(limits(4, 10, 8));
        let (a1, _q1) = f.register("a".into()).unwrap();
        let (a2, _q2) = f.register("a".into()).unwrap();
        let (b, _qb) = f.register("b".into()).unwrap();
        assert_eq!(f.disconnect("a"), 2);
        assert!(a1.disconnected_by_api() && a2.disconnected_by_api());
        assert!(a1.eviction.token.is_cancelled());
        assert!(!b.disconnected_by_api());
        assert_eq!(f.user_connections("a"), 0);
        assert_eq!(f.disconnect("a"), 0);
        // The open count falls as the connections' registrations are dropped.
        drop((a1, a2));
        assert_eq!(f.connections(), 1);
    }

    fn channel_note(seq: u64) -> Arc<Notification> {
        let data = RawValue::from_string("{}".to_owned()).unwrap();
        Arc::new(Notification::render(
            "{c",
            Id { epoch: 1, seq },
            "t",
            &data,
            0,
        ))
    }

    #[test]
    fn a_channel_reaches_its_subscribers_once_each_and_stops_at_leave() {
        let f = Fanout::new(limits(4, 10, 8));
        let (mut a, mut qa) = f.register("a".into()).unwrap();
        let (mut b, mut qb) = f.register("b".into()).unwrap();
        let (_c, mut qc) = f.register("c".into()).unwrap();
        a.join("{c".into()).unwrap();
        b.join("{c".into()).unwrap();
        assert_eq!(f.channel_counts(), (1, 2));
        assert_eq!(f.deliver("{c", &channel_note(1)).queued, 2);
        assert_eq!(qa.try_recv().unwrap().channel.as_deref(), Some("c"));
        assert_eq!(qb.try_recv().unwrap().id.seq, 1);
        assert!(qc.try_recv().is_err());
        let mut members = f.channel_members("{c");
        members.sort();
        assert_eq!(members, vec![("a".into(), 1), ("b".into(), 1)]);
        b.leave("{c");
        assert_eq!(f.deliver("{c", &channel_note(2)).queued, 1);
        assert!(qb.try_recv().is_err());
        drop(a);
        assert_eq!(f.channel_counts(), (0, 0));
        assert!(f.channel_members("{c").is_empty());
    }

    #[test]
    fn a_channel_takes_at_most_its_subscribers_per_node() {
        let f = Fanout::new(limits(4, 10, 8));
        let mut regs: Vec<Registration> = (0..3)
            .map(|i| f.register(format!("u{i}").into()).unwrap().0)
            .collect();
        regs[0].join("{c".into()).unwrap();
        regs[1].join("{c".into()).unwrap();
        assert_eq!(regs[2].join("{c".into()), Err(JoinError::ChannelFull));
        assert_eq!(f.channel_counts(), (1, 2));
    }

    #[test]
    fn a_connection_too_slow_for_a_channel_is_dropped_and_its_queue_closes() {
        let f = Fanout::new(limits(4, 10, 8));
        let (mut a, mut q) = f.register("a".into()).unwrap();
        a.join("{c".into()).unwrap();
        for seq in 1..=8 {
            assert_eq!(f.deliver("{c", &channel_note(seq)).queued, 1);
        }
        assert_eq!(f.deliver("{c", &channel_note(9)).slow, 1);
        assert!(a.eviction.token.is_cancelled());
        assert_eq!(f.user_connections("a"), 0);
        for seq in 1..=8 {
            assert_eq!(q.try_recv().unwrap().id.seq, seq);
        }
        assert!(matches!(
            q.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn the_disconnect_api_closes_the_queue_of_a_connection_with_channels() {
        let f = Fanout::new(limits(4, 10, 8));
        let (mut a, mut q) = f.register("a".into()).unwrap();
        a.join("{c".into()).unwrap();
        assert_eq!(f.disconnect("a"), 1);
        assert!(matches!(
            q.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert_eq!(f.deliver("{c", &channel_note(1)).queued, 0);
        assert!(f.channel_members("{c").is_empty());
    }

    #[test]
    fn a_full_queue_is_dropped_as_slow_and_closes() {
        let f = Fanout::new(limits(2, 10, 8));
        let (reg, mut q) = f.register("a".into()).unwrap();
        for seq in 1..=8 {
            assert_eq!(f.deliver("a", &note(seq)).queued, 1);
        }
        assert_eq!(f.deliver("a", &note(9)), Delivered { queued: 0, slow: 1 });
        assert_eq!(f.user_connections("a"), 0);
        assert!(reg.eviction.token.is_cancelled());
        assert!(!reg.disconnected_by_api());
        // The queued ones still drain, then the queue reports closed.
        for seq in 1..=8 {
            assert_eq!(q.try_recv().unwrap().id.seq, seq);
        }
        assert!(matches!(
            q.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }
}
