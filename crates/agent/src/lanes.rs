//! Priority lanes with aging: one FIFO per priority level (0 background … 5
//! realtime). The next task is the lane head with the highest *effective*
//! priority, its level plus one per `aging` it has waited; ties go to the higher
//! level. Realtime work never waits behind fresher background work, and background
//! work waiting long enough overtakes everything, so it is never starved.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

pub const LEVELS: usize = 6;

#[derive(Debug)]
pub struct Lanes {
    lanes: [VecDeque<(String, Instant)>; LEVELS],
    aging: Duration,
}

impl Lanes {
    pub fn new(aging: Duration) -> Lanes {
        Lanes {
            lanes: Default::default(),
            aging: aging.max(Duration::from_millis(1)),
        }
    }

    pub fn push(&mut self, priority: u32, task_id: String, at: Instant) {
        let level = (priority as usize).min(LEVELS - 1);
        self.lanes[level].push_back((task_id, at));
    }

    pub fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    /// Drops entries `keep` rejects (cancelled or finished tasks, which are
    /// otherwise only skipped when they reach the front).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        for lane in &mut self.lanes {
            lane.retain(|(id, _)| keep(id));
        }
    }

    pub fn pop(&mut self, now: Instant) -> Option<String> {
        let mut best: Option<(u128, usize)> = None;
        for (level, lane) in self.lanes.iter().enumerate() {
            if let Some((_, at)) = lane.front() {
                let waited = now.saturating_duration_since(*at).as_micros() / self.aging.as_micros();
                let effective = level as u128 + waited;
                // Iterating upwards, `>=` lets the higher level win ties.
                if best.is_none_or(|(e, _)| effective >= e) {
                    best = Some((effective, level));
                }
            }
        }
        best.and_then(|(_, level)| self.lanes[level].pop_front().map(|(id, _)| id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_first_and_background_not_starved() {
        let t0 = Instant::now();
        let mut lanes = Lanes::new(Duration::from_secs(1));
        lanes.push(0, "bg".into(), t0);
        lanes.push(5, "rt".into(), t0);
        lanes.push(2, "normal".into(), t0);
        assert_eq!(lanes.pop(t0).as_deref(), Some("rt"));
        assert_eq!(lanes.pop(t0).as_deref(), Some("normal"));
        // Background that waited 6 s outranks a fresh realtime task (5 + 0 < 0 + 6).
        let later = t0 + Duration::from_secs(6);
        lanes.push(5, "rt2".into(), later);
        assert_eq!(lanes.pop(later).as_deref(), Some("bg"));
        assert_eq!(lanes.pop(later).as_deref(), Some("rt2"));
        assert!(lanes.is_empty());
    }
}
