//! Wall-clock time for freshness (stored-at, age, expiry), from one place: the system clock, or
//! in tests the system clock moved forward by hand, so TTL, stale and revalidation behaviour is
//! tested by advancing a clock instead of sleeping. Durations and deadlines use `tokio::time`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Where "now" comes from. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Milliseconds added to the system clock; `None` for the plain system clock.
    ahead: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// The system clock, moved forward by [`Clock::advance`].
    pub fn manual() -> Clock {
        Clock { ahead: Some(Arc::new(AtomicU64::new(0))) }
    }

    /// The time now.
    pub fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        match &self.ahead {
            Some(ahead) => now + Duration::from_millis(ahead.load(Ordering::Relaxed)),
            None => now,
        }
    }

    /// Move a manual clock forward (a system clock cannot be moved: this does nothing to it).
    pub fn advance(&self, by: Duration) {
        if let Some(ahead) = &self.ahead {
            ahead.fetch_add(by.as_millis().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_when_told() {
        let clock = Clock::manual();
        let before = clock.now();
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now().duration_since(before).unwrap() >= Duration::from_secs(3600));
        let system = Clock::system();
        system.advance(Duration::from_secs(3600));
        assert!(system.now() <= SystemTime::now());
    }
}
