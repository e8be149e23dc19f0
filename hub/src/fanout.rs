//! The node-local registry user → connections, and delivery into bounded per-connection queues.
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
    /// Sharded so that deliveries to different users rarely contend. A shard lock is held only
    /// for map updates and non-blocking `try_send`s, never across an `.await`.
    users: ShardedMap<Arc<str>, Vec<Slot>>,
    /// Holds one token per registered connection, so a drain can wait for the last to close.
    tracker: TaskTracker,
    next_id: AtomicU64,
    open: AtomicUsize,
    limits: Limits,
}

struct Slot {
    id: u64,
    tx: mpsc::Sender<Arc<Notification>>,
    eviction: Arc<Eviction>,
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
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.fanout.unregister(&self.user, self.id);
    }
}

impl Fanout {
    /// An empty registry.
    pub fn new(limits: Limits) -> Self {
        Fanout {
            shared: Arc::new(Shared {
                users: ShardedMap::new(),
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
        slots.push(Slot {
            id,
            tx,
            eviction: eviction.clone(),
        });
        drop(shard);
        Ok((
            Registration {
                fanout: self.clone(),
                user,
                id,
                eviction,
                _open: self.shared.tracker.token(),
            },
            rx,
        ))
    }

    fn unregister(&self, user: &str, id: u64) {
        self.shared.open.fetch_sub(1, Ordering::AcqRel);
        let mut shard = self.shared.users.lock(user);
        if let Some(slots) = shard.get_mut(user) {
            slots.retain(|s| s.id != id);
            if slots.is_empty() {
                shard.remove(user);
            }
        }
    }

    /// Queues `n` for every local connection of `user`, dropping the ones that are full.
    pub fn deliver(&self, user: &str, n: &Arc<Notification>) -> Delivered {
        let mut out = Delivered::default();
        let mut shard = self.shared.users.lock(user);
        let Some(slots) = shard.get_mut(user) else {
            return out;
        };
        // Most deliveries remove nothing: only a failed send makes the slots be rewritten.
        let mut failed = false;
        for slot in slots.iter() {
            match slot.tx.try_send(n.clone()) {
                Ok(()) => out.queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    out.slow += 1;
                    slot.eviction.token.cancel();
                    failed = true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => failed = true,
            }
        }
        if failed {
            slots.retain(|slot| !slot.eviction.token.is_cancelled() && !slot.tx.is_closed());
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
        }
    }

    fn note(seq: u64) -> Arc<Notification> {
        let data = RawValue::from_string("{}".to_owned()).unwrap();
        Arc::new(Notification::render(Id { epoch: 1, seq }, "t", &data, 0))
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
