//! Canary routing: which version of a model answers a request that names none.
//!
//! Per model, a weighted split between versions (e.g. 85/15) and named tags, each a
//! subset of versions. A request whose `x-deployment-tag` names a tag of the model
//! goes to that subset (the tag always wins over the split); otherwise it goes to
//! the split. Within the chosen set the version is picked by a hash of the model and
//! the caller's sticky key (the user id, else the tenant), so a user stays on its
//! version while the weights stand. An unknown tag is ignored (the split decides).
//! A request that names a version gets that version.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryRule {
    /// Version → weight.
    pub split: BTreeMap<String, u32>,
    /// Tag → versions.
    #[serde(default)]
    pub tags: HashMap<String, Vec<String>>,
}

/// A canary rule that routes nowhere.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CanaryError {
    #[error("canary.{model}: split needs a version with a weight above 0")]
    NoWeight { model: String },
    #[error("canary.{model}: tag '{tag}' names no version")]
    EmptyTag { model: String, tag: String },
}

impl CanaryRule {
    pub fn validate(&self, model: &str) -> Result<(), CanaryError> {
        if self.split.is_empty() || self.split.values().all(|w| *w == 0) {
            return Err(CanaryError::NoWeight { model: model.into() });
        }
        if let Some((tag, _)) = self.tags.iter().find(|(_, v)| v.is_empty()) {
            return Err(CanaryError::EmptyTag {
                model: model.into(),
                tag: tag.clone(),
            });
        }
        Ok(())
    }

    /// The version for a request with `tag` (if any) and `sticky_key`.
    pub fn pick(&self, model: &str, tag: Option<&str>, sticky_key: &str) -> String {
        let weight = |v: &str| self.split.get(v).copied().unwrap_or(1);
        let candidates: Vec<(&str, u32)> = match tag.and_then(|t| self.tags.get(t)) {
            Some(subset) => subset.iter().map(|v| (v.as_str(), weight(v).max(1))).collect(),
            None => self.split.iter().map(|(v, w)| (v.as_str(), *w)).collect(),
        };
        let total: u64 = candidates.iter().map(|(_, w)| u64::from(*w)).sum();
        let Some(first) = candidates.first() else {
            return String::new();
        };
        if total == 0 {
            return first.0.to_string();
        }
        let mut point = sticky_hash(model, sticky_key) % total;
        for (v, w) in &candidates {
            let w = u64::from(*w);
            if point < w {
                return (*v).to_string();
            }
            point -= w;
        }
        first.0.to_string()
    }
}

/// FNV-1a over model and key, then splitmix64's finalizer so nearby keys spread.
fn sticky_hash(model: &str, key: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in model.bytes().chain([0u8]).chain(key.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> CanaryRule {
        CanaryRule {
            split: [("1".to_string(), 85), ("2".to_string(), 15)].into(),
            tags: [("beta".to_string(), vec!["2".to_string()])].into(),
        }
    }

    #[test]
    fn ten_thousand_users_split_within_two_percent_of_the_weights() {
        let r = rule();
        let on_2 = (0..10_000)
            .filter(|i| r.pick("m", None, &format!("user-{i}")) == "2")
            .count();
        let share = on_2 as f64 / 10_000.0;
        assert!((share - 0.15).abs() <= 0.02, "{share}");
    }

    #[test]
    fn the_tag_always_wins_and_users_stay_on_their_version() {
        let r = rule();
        for i in 0..1000 {
            let user = format!("user-{i}");
            assert_eq!(r.pick("m", Some("beta"), &user), "2");
            let first = r.pick("m", None, &user);
            assert!((0..5).all(|_| r.pick("m", None, &user) == first));
            // An unknown tag leaves the split in charge.
            assert_eq!(r.pick("m", Some("nope"), &user), first);
        }
    }
}
