//! The circuit breaker of the Redis gate (DESIGN.md 3): three states in one atomic, so a request
//! pays a single load to learn that Redis is to be skipped.
//!
//! `Up` → (`threshold` consecutive failures) → `Down` → (the prober, after the cool-down) →
//! `Probing` → `Up` on a successful probe, `Down` again on a failed one. Request traffic never
//! probes: only the background prober moves the breaker out of `Down`. A breaker can also be
//! [suspected](Breaker::suspect) straight from `Up` into `Probing` when another client of the
//! same Redis just lost it.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

/// The breaker's state, also the `/status` word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests use Redis.
    Up,
    /// Requests skip Redis until the prober succeeds.
    Down,
    /// The prober is checking Redis; requests still skip it.
    Probing,
}

impl BreakerState {
    /// The word used in `/status` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Probing => "probing",
        }
    }

    fn from_u8(v: u8) -> BreakerState {
        match v {
            0 => Self::Up,
            1 => Self::Down,
            _ => Self::Probing,
        }
    }
}

/// Consecutive-failure circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    threshold: u32,
}

impl Breaker {
    /// A closed (`Up`) breaker that opens after `threshold` consecutive failures.
    pub fn new(threshold: u32) -> Breaker {
        Breaker {
            state: AtomicU8::new(BreakerState::Up as u8),
            failures: AtomicU32::new(0),
            threshold: threshold.max(1),
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether a request may use Redis now.
    pub fn allows(&self) -> bool {
        self.state.load(Ordering::Acquire) == BreakerState::Up as u8
    }

    /// Record a successful operation: the failure run is over.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Record a failed operation. Returns `true` for exactly the one failure that opened it.
    pub fn failure(&self) -> bool {
        let run = self.failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        run >= self.threshold
            && self
                .state
                .compare_exchange(BreakerState::Up as u8, BreakerState::Down as u8, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// The prober starts a probe; `false` when the breaker is not `Down`.
    pub fn begin_probe(&self) -> bool {
        self.state
            .compare_exchange(
                BreakerState::Down as u8,
                BreakerState::Probing as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Another client of the same Redis lost it: skip Redis while one probe checks it at once.
    /// `false` when the breaker was not `Up` (already skipping Redis).
    pub fn suspect(&self) -> bool {
        self.state
            .compare_exchange(BreakerState::Up as u8, BreakerState::Probing as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The probe's verdict: `Up` again (failure run cleared) or back to `Down`.
    pub fn end_probe(&self, healthy: bool) {
        if healthy {
            self.failures.store(0, Ordering::Relaxed);
            self.state.store(BreakerState::Up as u8, Ordering::Release);
        } else {
            self.state.store(BreakerState::Down as u8, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::new(3);
        assert!(!b.failure());
        assert!(!b.failure());
        b.success();
        assert!(!b.failure());
        assert!(!b.failure());
        assert!(b.allows());
        assert!(b.failure(), "the third consecutive failure opens it");
        assert_eq!(b.state(), BreakerState::Down);
        assert!(!b.allows());
        assert!(!b.failure(), "only one failure reports the transition");
    }

    #[test]
    fn only_the_prober_closes_it() {
        let b = Breaker::new(1);
        assert!(b.failure());
        b.success(); // a late success from an operation sent before the breaker opened
        assert_eq!(b.state(), BreakerState::Down);
        assert!(b.begin_probe());
        assert_eq!(b.state(), BreakerState::Probing);
        assert!(!b.allows(), "requests still skip Redis while probing");
        assert!(!b.begin_probe(), "one probe at a time");
        b.end_probe(false);
        assert_eq!(b.state(), BreakerState::Down);
        assert!(b.begin_probe());
        b.end_probe(true);
        assert_eq!(b.state(), BreakerState::Up);
        assert!(b.allows());
        assert!(b.failure(), "the failure run was cleared by the probe, threshold 1 opens again");
    }

    #[test]
    fn a_suspected_breaker_skips_redis_until_its_probe_answers() {
        let b = Breaker::new(2);
        assert!(b.suspect());
        assert_eq!(b.state(), BreakerState::Probing);
        assert!(!b.allows());
        assert!(!b.suspect(), "one probe at a time");
        assert!(!b.failure() && !b.failure(), "failures while probing do not report an opening");
        assert!(!b.begin_probe(), "the prober does not probe a breaker already probing");
        b.end_probe(true);
        assert!(b.allows());
        assert!(!b.failure(), "a successful probe cleared the failure run");
        assert!(b.failure());
        assert!(!b.suspect(), "an open breaker is not suspected again");
    }
}
