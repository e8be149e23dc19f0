//! Streams: what each connection listens to besides its personal stream, and how it checks
//! what arrives on each.
//!
//! A run publishes to *streams*, numbered `0..streams()`: first every user's personal stream
//! (`0..users`), then the channels of the scenario. The worker and the publisher use the same
//! numbering, so the per-stream publish counts the parent hands to the workers index the
//! channels and users alike.
//!
//! - `personal` (the default): no channels; what the tool always did.
//! - `broadcast`: one channel (`<prefix>all`) that every connection holds through its
//!   token's `channels` claim; publishing goes to that channel.
//! - `mixed`: each connection holds its personal stream, the shared channel and the channel
//!   of its group (`<prefix>g<k>`, user `u` in group `u % groups`); personal and channel
//!   publishes interleave, and a fraction of the connections disconnect mid-run and resume
//!   from the last envelope id they saw.
//!
//! Per stream a connection keeps a [`StreamTracker`]: which seqs arrived (so duplicates and
//! loss are exact) and the highest one (so an older seq arriving after a newer one counts as
//! out of order).

use std::fmt;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::stats::{SeqOutcome, SeqTracker};

/// What a run publishes to, and what its connections listen to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Personal streams only.
    #[default]
    Personal,
    /// One channel held by every connection.
    Broadcast,
    /// Personal streams, a shared channel and a channel per group, with resumes.
    Mixed,
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Personal => "personal",
            Self::Broadcast => "broadcast",
            Self::Mixed => "mixed",
        })
    }
}

/// Longest channel name the hub takes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// Whether `name` is a channel name the hub accepts: 1–128 characters of `[A-Za-z0-9_.:@/-]`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@/-".contains(&b))
}

/// The streams of a run: users' personal streams, then the scenario's channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPlan {
    /// The scenario.
    pub scenario: Scenario,
    /// Distinct users (personal streams `0..users`).
    pub users: usize,
    /// Group channels (mixed only).
    pub groups: usize,
    /// Prefix of the channel names.
    pub channel_prefix: String,
    /// Whether WebSocket connections join their group channel with a `subscribe` message
    /// (and a channel token) instead of by their token's claim.
    #[serde(default)]
    pub subscribe_groups: bool,
}

impl StreamPlan {
    /// A plan; `groups` only matters for `mixed`.
    pub fn new(scenario: Scenario, users: usize, groups: usize, channel_prefix: &str) -> Self {
        Self {
            scenario,
            users,
            groups: if scenario == Scenario::Mixed {
                groups
            } else {
                0
            },
            channel_prefix: channel_prefix.to_owned(),
            subscribe_groups: false,
        }
    }

    /// The same plan, WebSocket connections subscribing to their group channel by message.
    pub fn subscribing_groups(mut self, yes: bool) -> Self {
        self.subscribe_groups = yes && self.groups > 0;
        self
    }

    /// The channel numbers of `user` a connection over WebSocket (`ws`) or SSE joins by a
    /// `subscribe` message (the rest come with the token's claim): its group's with
    /// `subscribe_groups`, over WebSocket only (SSE cannot send).
    pub fn subscribed_of(&self, user: usize, ws: bool) -> Vec<usize> {
        if !(ws && self.subscribe_groups) {
            return Vec::new();
        }
        self.channels_of(user)
            .into_iter()
            .filter(|&c| c >= usize::from(self.has_shared()))
            .collect()
    }

    /// The channel numbers of `user` in a connection's token claim.
    pub fn claimed_of(&self, user: usize, ws: bool) -> Vec<usize> {
        let subscribed = self.subscribed_of(user, ws);
        self.channels_of(user)
            .into_iter()
            .filter(|c| !subscribed.contains(c))
            .collect()
    }

    /// Whether the scenario has a channel every connection holds.
    fn has_shared(&self) -> bool {
        self.scenario != Scenario::Personal
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        usize::from(self.has_shared()) + self.groups
    }

    /// Number of streams, personal and channels.
    pub fn streams(&self) -> usize {
        self.users + self.channels()
    }

    /// Name of channel number `c` (`0..channels()`): the shared one first, then the groups.
    pub fn channel_name(&self, c: usize) -> String {
        if self.has_shared() && c == 0 {
            format!("{}all", self.channel_prefix)
        } else {
            format!(
                "{}g{}",
                self.channel_prefix,
                c - usize::from(self.has_shared())
            )
        }
    }

    /// Every channel's name, in stream order.
    pub fn channel_names(&self) -> Vec<String> {
        (0..self.channels()).map(|c| self.channel_name(c)).collect()
    }

    /// Stream index of channel `c`.
    pub fn channel_stream(&self, c: usize) -> usize {
        self.users + c
    }

    /// The channel numbers user `user`'s connections hold.
    pub fn channels_of(&self, user: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(2);
        if self.has_shared() {
            out.push(0);
        }
        if self.groups > 0 {
            out.push(usize::from(self.has_shared()) + user % self.groups);
        }
        out
    }

    /// The streams user `user`'s connections listen to: personal first, then channels.
    pub fn streams_of(&self, user: usize) -> Vec<usize> {
        std::iter::once(user)
            .chain(
                self.channels_of(user)
                    .into_iter()
                    .map(|c| self.channel_stream(c)),
            )
            .collect()
    }

    /// Checks the channel names the plan makes against the hub's rules.
    pub fn check(&self) -> Result<(), String> {
        for name in self.channel_names() {
            if !valid_channel(&name) {
                return Err(format!(
                    "channel name {name:?} (from --channel-prefix) is not 1–{MAX_CHANNEL_LEN} \
                     characters of [A-Za-z0-9_.:@/-]"
                ));
            }
        }
        Ok(())
    }
}

/// Whether connection `j` is one of the `fraction` of connections that disconnect and
/// resume: exactly ⌊N × fraction⌋ of the first N connections, evenly spread.
pub fn resumes(j: usize, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let f = fraction.min(1.0);
    ((j + 1) as f64 * f).floor() > (j as f64 * f).floor()
}

/// When in the publishing window connection `j` drops, as a fraction of the window: spread
/// over its middle half (0.25–0.75), so it misses notifications on both sides of the seam
/// and is back well before the end.
pub fn drop_point(j: usize) -> f64 {
    // A fixed scramble of j (Knuth's multiplicative hash) keeps neighbours apart.
    let spread = (j as u64).wrapping_mul(2_654_435_761) % 1000;
    0.25 + 0.5 * spread as f64 / 1000.0
}

/// What [`StreamTracker::observe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A new seq, after every seq seen before on this stream.
    InOrder,
    /// A new seq, but a higher one had already arrived.
    OutOfOrder,
    /// A seq this stream had already delivered.
    Duplicate,
    /// Zero or absurdly large.
    OutOfRange,
}

/// One stream's receipts on one connection.
#[derive(Debug, Default)]
pub struct StreamTracker {
    seen: SeqTracker,
    highest: u64,
}

impl StreamTracker {
    /// Records a receipt of `seq`.
    pub fn observe(&mut self, seq: u64) -> Arrival {
        match self.seen.observe(seq) {
            SeqOutcome::Duplicate => Arrival::Duplicate,
            SeqOutcome::OutOfRange => Arrival::OutOfRange,
            SeqOutcome::New => {
                if seq < self.highest {
                    Arrival::OutOfOrder
                } else {
                    self.highest = seq;
                    Arrival::InOrder
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_the_hubs_rules() {
        assert!(valid_channel("announcements"));
        assert!(valid_channel("order:o-123"));
        assert!(valid_channel("a.b_c@d/e:f-9"));
        assert!(valid_channel(&"x".repeat(128)));
        assert!(!valid_channel(""));
        assert!(!valid_channel(&"x".repeat(129)));
        assert!(!valid_channel("room 42"));
        assert!(!valid_channel("caf\u{e9}"));
        assert!(!valid_channel("a{b}"));
    }

    #[test]
    fn personal_plans_have_no_channels() {
        let p = StreamPlan::new(Scenario::Personal, 5, 3, "load:");
        assert_eq!((p.channels(), p.streams()), (0, 5));
        assert_eq!(p.streams_of(3), [3]);
        assert!(p.check().is_ok());
    }

    #[test]
    fn broadcast_is_one_channel_everyone_holds() {
        let p = StreamPlan::new(Scenario::Broadcast, 4, 3, "load:");
        assert_eq!(p.groups, 0, "groups only exist in mixed");
        assert_eq!(p.channel_names(), ["load:all"]);
        assert_eq!(p.streams(), 5);
        for user in 0..4 {
            assert_eq!(p.streams_of(user), [user, 4]);
        }
    }

    #[test]
    fn mixed_adds_a_group_channel_per_user() {
        let p = StreamPlan::new(Scenario::Mixed, 6, 3, "lt.");
        assert_eq!(p.channel_names(), ["lt.all", "lt.g0", "lt.g1", "lt.g2"]);
        assert_eq!(p.streams(), 10);
        // User 4 is in group 1: channel 2, stream 6 + 2.
        assert_eq!(p.channels_of(4), [0, 2]);
        assert_eq!(p.streams_of(4), [4, 6, 8]);
        // Every group has members.
        let mut members = [0; 3];
        for user in 0..6 {
            members[p.channels_of(user)[1] - 1] += 1;
        }
        assert_eq!(members, [2, 2, 2]);
    }

    #[test]
    fn websocket_connections_may_subscribe_to_their_group_by_message() {
        let p = StreamPlan::new(Scenario::Mixed, 6, 3, "load:");
        // By default every channel is in the claim.
        assert_eq!(p.claimed_of(4, true), [0, 2]);
        assert!(p.subscribed_of(4, true).is_empty());
        let p = p.subscribing_groups(true);
        assert_eq!(
            (p.claimed_of(4, true), p.subscribed_of(4, true)),
            (vec![0], vec![2])
        );
        // SSE cannot send: its group stays in the claim.
        assert_eq!(
            (p.claimed_of(4, false), p.subscribed_of(4, false)),
            (vec![0, 2], vec![])
        );
        // Streams tracked do not change.
        assert_eq!(p.streams_of(4), [4, 6, 8]);
        // Nothing to subscribe without groups.
        let b = StreamPlan::new(Scenario::Broadcast, 2, 0, "load:").subscribing_groups(true);
        assert!(!b.subscribe_groups);
    }

    #[test]
    fn a_bad_prefix_is_refused_with_the_name() {
        let p = StreamPlan::new(Scenario::Broadcast, 1, 0, "no spaces ");
        let e = p.check().unwrap_err();
        assert!(e.contains("\"no spaces all\""), "{e}");
        let long = StreamPlan::new(Scenario::Broadcast, 1, 0, &"p".repeat(126));
        assert!(long.check().is_err(), "126 + \"all\" is over 128");
    }

    #[test]
    fn the_resume_fraction_picks_that_many_connections_spread_out() {
        let picked: Vec<usize> = (0..100).filter(|&j| resumes(j, 0.1)).collect();
        assert_eq!(picked.len(), 10);
        assert!(picked.windows(2).all(|w| w[1] - w[0] == 10), "{picked:?}");
        assert_eq!((0..1000).filter(|&j| resumes(j, 0.25)).count(), 250);
        assert_eq!((0..10).filter(|&j| resumes(j, 1.0)).count(), 10);
        assert_eq!((0..10).filter(|&j| resumes(j, 7.0)).count(), 10);
        assert!((0..10).all(|j| !resumes(j, 0.0)));
    }

    #[test]
    fn drops_land_in_the_middle_of_the_window_and_differ() {
        let points: Vec<f64> = (0..200).map(drop_point).collect();
        assert!(points.iter().all(|p| (0.25..0.75).contains(p)));
        let mut sorted = points.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.dedup();
        assert!(sorted.len() > 150, "{} distinct points", sorted.len());
        assert!(sorted[0] < 0.3 && sorted[sorted.len() - 1] > 0.7);
    }

    #[test]
    fn a_tracker_tells_order_duplicates_and_range() {
        let mut t = StreamTracker::default();
        assert_eq!(t.observe(1), Arrival::InOrder);
        assert_eq!(t.observe(2), Arrival::InOrder);
        // 3 lost, 4 arrives, then 3 late.
        assert_eq!(t.observe(4), Arrival::InOrder);
        assert_eq!(t.observe(3), Arrival::OutOfOrder);
        assert_eq!(t.observe(4), Arrival::Duplicate);
        assert_eq!(t.observe(3), Arrival::Duplicate);
        assert_eq!(t.observe(0), Arrival::OutOfRange);
        assert_eq!(t.observe(5), Arrival::InOrder);
    }
}
