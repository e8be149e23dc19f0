//! Counters, error tallies, sequence tracking and latency histograms.
//!
//! Everything here is plain data that workers fill in and the parent merges, so it is
//! all serde-friendly and free of I/O. Histograms travel between processes as base64
//! of HdrHistogram's V2 encoding, which keeps full precision across the merge.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::{Deserialize, Serialize};

/// Highest latency the histograms resolve, in microseconds (60 s); larger values saturate.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// Highest sequence number a connection tracks; beyond it a receipt counts as out of range.
///
/// Bounds the per-connection bitmap at 2 MiB even if a server sends garbage seqs.
pub const MAX_TRACKED_SEQ: u64 = 1 << 24;

/// Distinct error kinds kept per tally; further kinds are folded into "other".
const MAX_ERROR_KINDS: usize = 32;
/// Full error messages kept per tally, first come first kept.
const MAX_ERROR_SAMPLES: usize = 5;
/// Longest error message sample kept, in bytes.
const MAX_SAMPLE_LEN: usize = 300;

/// Microseconds since the Unix epoch by the wall clock (0 if the clock is before 1970).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Creates an empty latency histogram: microseconds, 3 significant digits, up to 60 s.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that HdrHistogram accepts, so this cannot fail at run time.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Encodes a histogram as base64 of its V2 serialization, for one JSON line.
pub fn encode_histogram(hist: &Histogram<u64>) -> Result<String> {
    let mut raw = Vec::new();
    V2Serializer::new()
        .serialize(hist, &mut raw)
        .context("serializing latency histogram")?;
    Ok(BASE64.encode(raw))
}

/// Decodes a histogram produced by [`encode_histogram`].
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>> {
    let raw = BASE64
        .decode(text.trim())
        .context("latency histogram is not valid base64")?;
    Deserializer::new()
        .deserialize(&mut raw.as_slice())
        .context("latency histogram is not a valid V2 encoding")
}

/// Adds `other` into `into`; both must come from [`new_histogram`] or its decoding.
pub fn merge_histogram(into: &mut Histogram<u64>, other: &Histogram<u64>) -> Result<()> {
    into.add(other).context("merging latency histograms")
}

/// Percentiles of a latency histogram, converted to milliseconds for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Number of recorded samples.
    pub count: u64,
    /// Mean in ms.
    pub mean_ms: f64,
    /// Median in ms.
    pub p50_ms: f64,
    /// 90th percentile in ms.
    pub p90_ms: f64,
    /// 99th percentile in ms.
    pub p99_ms: f64,
    /// 99.9th percentile in ms.
    pub p999_ms: f64,
    /// Largest sample in ms.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises a microsecond histogram.
    pub fn from_histogram(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: hist.len(),
            mean_ms: hist.mean() / 1000.0,
            p50_ms: ms(hist.value_at_quantile(0.50)),
            p90_ms: ms(hist.value_at_quantile(0.90)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            p999_ms: ms(hist.value_at_quantile(0.999)),
            max_ms: ms(hist.max()),
        }
    }
}

/// Counts errors by kind and keeps the first few full messages as samples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorTally {
    /// Occurrences per short error kind, e.g. `"http 503"`.
    pub counts: BTreeMap<String, u64>,
    /// The first few distinct full messages, `"<kind>: <detail>"`.
    pub samples: Vec<String>,
}

impl ErrorTally {
    /// Records one error of `kind`, keeping `detail` as a sample while there is room.
    pub fn record(&mut self, kind: &str, detail: &str) {
        self.record_n(kind, detail, 1);
    }

    /// Records `n` errors of `kind` that share one `detail`.
    pub fn record_n(&mut self, kind: &str, detail: &str, n: u64) {
        self.add_count(kind, n);
        let sample = if detail.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}: {}", detail.trim())
        };
        self.add_sample(sample);
    }

    /// Adds all counts and samples of `other`.
    pub fn merge(&mut self, other: &ErrorTally) {
        for (kind, n) in &other.counts {
            self.add_count(kind, *n);
        }
        for sample in &other.samples {
            self.add_sample(sample.clone());
        }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    fn add_count(&mut self, kind: &str, n: u64) {
        // Cap the number of kinds so a server that puts unique ids in its errors
        // cannot make the report (and the JSON lines) grow without bound.
        let key = if self.counts.contains_key(kind) || self.counts.len() < MAX_ERROR_KINDS {
            kind
        } else {
            "other"
        };
        *self.counts.entry(key.to_owned()).or_default() += n;
    }

    fn add_sample(&mut self, mut sample: String) {
        if self.samples.len() >= MAX_ERROR_SAMPLES || self.samples.contains(&sample) {
            return;
        }
        truncate_on_char_boundary(&mut sample, MAX_SAMPLE_LEN);
        self.samples.push(sample);
    }
}

/// Shortens `text` to at most `max` bytes without splitting a UTF-8 character.
pub fn truncate_on_char_boundary(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
}

/// What [`SeqTracker::observe`] concluded about one received sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqOutcome {
    /// First receipt of this seq on this connection.
    New,
    /// This seq was already received on this connection.
    Duplicate,
    /// Zero or above [`MAX_TRACKED_SEQ`]; not tracked.
    OutOfRange,
}

/// Remembers which per-user sequence numbers one connection has received.
///
/// Seqs are dense (1..=n per user), so a bitmap is both the smallest and fastest set.
#[derive(Debug, Default)]
pub struct SeqTracker {
    bits: Vec<u64>,
}

impl SeqTracker {
    /// Records a receipt of `seq` and says whether it was new.
    pub fn observe(&mut self, seq: u64) -> SeqOutcome {
        if seq == 0 || seq > MAX_TRACKED_SEQ {
            return SeqOutcome::OutOfRange;
        }
        let index = seq - 1;
        // Both conversions are bounded by MAX_TRACKED_SEQ, far below usize::MAX.
        let word = (index / 64) as usize;
        let mask = 1u64 << (index % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        let slot = &mut self.bits[word];
        if *slot & mask != 0 {
            SeqOutcome::Duplicate
        } else {
            *slot |= mask;
            SeqOutcome::New
        }
    }
}

/// Delivery counters of one worker, or of all workers once merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounters {
    /// "load" envelopes received, duplicates included.
    pub deliveries: u64,
    /// Receipts of a seq the same connection had already received.
    pub duplicates: u64,
    /// Successfully published notifications that an established connection never received.
    pub missing: u64,
    /// Notifications that should have reached the established connections.
    pub expected: u64,
    /// Distinct seqs received beyond what the parent counted as published (e.g. a publish
    /// whose response was lost but that the hub did deliver).
    pub unexpected: u64,
    /// "load" envelopes whose seq was zero or absurdly large.
    pub out_of_range: u64,
    /// Envelopes of other types (hub.connected and anything else).
    pub other_messages: u64,
    /// Payloads that were not a JSON envelope or had a malformed "load" body.
    pub bad_messages: u64,
    /// Receipts of a new seq after a higher one of the same stream on the same connection.
    #[serde(default)]
    pub out_of_order: u64,
    /// Connections that missed at least one notification of one of their streams.
    #[serde(default)]
    pub connections_missing: u64,
    /// Connections that received at least one notification twice.
    #[serde(default)]
    pub connections_with_duplicates: u64,
    /// Connections that received at least one notification out of order.
    #[serde(default)]
    pub connections_out_of_order: u64,
    /// `hub.gap` envelopes received.
    #[serde(default)]
    pub gaps: u64,
    /// Notifications replayed to a resumed connection (sent before it came back; their
    /// latency is not in the histogram, it would only measure the time offline).
    #[serde(default)]
    pub replayed: u64,
    /// Connections that dropped on purpose and came back.
    #[serde(default)]
    pub resumes: u64,
    /// Of those, how many the hub greeted with `resumed: false`.
    #[serde(default)]
    pub resumes_not_resumed: u64,
    /// Connections that dropped on purpose and could not come back.
    #[serde(default)]
    pub resume_failures: u64,
}

impl DeliveryCounters {
    /// Adds all counters of `other`.
    pub fn merge(&mut self, other: &DeliveryCounters) {
        self.deliveries += other.deliveries;
        self.duplicates += other.duplicates;
        self.missing += other.missing;
        self.expected += other.expected;
        self.unexpected += other.unexpected;
        self.out_of_range += other.out_of_range;
        self.other_messages += other.other_messages;
        self.bad_messages += other.bad_messages;
        self.out_of_order += other.out_of_order;
        self.connections_missing += other.connections_missing;
        self.connections_with_duplicates += other.connections_with_duplicates;
        self.connections_out_of_order += other.connections_out_of_order;
        self.gaps += other.gaps;
        self.replayed += other.replayed;
        self.resumes += other.resumes;
        self.resumes_not_resumed += other.resumes_not_resumed;
        self.resume_failures += other.resume_failures;
    }
}

/// Adds `other` into `into` element-wise, growing `into` as needed.
pub fn add_per_hub(into: &mut Vec<u64>, other: &[u64]) {
    if into.len() < other.len() {
        into.resize(other.len(), 0);
    }
    for (slot, n) in into.iter_mut().zip(other) {
        *slot += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracker_counts_new_duplicate_and_out_of_range() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(1), SeqOutcome::New);
        assert_eq!(t.observe(3), SeqOutcome::New);
        assert_eq!(t.observe(64), SeqOutcome::New);
        assert_eq!(t.observe(65), SeqOutcome::New);
        assert_eq!(t.observe(3), SeqOutcome::Duplicate);
        assert_eq!(t.observe(65), SeqOutcome::Duplicate);
        assert_eq!(t.observe(0), SeqOutcome::OutOfRange);
        assert_eq!(t.observe(MAX_TRACKED_SEQ + 1), SeqOutcome::OutOfRange);
        assert_eq!(t.observe(MAX_TRACKED_SEQ), SeqOutcome::New);
        assert_eq!(t.observe(MAX_TRACKED_SEQ), SeqOutcome::Duplicate);
    }

    #[test]
    fn histogram_survives_encoding_and_merges() -> Result<()> {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for us in 1..=1000 {
            a.record(us)?;
        }
        b.record(50_000)?;
        b.saturating_record(MAX_LATENCY_US * 10);

        let decoded_b = decode_histogram(&encode_histogram(&b)?)?;
        assert_eq!(decoded_b.len(), 2);

        let mut merged = decode_histogram(&encode_histogram(&a)?)?;
        merge_histogram(&mut merged, &decoded_b)?;
        assert_eq!(merged.len(), 1002);
        // Saturated sample lands at the top bucket, within 3 significant digits.
        assert!(merged.max() >= MAX_LATENCY_US * 999 / 1000);

        let s = LatencySummary::from_histogram(&merged);
        assert_eq!(s.count, 1002);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "p50 {}", s.p50_ms);
        assert!(s.p999_ms >= 50.0 - 0.1, "p99.9 {}", s.p999_ms);
        Ok(())
    }

    #[test]
    fn decoding_rejects_garbage() {
        assert!(decode_histogram("not base64!").is_err());
        assert!(decode_histogram(&BASE64.encode(b"nope")).is_err());
    }

    #[test]
    fn empty_histogram_summary_is_zero() {
        assert_eq!(
            LatencySummary::from_histogram(&new_histogram()),
            LatencySummary::default()
        );
    }

    #[test]
    fn error_tally_merges_counts_and_keeps_first_samples() {
        let mut a = ErrorTally::default();
        a.record("http 503", r#"{"error":"overloaded"}"#);
        a.record("http 503", r#"{"error":"overloaded"}"#);
        let mut b = ErrorTally::default();
        b.record("http 401", r#"{"error":"bad token"}"#);
        b.record("http 503", "");
        a.merge(&b);
        assert_eq!(a.counts["http 503"], 3);
        assert_eq!(a.counts["http 401"], 1);
        assert_eq!(
            a.samples,
            vec![
                r#"http 503: {"error":"overloaded"}"#.to_owned(),
                r#"http 401: {"error":"bad token"}"#.to_owned(),
                "http 503".to_owned(),
            ]
        );
    }

    #[test]
    fn error_tally_is_bounded() {
        let mut t = ErrorTally::default();
        for i in 0..100 {
            t.record(&format!("kind {i}"), &"x".repeat(1000));
        }
        assert_eq!(t.counts.len(), MAX_ERROR_KINDS + 1);
        assert_eq!(t.counts["other"], 100 - MAX_ERROR_KINDS as u64);
        assert_eq!(t.samples.len(), MAX_ERROR_SAMPLES);
        assert!(
            t.samples
                .iter()
                .all(|s| s.len() <= MAX_SAMPLE_LEN + '…'.len_utf8())
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut s = "ééééé".to_owned(); // 2 bytes each
        truncate_on_char_boundary(&mut s, 5);
        assert_eq!(s, "éé…");
    }

    #[test]
    fn delivery_counters_and_per_hub_merge() {
        let mut a = DeliveryCounters {
            deliveries: 10,
            missing: 1,
            expected: 11,
            ..Default::default()
        };
        let b = DeliveryCounters {
            deliveries: 5,
            duplicates: 2,
            expected: 3,
            bad_messages: 1,
            out_of_order: 4,
            connections_with_duplicates: 1,
            gaps: 2,
            resumes: 3,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!((a.out_of_order, a.connections_with_duplicates), (4, 1));
        assert_eq!((a.gaps, a.resumes), (2, 3));
        assert_eq!(a.deliveries, 15);
        assert_eq!(a.duplicates, 2);
        assert_eq!(a.missing, 1);
        assert_eq!(a.expected, 14);
        assert_eq!(a.bad_messages, 1);

        let mut hubs = vec![1, 2];
        add_per_hub(&mut hubs, &[10, 20, 30]);
        assert_eq!(hubs, vec![11, 22, 30]);
    }
}
