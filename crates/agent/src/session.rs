//! The reliability layer both ends share: the receiver's dedupe state ([`Inbox`]) and
//! the sender's unacknowledged frames ([`Outbox`]).
//!
//! The transport (one HTTP/2 stream) keeps order, so within one connection seq
//! numbers arrive in order; across a reconnect the sender resends from the peer's
//! last processed seq + 1. A frame at or below the high-water mark is therefore a
//! duplicate. The msg_id window catches a frame resent under a new seq (after a
//! GAP renumbering), remembered for the dedupe window; the sent_at check refuses
//! clocks too far ahead.

use std::{
    collections::{HashSet, VecDeque},
    time::Duration,
};

use crate::wire::now_us;

/// What the receiver does with an incoming reliable frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Process it, then acknowledge.
    New,
    /// Already processed: acknowledge again, do not process.
    Duplicate,
    /// Sent more than the allowed skew in the future: a broken clock or a forged frame.
    Skewed,
    /// A seq beyond high-water + 1: frames were lost in between. Cannot happen on an
    /// ordered stream with correct resend; the stream is reset.
    Gap { expected: u64 },
}

/// Receiver side: highest contiguous seq processed, plus a bounded msg_id window.
#[derive(Debug)]
pub struct Inbox {
    hwm: u64,
    ids: HashSet<String>,
    order: VecDeque<(i64, String)>,
    window_us: i64,
    max_ids: usize,
    skew_us: i64,
}

impl Inbox {
    pub fn new(hwm: u64, window: Duration, max_ids: usize) -> Inbox {
        Inbox {
            hwm,
            ids: HashSet::new(),
            order: VecDeque::new(),
            window_us: i64::try_from(window.as_micros()).unwrap_or(i64::MAX),
            max_ids,
            skew_us: 30_000_000,
        }
    }

    pub fn hwm(&self) -> u64 {
        self.hwm
    }

    pub fn check(&mut self, seq: u64, msg_id: &str, sent_at_us: i64) -> Verdict {
        let now = now_us();
        if seq <= self.hwm {
            return Verdict::Duplicate;
        }
        if sent_at_us > now + self.skew_us {
            return Verdict::Skewed;
        }
        // A frame at hwm + 1 is new by construction, however old its sent_at (an
        // orchestrator that was down for a while gets old frames resent); the
        // msg_id window only catches a frame resent under a new seq after a GAP.
        if !msg_id.is_empty() && self.ids.contains(msg_id) {
            self.hwm = seq;
            return Verdict::Duplicate;
        }
        if seq != self.hwm + 1 {
            return Verdict::Gap { expected: self.hwm + 1 };
        }
        self.hwm = seq;
        if !msg_id.is_empty() {
            self.remember(now, msg_id);
        }
        Verdict::New
    }

    fn remember(&mut self, now: i64, msg_id: &str) {
        while let Some((at, _)) = self.order.front() {
            if self.order.len() < self.max_ids && *at >= now - self.window_us {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
        self.ids.insert(msg_id.to_string());
        self.order.push_back((now, msg_id.to_string()));
    }
}

/// Sender side: frames kept until the peer's cumulative ack covers them.
#[derive(Debug)]
pub struct Outbox<T> {
    next_seq: u64,
    unacked: VecDeque<(u64, T)>,
}

impl<T: Clone> Outbox<T> {
    /// `next_seq` is the seq the next frame gets (1 for a new session).
    pub fn new(next_seq: u64) -> Outbox<T> {
        Outbox {
            next_seq: next_seq.max(1),
            unacked: VecDeque::new(),
        }
    }

    /// Assigns the next seq to a frame and keeps it.
    pub fn push(&mut self, make: impl FnOnce(u64) -> T) -> (u64, T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = make(seq);
        self.unacked.push_back((seq, frame.clone()));
        (seq, frame)
    }

    /// Keeps an already numbered frame (reloaded from the store).
    pub fn restore(&mut self, seq: u64, frame: T) {
        self.next_seq = self.next_seq.max(seq + 1);
        self.unacked.push_back((seq, frame));
    }

    /// Drops every frame up to `ack` and returns them.
    pub fn ack(&mut self, ack: u64) -> Vec<(u64, T)> {
        let mut dropped = Vec::new();
        while self.unacked.front().is_some_and(|(seq, _)| *seq <= ack) {
            dropped.extend(self.unacked.pop_front());
        }
        dropped
    }

    /// The frame with this seq, still unacknowledged.
    pub fn get_mut(&mut self, seq: u64) -> Option<&mut T> {
        // Frames just pushed are at the back.
        self.unacked.iter_mut().rev().find(|(s, _)| *s == seq).map(|(_, f)| f)
    }

    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Unacknowledged frames after `seq`, in order.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &(u64, T)> {
        let start = self.unacked.partition_point(|(s, _)| *s <= seq);
        self.unacked.range(start..)
    }

    /// Frames the peer has not acknowledged, in order, for a resend.
    pub fn pending(&self) -> impl Iterator<Item = &(u64, T)> {
        self.unacked.iter()
    }

    /// After a GAP the peer knows none of our seqs: renumber from 1, keeping order.
    pub fn renumber(&mut self, mut apply: impl FnMut(&mut T, u64)) {
        let mut seq = 1;
        for (s, frame) in &mut self.unacked {
            *s = seq;
            apply(frame, seq);
            seq += 1;
        }
        self.next_seq = seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_by_seq_and_msg_id_are_refused_and_gaps_reported() {
        let mut inbox = Inbox::new(0, Duration::from_secs(60), 100);
        let now = now_us();
        assert_eq!(inbox.check(1, "a", now), Verdict::New);
        assert_eq!(inbox.check(1, "a", now), Verdict::Duplicate);
        assert_eq!(inbox.check(2, "b", now), Verdict::New);
        // Resent under a new seq after a renumbering: caught by the msg_id window.
        assert_eq!(inbox.check(3, "a", now), Verdict::Duplicate);
        assert_eq!(inbox.hwm(), 3);
        assert_eq!(inbox.check(5, "c", now), Verdict::Gap { expected: 4 });
        assert_eq!(inbox.check(4, "d", now + 60_000_000), Verdict::Skewed);
        // Old but next in line: processed (resent after a long outage).
        assert_eq!(inbox.check(4, "d", now - 3_600_000_000), Verdict::New);
        assert_eq!(inbox.check(5, "e", now), Verdict::New);
    }

    #[test]
    fn msg_id_window_is_bounded() {
        let mut inbox = Inbox::new(0, Duration::from_secs(60), 10);
        let now = now_us();
        for i in 1..=1000u64 {
            assert_eq!(inbox.check(i, &i.to_string(), now), Verdict::New);
        }
        assert!(inbox.ids.len() <= 10);
    }

    #[test]
    fn outbox_acks_cumulatively_and_renumbers() {
        let mut out: Outbox<u64> = Outbox::new(1);
        for _ in 0..5 {
            out.push(|seq| seq * 10);
        }
        assert_eq!(out.ack(3), vec![(1, 10), (2, 20), (3, 30)]);
        assert_eq!(out.pending().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 5]);
        out.renumber(|f, seq| *f = seq * 100);
        assert_eq!(out.pending().cloned().collect::<Vec<_>>(), vec![(1, 100), (2, 200)]);
        assert_eq!(out.next_seq(), 3);
    }
}
