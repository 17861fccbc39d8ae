//! An optional global rate limit on emitted records: a token bucket.
//!
//! The bucket holds up to `burst` tokens and gains `rate_per_sec` tokens a
//! second; each admitted record takes one. A record that finds no token is
//! suppressed and counted, and the first record admitted after some were
//! suppressed learns how many, so it can carry `"suppressed":N`: nothing is
//! dropped silently. `seq` counts emitted records only, so suppression leaves
//! no gap in it.
//!
//! The clock is the caller's (`now` is passed in), which keeps the bucket
//! deterministic and testable.
//!
//! Kept hand-written (issue 13, item 5): `governor` is GCRA with integer
//! quotas and its own clock (quanta), so a fractional `--rate-limit` and the
//! caller's clock that keeps these tests deterministic would be adapted
//! around it, and the part that is ours — counting what was suppressed and
//! handing the count to the next admitted record — stays either way. It would
//! replace some 50 lines with a dependency tree of its own.
use std::time::Instant;

/// What to do with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Emit it. `suppressed` is the number of records suppressed since the
    /// previous admitted one (0: none); when it is not 0 the record carries
    /// `"suppressed": suppressed`.
    Emit { suppressed: u64 },
    /// Do not emit it; it is counted and reported with the next admitted record.
    Suppress,
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
    /// Suppressed since the last admitted record.
    pending: u64,
    /// Suppressed since the bucket was made.
    total: u64,
}

impl TokenBucket {
    /// A full bucket: `burst` records pass at once, then `rate_per_sec` a
    /// second on average. A `burst` of 0 counts as 1; a rate that is not a
    /// positive finite number refills nothing (only the first `burst` records
    /// ever pass).
    pub fn new(rate_per_sec: f64, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
                rate_per_sec
            } else {
                0.0
            },
            burst,
            tokens: burst,
            last: None,
            pending: 0,
            total: 0,
        }
    }

    /// Decides for one record at time `now`. An earlier `now` than a previous
    /// call's refills nothing (it never takes tokens back).
    pub fn admit(&mut self, now: Instant) -> Admit {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        if self.last.is_none_or(|last| now > last) {
            self.last = Some(now);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Emit {
                suppressed: std::mem::take(&mut self.pending),
            }
        } else {
            self.pending += 1;
            self.total += 1;
            Admit::Suppress
        }
    }

    /// Records suppressed since the last admitted one, not reported yet.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Takes the pending count, for a caller that reports it some other way
    /// (e.g. on shutdown, when no further record will come).
    pub fn take_pending(&mut self) -> u64 {
        std::mem::take(&mut self.pending)
    }

    /// Records suppressed since the bucket was made (the
    /// `envguard_events_suppressed_total` metric).
    pub fn suppressed_total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A fake clock: a fixed origin plus whatever the test says.
    struct Clock(Instant);
    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn count(b: &mut TokenBucket, at: Instant, n: usize) -> (usize, Vec<u64>) {
        let mut emitted = 0;
        let mut reports = Vec::new();
        for _ in 0..n {
            if let Admit::Emit { suppressed } = b.admit(at) {
                emitted += 1;
                reports.push(suppressed);
            }
        }
        (emitted, reports)
    }

    #[test]
    fn burst_passes_then_suppresses() {
        let c = Clock(Instant::now());
        let mut b = TokenBucket::new(10.0, 5);
        let (emitted, reports) = count(&mut b, c.at(0), 8);
        assert_eq!(emitted, 5);
        assert_eq!(reports, [0, 0, 0, 0, 0]);
        assert_eq!(b.pending(), 3);
        assert_eq!(b.suppressed_total(), 3);
    }

    #[test]
    fn first_admitted_after_suppression_carries_the_count() {
        let c = Clock(Instant::now());
        let mut b = TokenBucket::new(10.0, 2);
        assert_eq!(b.admit(c.at(0)), Admit::Emit { suppressed: 0 });
        assert_eq!(b.admit(c.at(0)), Admit::Emit { suppressed: 0 });
        assert_eq!(b.admit(c.at(0)), Admit::Suppress);
        assert_eq!(b.admit(c.at(50)), Admit::Suppress); // half a token
        assert_eq!(b.admit(c.at(99)), Admit::Suppress);
        // 100 ms at 10/s: one token.
        assert_eq!(b.admit(c.at(100)), Admit::Emit { suppressed: 3 });
        assert_eq!(b.admit(c.at(100)), Admit::Suppress);
        assert_eq!(b.admit(c.at(200)), Admit::Emit { suppressed: 1 });
        assert_eq!(b.suppressed_total(), 4);
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn refill_is_capped_at_burst() {
        let c = Clock(Instant::now());
        let mut b = TokenBucket::new(100.0, 3);
        count(&mut b, c.at(0), 3);
        // An hour idle refills to 3, not 360 000.
        let (emitted, _) = count(&mut b, c.at(3_600_000), 10);
        assert_eq!(emitted, 3);
    }

    #[test]
    fn sustained_rate_matches_configuration() {
        let c = Clock(Instant::now());
        let mut b = TokenBucket::new(50.0, 1);
        let mut emitted = 0;
        // 10 s of 1000 offers a second, one per ms.
        for ms in 0..10_000 {
            if matches!(b.admit(c.at(ms)), Admit::Emit { .. }) {
                emitted += 1;
            }
        }
        // 1 (the initial token) + 50/s for 9.999 s.
        assert!((499..=501).contains(&emitted), "{emitted}");
        assert_eq!(b.suppressed_total(), 10_000 - emitted);
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let c = Clock(Instant::now());
        let mut b = TokenBucket::new(10.0, 1);
        assert_eq!(b.admit(c.at(1000)), Admit::Emit { suppressed: 0 });
        assert_eq!(b.admit(c.at(500)), Admit::Suppress);
        assert_eq!(b.admit(c.at(1050)), Admit::Suppress);
        assert_eq!(b.admit(c.at(1100)), Admit::Emit { suppressed: 2 });
    }

    #[test]
    fn degenerate_settings() {
        let c = Clock(Instant::now());
        let mut zero_burst = TokenBucket::new(1.0, 0);
        assert_eq!(zero_burst.admit(c.at(0)), Admit::Emit { suppressed: 0 });
        assert_eq!(zero_burst.admit(c.at(0)), Admit::Suppress);
        let mut no_rate = TokenBucket::new(f64::NAN, 2);
        let (emitted, _) = count(&mut no_rate, c.at(0), 5);
        assert_eq!(emitted, 2);
        let (emitted, _) = count(&mut no_rate, c.at(1_000_000), 5);
        assert_eq!(emitted, 0);
        assert_eq!(no_rate.take_pending(), 8);
        assert_eq!(no_rate.pending(), 0);
        assert_eq!(no_rate.suppressed_total(), 8);
    }
}
