//! In-process backplane: one node's history and routing, the embedded default.
//!
//! Each user's history is a bounded ring of rendered notifications with a random epoch, so a
//! resume against a restarted node (or an expired history) is detected as a gap. Publishing
//! appends and hands the notification to the sink under the user's shard lock, so ids and local
//! delivery order always agree.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use tokio::time::Instant;

use super::{
    Backplane, BackplaneError, ChannelPresence, Dedupe, Publish, Published, Replay, Revocation,
    Revocations, Sink, contiguous,
};
use crate::envelope::{Id, Notification, now_micros};
use crate::sharded::ShardedMap;

/// Cheap-to-clone handle on the in-process history.
#[derive(Clone)]
pub struct MemoryBackplane {
    shared: Arc<Shared>,
}

struct Shared {
    /// Sharded by user; a shard lock covers append + hand-off to the sink (which only does
    /// non-blocking queue pushes), never an `.await`.
    users: ShardedMap<String, History>,
    sink: Arc<dyn Sink>,
    size: usize,
    ttl: Duration,
    idempotency_cap: usize,
    idempotency_ttl: Duration,
    event_window: usize,
    revocations: Revocations,
}

struct History {
    epoch: u64,
    last_seq: u64,
    items: VecDeque<Arc<Notification>>,
    touched: Instant,
    idempotency: HashMap<String, (Id, Instant)>,
    /// Keys in insertion order, to expire and cap them without scanning the map.
    idempotency_order: VecDeque<(Instant, String)>,
    /// The user's last ingested events (route + event id), at most the dedupe window.
    events: HashMap<String, Id>,
    events_order: VecDeque<String>,
}

impl History {
    fn new(now: Instant) -> Self {
        History {
            // A fresh random epoch per incarnation: a resume id from an earlier one never
            // matches, even across process restarts.
            epoch: (rand::random::<u64>() >> 16).max(1),
            last_seq: 0,
            items: VecDeque::new(),
            touched: now,
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            events: HashMap::new(),
            events_order: VecDeque::new(),
        }
    }

    fn seen(&self, dedupe: &Dedupe) -> Option<Id> {
        match dedupe {
            Dedupe::Key(key) => self.idempotency.get(key).map(|(id, _)| *id),
            Dedupe::Event(event) => self.events.get(event).copied(),
        }
    }

    fn remember(&mut self, dedupe: Dedupe, id: Id, now: Instant, window: usize) {
        match dedupe {
            Dedupe::Key(key) => {
                self.idempotency.insert(key.clone(), (id, now));
                self.idempotency_order.push_back((now, key));
            }
            Dedupe::Event(event) => {
                self.events.insert(event.clone(), id);
                self.events_order.push_back(event);
                while self.events_order.len() > window {
                    if let Some(old) = self.events_order.pop_front() {
                        self.events.remove(&old);
                    }
                }
            }
        }
    }

    fn expire_keys(&mut self, now: Instant, ttl: Duration, cap: usize) {
        while let Some((at, key)) = self.idempotency_order.front() {
            if now.duration_since(*at) < ttl && self.idempotency_order.len() <= cap {
                break;
            }
            self.idempotency.remove(key);
            self.idempotency_order.pop_front();
        }
    }
}

impl MemoryBackplane {
    /// A backplane keeping `size` notifications per user for `ttl` after the last one.
    pub fn new(sink: Arc<dyn Sink>, size: usize, ttl: Duration) -> Self {
        MemoryBackplane {
            shared: Arc::new(Shared {
                users: ShardedMap::new(),
                sink,
                size,
                ttl,
                idempotency_cap: (size * 4).max(1024),
                idempotency_ttl: Duration::from_secs(600),
                event_window: 96,
                revocations: Revocations::default(),
            }),
        }
    }

    /// Sets how long API idempotency keys are remembered and how many recent ingested
    /// events per user are (before the handle is shared).
    pub fn with_dedupe(mut self, idempotency_ttl: Duration, event_window: usize) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.idempotency_ttl = idempotency_ttl;
            shared.event_window = event_window.max(1);
        }
        self
    }

    /// Drops histories idle for longer than the TTL; call periodically.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let ttl = self.shared.ttl;
        let mut removed = 0;
        for shard in self.shared.users.shards() {
            let mut shard = shard.lock();
            shard.retain(|_, h| {
                let keep = now.duration_since(h.touched) < ttl;
                removed += usize::from(!keep);
                keep
            });
        }
        removed
    }

    /// Runs [`MemoryBackplane::sweep`] in the background for as long as the handle lives.
    pub fn spawn_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.shared);
        let every = (self.shared.ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                MemoryBackplane { shared }.sweep();
            }
        })
    }
}

#[async_trait]
impl Backplane for MemoryBackplane {
    async fn publish(&self, msg: Publish) -> Result<Published, BackplaneError> {
        let now = Instant::now();
        let shared = &self.shared;
        let mut shard = self.shared.users.lock(msg.user.as_str());
        let expired = shard
            .get(&msg.user)
            .is_some_and(|h| now.duration_since(h.touched) >= shared.ttl);
        if expired {
            shard.remove(&msg.user);
        }
        let history = shard
            .entry(msg.user.clone())
            .or_insert_with(|| History::new(now));
        history.expire_keys(now, shared.idempotency_ttl, shared.idempotency_cap);
        if let Some(id) = msg.dedupe.as_ref().and_then(|d| history.seen(d)) {
            return Ok(Published {
                id,
                duplicate: true,
            });
        }
        history.last_seq += 1;
        let id = Id {
            epoch: history.epoch,
            seq: history.last_seq,
        };
        let n = Arc::new(Notification::render(
            &msg.user,
            id,
            &msg.kind,
            &msg.data,
            now_micros(),
        ));
        history.items.push_back(n.clone());
        while history.items.len() > shared.size {
            history.items.pop_front();
        }
        history.touched = now;
        if let Some(dedupe) = msg.dedupe {
            history.remember(dedupe, id, now, shared.event_window);
        }
        shared.sink.deliver(&msg.user, &n);
        Ok(Published {
            id,
            duplicate: false,
        })
    }

    async fn subscribe(&self, _stream: &Arc<str>, _user: &Arc<str>) -> Result<(), BackplaneError> {
        // Every publish on this node reaches the sink; there is nothing to route.
        Ok(())
    }

    fn unsubscribe(&self, _stream: &str, _user: &Arc<str>) {}

    async fn history_after(&self, user: &str, after: Id) -> Result<Replay, BackplaneError> {
        let now = Instant::now();
        let shard = self.shared.users.lock(user);
        let Some(history) = shard
            .get(user)
            .filter(|h| now.duration_since(h.touched) < self.shared.ttl)
        else {
            return Ok(Replay {
                gap: after != Id::START,
                items: Vec::new(),
            });
        };
        let first_seq = history
            .items
            .front()
            .map_or(history.last_seq + 1, |n| n.id.seq);
        if !contiguous(after, history.epoch, first_seq, history.last_seq) {
            return Ok(Replay {
                gap: true,
                items: history.items.iter().cloned().collect(),
            });
        }
        Ok(Replay {
            gap: false,
            items: history
                .items
                .iter()
                .filter(|n| n.id.seq > after.seq)
                .cloned()
                .collect(),
        })
    }

    async fn head(&self, stream: &str) -> Result<Option<Id>, BackplaneError> {
        // A publish hands its notification to the sink under the same lock: whatever the
        // head is, the sink has it.
        let now = Instant::now();
        let shard = self.shared.users.lock(stream);
        Ok(shard
            .get(stream)
            .filter(|h| now.duration_since(h.touched) < self.shared.ttl && h.last_seq > 0)
            .map(|h| Id {
                epoch: h.epoch,
                seq: h.last_seq,
            }))
    }

    async fn channel_presence(&self, stream: &str) -> Result<ChannelPresence, BackplaneError> {
        let members = self.shared.sink.channel_members(stream);
        Ok(ChannelPresence::from_counts(
            members.iter().map(|(u, n)| (&**u, *n)),
        ))
    }

    async fn ready(&self) -> bool {
        true
    }

    async fn disconnect(
        &self,
        user: &str,
        revoke: Option<Revocation>,
    ) -> Result<usize, BackplaneError> {
        if let Some(r) = revoke {
            self.shared.revocations.insert(user, r);
        }
        Ok(self.shared.sink.disconnect(user))
    }

    async fn presence(&self, user: &str) -> Result<usize, BackplaneError> {
        Ok(self.shared.sink.connections(user))
    }

    fn revoked_before(&self, user: &str) -> Option<u64> {
        self.shared.revocations.before(user)
    }
}
