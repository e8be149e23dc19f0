//! The streams of a connection that follows channels: which channels, where the connection
//! stands in each stream (the one cursor, [`crate::cursor`]), and joining a channel (at the
//! handshake from the token's `channels` claim, or later by a WebSocket `subscribe`).
//!
//! A connection without channels has none of this (its session carries no [`Streams`]) and
//! keeps sharing every notification's bytes with the other connections. A connection with
//! channels gets each notification with its cursor as the `id`: one small copy per delivery.

use std::sync::Arc;

use super::Context;
use crate::backplane::{Backplane, BackplaneError, Replay};
use crate::cursor;
use crate::envelope::{Id, Notification, channel_stream};
use crate::fanout::{JoinError, Registration};

/// A connection's channels and its position in each of its streams.
pub struct Streams {
    /// Position in the personal stream.
    pub personal: Id,
    /// The channels followed, in the order they were joined.
    pub channels: Vec<Followed>,
    /// Positions the resume cursor held for channels this connection does not follow (yet):
    /// a WebSocket `subscribe` resumes from them, and the cursor keeps carrying them.
    pub pending: Vec<(u32, Id)>,
    /// Each joined channel's replay, written after the personal one at the greeting.
    pub replays: Vec<(Arc<str>, Replay)>,
}

/// One followed channel.
pub struct Followed {
    /// The channel's name.
    pub name: Arc<str>,
    /// Its stream name.
    pub stream: Arc<str>,
    /// Its tag in the cursor.
    pub tag: u32,
    /// The connection's position in it.
    pub at: Id,
}

/// Moves a position past `n` if `n` is new there (the seam filter): within one history
/// epoch ids only grow, a new epoch starts afresh. A gap marker without a position (the
/// history could not be read) leaves the position unknown, so a resume from it is a gap.
pub fn advance(at: &mut Id, n: &Notification) -> bool {
    if n.gap && n.id.epoch == 0 {
        *at = Id::UNKNOWN;
        return true;
    }
    if at.epoch == n.id.epoch && n.id.seq <= at.seq {
        return false;
    }
    *at = n.id;
    true
}

impl Streams {
    /// The connection's cursor: every stream's position, pending ones included.
    pub fn cursor(&self) -> String {
        cursor::write(
            self.personal,
            self.channels
                .iter()
                .map(|c| (c.tag, c.at))
                .chain(self.pending.iter().copied()),
        )
    }

    /// Channels followed, in the cursor's count (followed and pending).
    pub fn count(&self) -> usize {
        self.channels.len() + self.pending.len()
    }

    /// `n` as this connection must see it (its cursor as the id), if the connection follows
    /// its stream and does not have it yet; advances that stream's position.
    pub fn accept(&mut self, n: &Arc<Notification>) -> Option<Arc<Notification>> {
        let at = match &n.channel {
            None => &mut self.personal,
            Some(name) => &mut self.channels.iter_mut().find(|c| c.name == *name)?.at,
        };
        if !advance(at, n) {
            return None;
        }
        if n.gap {
            return Some(n.clone());
        }
        Some(n.with_cursor(self.cursor()))
    }

    /// The followed channel `name`, if any.
    pub fn followed(&self, name: &str) -> Option<&Followed> {
        self.channels.iter().find(|c| &*c.name == name)
    }

    /// Takes the position the resume cursor held for a channel with `tag`.
    pub fn take_pending(&mut self, tag: u32) -> Option<Id> {
        let mut found = None;
        self.pending.retain(|(t, at)| {
            if *t == tag {
                // Two entries with one tag: which is which is unknown.
                found = Some(if found.is_some() { Id::UNKNOWN } else { *at });
                false
            } else {
                true
            }
        });
        found
    }
}

/// Where a connection starts in a stream: from `after` (its resume position: what follows is
/// replayed, or a gap), or, with none, at the stream's head (live from there on).
pub async fn start(
    backplane: &dyn Backplane,
    stream: &str,
    after: Option<Id>,
) -> Result<(Id, Option<Replay>), BackplaneError> {
    match after {
        Some(after) => {
            let replay = backplane.history_after(stream, after).await?;
            let at = match (replay.gap, replay.items.is_empty()) {
                (false, _) => after,
                // Nothing retained: the position is "before the first".
                (true, true) => Id::START,
                // The replay's items move it from "unknown".
                (true, false) => Id::UNKNOWN,
            };
            Ok((at, Some(replay)))
        }
        None => Ok((backplane.head(stream).await?.unwrap_or(Id::START), None)),
    }
}

/// Why a channel could not be joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Over the per-connection channel limit.
    Limit(usize),
    /// The channel has its maximum of subscribers on this node.
    Full,
    /// The backplane could not be reached.
    Unavailable,
}

impl Refusal {
    /// The reason given to the client.
    pub fn reason(&self, channel: &str) -> String {
        match self {
            Refusal::Limit(max) => {
                format!("at most {max} channels per connection (HUB_MAX_CHANNELS_PER_CONNECTION)")
            }
            Refusal::Full => format!("channel {channel} is at its subscriber limit on this node"),
            Refusal::Unavailable => "backplane unavailable".to_owned(),
        }
    }

    /// `hub_channel_refusals_total{reason}`.
    pub fn metric(&self) -> &'static str {
        match self {
            Refusal::Limit(_) => "limit",
            Refusal::Full => "full",
            Refusal::Unavailable => "unavailable",
        }
    }
}

/// Joins channel `name` for a connection of `user`: routed to the connection's queue,
/// subscribed on the backplane (live when this returns), positioned from `after` (replay) or
/// at the head. Undone on failure.
pub async fn join(
    ctx: &Context,
    registration: &mut Registration,
    user: &Arc<str>,
    name: &str,
    after: Option<Id>,
) -> Result<(Followed, Option<Replay>), Refusal> {
    let stream: Arc<str> = channel_stream(name).into();
    registration
        .join(stream.clone())
        .map_err(|JoinError::ChannelFull| Refusal::Full)?;
    let positioned = async {
        ctx.backplane.subscribe(&stream, user).await?;
        match start(&*ctx.backplane, &stream, after).await {
            Ok(started) => Ok(started),
            Err(e) => {
                ctx.backplane.unsubscribe(&stream, user);
                Err(e)
            }
        }
    }
    .await;
    match positioned {
        Ok((at, replay)) => Ok((
            Followed {
                name: name.into(),
                tag: cursor::tag(name),
                stream,
                at,
            },
            replay,
        )),
        Err(_) => {
            registration.leave(&stream);
            Err(Refusal::Unavailable)
        }
    }
}

/// Leaves a followed channel: no more routing to this connection, one subscription fewer.
pub fn leave(ctx: &Context, registration: &mut Registration, user: &Arc<str>, f: &Followed) {
    registration.leave(&f.stream);
    ctx.backplane.unsubscribe(&f.stream, user);
}
