//! The agent's side of probe marking: which cgroups are `envguard verify`
//! probes right now, so their violation records carry `"probe": <run id>`
//! and are counted apart. Marks expire on their own: a verify that dies
//! leaves no mark behind for long (and its cgroup id is never reused by the
//! kernel while the mark could matter: cgroup ids are 64-bit inode numbers
//! of a fresh directory).
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// How long a mark lives when the request names no `ttl_secs`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// The longest a mark may live.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Marks held at once: a bound on what a root client can make the agent keep.
pub const MAX_MARKS: usize = 4096;

#[derive(Debug, Default)]
pub struct ProbeMarks {
    marks: HashMap<u64, (String, Instant)>,
}

impl ProbeMarks {
    /// Marks `cgroup_id` as probe run `run` until `ttl` from `now`; an empty
    /// `run` clears the mark.
    pub fn set(
        &mut self,
        cgroup_id: u64,
        run: &str,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<(), String> {
        self.expire(now);
        if run.is_empty() {
            self.marks.remove(&cgroup_id);
            return Ok(());
        }
        if run.len() > 64
            || !run
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(format!(
                "probe run id {run:?} must be 1 to 64 letters, digits, '-', '_', '.' or ':'"
            ));
        }
        if cgroup_id == 0 {
            return Err("cgroup_id 0 is no cgroup".to_owned());
        }
        if self.marks.len() >= MAX_MARKS && !self.marks.contains_key(&cgroup_id) {
            return Err(format!("too many probe marks (limit {MAX_MARKS})"));
        }
        let ttl = ttl.unwrap_or(DEFAULT_TTL).min(MAX_TTL);
        self.marks.insert(cgroup_id, (run.to_owned(), now + ttl));
        Ok(())
    }

    /// The run id `cgroup_id` is marked with, if its mark still holds.
    pub fn get(&self, cgroup_id: u64, now: Instant) -> Option<&str> {
        self.marks
            .get(&cgroup_id)
            .filter(|(_, until)| *until > now)
            .map(|(run, _)| run.as_str())
    }

    pub fn expire(&mut self, now: Instant) {
        self.marks.retain(|_, (_, until)| *until > now);
    }

    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_hold_until_cleared_or_expired() {
        let t0 = Instant::now();
        let mut m = ProbeMarks::default();
        m.set(42, "v-1", Some(Duration::from_secs(10)), t0).unwrap();
        assert_eq!(m.get(42, t0), Some("v-1"));
        assert_eq!(m.get(43, t0), None);
        assert_eq!(m.get(42, t0 + Duration::from_secs(11)), None);
        m.set(42, "", None, t0).unwrap();
        assert_eq!(m.get(42, t0), None);
        m.set(7, "v-2", Some(Duration::from_secs(99_999)), t0)
            .unwrap();
        assert_eq!(m.get(7, t0 + MAX_TTL - Duration::from_secs(1)), Some("v-2"));
        assert_eq!(m.get(7, t0 + MAX_TTL), None);
        m.expire(t0 + MAX_TTL);
        assert!(m.is_empty());
    }

    #[test]
    fn bad_marks_are_refused() {
        let mut m = ProbeMarks::default();
        let now = Instant::now();
        assert!(m.set(1, "a b", None, now).unwrap_err().contains("must be"));
        assert!(
            m.set(0, "run", None, now)
                .unwrap_err()
                .contains("no cgroup")
        );
        for i in 1..=MAX_MARKS as u64 {
            m.set(i, "r", None, now).unwrap();
        }
        assert!(
            m.set(0xffff_ffff, "r", None, now)
                .unwrap_err()
                .contains("too many")
        );
        assert_eq!(m.len(), MAX_MARKS);
    }
}
