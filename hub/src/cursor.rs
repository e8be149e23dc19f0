//! The one cursor: the `id` a connection with channels sees on every envelope, which resumes
//! all of its streams at once (WS `since=`, SSE `Last-Event-ID`).
//!
//! A connection without channels sees each notification's own id, `<epoch hex>-<seq>`, as it
//! always has. A connection with channels sees its position in every stream it follows, the
//! personal one first, then one entry per channel:
//!
//! ```text
//! <epoch hex>-<seq>(.<tag>~<epoch hex>-<seq>)*
//! 5d1c0a3e2b41-42.7a1f03c9~2f00c4b1d6e8-1031.00c1ffe2~0-0
//! ```
//!
//! `tag` is the 32-bit FNV-1a hash of the channel's name in 8 hex digits: the cursor stays
//! about 30 bytes per channel whatever the names' lengths. `0-0` is "before the first
//! notification" ([`Id::START`]): the stream had no history when the connection joined it.
//! A cursor holds at most [`MAX_ENTRIES`] channels (the per-connection channel limit cannot
//! be set higher); entries past it are ignored. Two channels of one connection whose tags
//! collide (about one pair in 4 × 10⁹) cannot be told apart: both resume with `hub.gap`.

use std::fmt::Write as _;

use crate::envelope::{BadId, Id};

/// Most channel entries a cursor is read with (the ceiling of
/// `HUB_MAX_CHANNELS_PER_CONNECTION`).
pub const MAX_ENTRIES: usize = 64;

/// Longest cursor text accepted: every entry at its longest.
const MAX_TEXT: usize = 48 * (MAX_ENTRIES + 1);

/// A channel's tag in cursors.
pub fn tag(channel: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in channel.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// A parsed cursor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    /// The personal stream's position.
    pub personal: Option<Id>,
    /// Each channel's position, by tag.
    pub channels: Vec<(u32, Id)>,
}

impl Cursor {
    /// Reads a resume id: a plain id (personal stream only) or a cursor.
    pub fn parse(text: &str) -> Result<Cursor, BadId> {
        if text.len() > MAX_TEXT {
            return Err(BadId);
        }
        let mut parts = text.split('.');
        let personal = match parts.next() {
            None | Some("") => None,
            Some(p) => Some(p.parse::<Id>()?),
        };
        let mut channels = Vec::new();
        for entry in parts.take(MAX_ENTRIES) {
            let (tag, at) = entry.split_once('~').ok_or(BadId)?;
            if tag.len() != 8 {
                return Err(BadId);
            }
            let tag = u32::from_str_radix(tag, 16).map_err(|_| BadId)?;
            channels.push((tag, at.parse::<Id>()?));
        }
        Ok(Cursor { personal, channels })
    }

    /// The position of the channel with `tag`; `None` when the cursor has none, or has
    /// several (a collision: the position is unknown).
    pub fn channel(&self, tag: u32) -> Option<Id> {
        let mut found = self.channels.iter().filter(|(t, _)| *t == tag);
        match (found.next(), found.next()) {
            (Some((_, at)), None) => Some(*at),
            (Some(_), Some(_)) => Some(Id::UNKNOWN),
            _ => None,
        }
    }
}

/// Writes a cursor: the personal position, then each channel's.
pub fn write(personal: Id, channels: impl IntoIterator<Item = (u32, Id)>) -> String {
    let mut out = String::with_capacity(64);
    let _ = write!(out, "{personal}");
    for (tag, at) in channels {
        let _ = write!(out, ".{tag:08x}~{at}");
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_cursor_round_trips_and_a_plain_id_is_a_personal_cursor() {
        let p = Id {
            epoch: 0x5d1c,
            seq: 42,
        };
        let a = Id {
            epoch: 0x2f00,
            seq: 1031,
        };
        let text = write(p, [(tag("announcements"), a), (7, Id::START)]);
        assert_eq!(
            text,
            format!(
                "5d1c-42.{:08x}~2f00-1031.00000007~0-0",
                tag("announcements")
            )
        );
        let c = Cursor::parse(&text).unwrap();
        assert_eq!(c.personal, Some(p));
        assert_eq!(c.channel(tag("announcements")), Some(a));
        assert_eq!(c.channel(7), Some(Id::START));
        assert_eq!(c.channel(8), None);
        let plain = Cursor::parse("5d1c-42").unwrap();
        assert_eq!(plain.personal, Some(p));
        assert!(plain.channels.is_empty());
    }

    #[test]
    fn colliding_tags_make_the_position_unknown() {
        let c = Cursor::parse("1-1.00000007~2-2.00000007~3-3").unwrap();
        assert_eq!(c.channel(7), Some(Id::UNKNOWN));
    }

    #[test]
    fn malformed_cursors_are_refused() {
        for bad in [
            "1-1.",
            "1-1.7~2-2",
            "1-1.0000000g~2-2",
            "x",
            "1-1.00000007~",
        ] {
            assert_eq!(Cursor::parse(bad), Err(BadId), "{bad}");
        }
        assert_eq!(Cursor::parse(&"1-1".repeat(2000)), Err(BadId));
    }

    #[test]
    fn tags_are_stable() {
        // FNV-1a 32 of "a": the tag must never change between versions or nodes.
        assert_eq!(tag("a"), 0xe40c_292c);
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused(text in "\\PC{0,200}") {
            let _ = Cursor::parse(&text);
        }

        #[test]
        fn written_cursors_parse_back(
            p in (1u64.., any::<u64>()),
            chans in proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..20),
        ) {
            let personal = Id { epoch: p.0, seq: p.1 };
            let entries: Vec<(u32, Id)> =
                chans.iter().map(|(t, e, s)| (*t, Id { epoch: *e, seq: *s })).collect();
            let c = Cursor::parse(&write(personal, entries.clone())).unwrap();
            prop_assert_eq!(c.personal, Some(personal));
            prop_assert_eq!(c.channels, entries);
        }
    }
}
