//! Keyed rate limiting with Sydent's settings (`burst`, `rate_hz`): a key (a client IP, a user
//! id, a phone number, a country calling code) may make `burst` requests at once, then one per
//! `1 / rate_hz` seconds; a refused request does not count, and its answer says how long to wait.
//!
//! Sydent keeps a counter per key and a timer that takes one from *every* counter each
//! `1 / rate_hz` seconds. The same leaky bucket is computed here lazily from the time the caller
//! passes in, per key, with no timer: each key stores only the time at which its bucket will be
//! empty again (the "theoretical arrival time" of the generic cell rate algorithm). A request at
//! `now` is allowed while that time lies at most `(burst - 1) / rate_hz` seconds ahead, and
//! moves it `1 / rate_hz` seconds further. Since Sydent's ticks are global, a key there may get
//! a token back early (the tick can come right after its request); here every key waits its full
//! interval, so the limit is never looser than Sydent's.
//!
//! Memory: a key whose bucket has drained carries no information and is dropped by
//! [`RateLimiter::purge`], which the owner may call periodically; the limiter also purges by
//! itself whenever it holds twice as many keys as after its last purge (and at least
//! [`PURGE_FLOOR`]), so the map stays within about twice the keys active in the last
//! `burst / rate_hz` seconds even if nobody calls `purge`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::config::RateLimit;

/// Below this many keys the limiter does not purge on its own.
pub const PURGE_FLOOR: usize = 1024;

/// A refused request: the caller answers 429 with this `retry_after_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many requests; retry in {retry_after_ms} ms")]
pub struct RateLimited {
    pub retry_after_ms: u64,
}

/// One limiter: one bucket per key, the same `burst` and `rate_hz` for all.
///
/// The buckets sit behind a `Mutex` rather than in an actor: a check is one hash lookup and an
/// addition, never awaits and never does I/O under the lock, so a message round trip per
/// request would cost far more than the lock it replaces.
#[derive(Debug)]
pub struct RateLimiter {
    /// `1 / rate_hz`, in ms (at least 1).
    interval_ms: i64,
    /// How far ahead of `now` a bucket may be and still accept a request:
    /// `(burst - 1) * interval_ms`; `None` when `burst` is 0 (nothing is ever allowed).
    tolerance_ms: Option<i64>,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// key → the time (ms) at which its bucket is empty again.
    empty_at: HashMap<String, i64>,
    /// The size at which the limiter purges on its own next.
    purge_at_len: usize,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        // The config only admits finite positive rates; the clamp keeps a rate so small that
        // its interval overflows an i64 from wrapping (it means "practically never").
        let interval_ms = (1000.0 / limit.rate_hz).round().clamp(1.0, 1e15) as i64;
        let tolerance_ms = limit
            .burst
            .checked_sub(1)
            .map(|extra| interval_ms.saturating_mul(i64::from(extra)));
        Self {
            interval_ms,
            tolerance_ms,
            buckets: Mutex::new(Buckets {
                empty_at: HashMap::new(),
                purge_at_len: PURGE_FLOOR,
            }),
        }
    }

    /// Counts a request by `key` at `now_ms` if the key's bucket has room, else says how long
    /// until it has.
    pub fn check(&self, key: &str, now_ms: i64) -> Result<(), RateLimited> {
        let Some(tolerance_ms) = self.tolerance_ms else {
            // burst = 0: Sydent refuses every request too.
            return Err(RateLimited {
                retry_after_ms: self.interval_ms as u64,
            });
        };
        let mut buckets = self.lock();
        let empty_at = buckets
            .empty_at
            .get(key)
            .copied()
            .map_or(now_ms, |t| t.max(now_ms));
        let wait_ms = empty_at - now_ms - tolerance_ms;
        if wait_ms > 0 {
            return Err(RateLimited {
                retry_after_ms: wait_ms as u64,
            });
        }
        let next = empty_at.saturating_add(self.interval_ms);
        match buckets.empty_at.get_mut(key) {
            Some(t) => *t = next,
            None => {
                buckets.empty_at.insert(key.to_owned(), next);
                if buckets.empty_at.len() >= buckets.purge_at_len {
                    buckets.purge(now_ms);
                }
            }
        }
        Ok(())
    }

    /// Drops the keys whose buckets have drained by `now_ms` (they behave exactly as unknown
    /// keys). Returns how many were dropped.
    pub fn purge(&self, now_ms: i64) -> usize {
        self.lock().purge(now_ms)
    }

    /// How many keys have a bucket that is not (known to be) empty.
    pub fn len(&self) -> usize {
        self.lock().empty_at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // Every update is a single insert or assignment, so a panic elsewhere while the lock was
        // held cannot have left the map half-changed.
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Buckets {
    fn purge(&mut self, now_ms: i64) -> usize {
        let before = self.empty_at.len();
        self.empty_at.retain(|_, empty_at| *empty_at > now_ms);
        self.purge_at_len = (self.empty_at.len() * 2).max(PURGE_FLOOR);
        before - self.empty_at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: u32, rate_hz: f64) -> RateLimiter {
        RateLimiter::new(RateLimit { burst, rate_hz })
    }

    fn refused(retry_after_ms: u64) -> Result<(), RateLimited> {
        Err(RateLimited { retry_after_ms })
    }

    // The first five follow Sydent's tests/test_ratelimiter.py (burst 5, 0.5 Hz).

    #[test]
    fn a_first_request_is_allowed() {
        assert_eq!(limiter(5, 0.5).check("key", 0), Ok(()));
    }

    #[test]
    fn burst_requests_pass_at_once_and_the_next_is_refused() {
        let l = limiter(5, 0.5);
        for _ in 0..5 {
            assert_eq!(l.check("key", 0), Ok(()));
        }
        // One token drains every 2 s.
        assert_eq!(l.check("key", 0), refused(2000));
        assert_eq!(l.check("key", 1500), refused(500));
    }

    #[test]
    fn a_drained_bucket_allows_a_full_burst_again() {
        let l = limiter(5, 0.5);
        for _ in 0..5 {
            l.check("key", 0).unwrap();
        }
        assert!(l.check("key", 0).is_err());
        for _ in 0..5 {
            assert_eq!(l.check("key", 10_000), Ok(()));
        }
        assert!(l.check("key", 10_000).is_err());
    }

    #[test]
    fn a_sustained_rate_above_rate_hz_is_refused() {
        let l = limiter(5, 0.5);
        let first_refusal = (1..=100).find(|s| l.check("key", s * 1000).is_err());
        // The bucket gains 1 - 0.5 per second: full after 10 requests.
        assert_eq!(first_refusal, Some(10));
    }

    #[test]
    fn a_burst_then_exactly_rate_hz_is_allowed_for_ever() {
        let l = limiter(5, 0.5);
        for _ in 0..5 {
            l.check("key", 0).unwrap();
        }
        for i in 1..=100 {
            assert_eq!(l.check("key", i * 2000), Ok(()), "request {i}");
        }
        assert!(l.check("key", 200_000).is_err());
    }

    #[test]
    fn refused_requests_do_not_count() {
        let l = limiter(1, 1.0);
        l.check("key", 0).unwrap();
        for now in [0, 100, 500, 999] {
            assert!(l.check("key", now).is_err());
        }
        assert_eq!(l.check("key", 1000), Ok(()));
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let l = limiter(2, 1.0 / 3600.0);
        l.check("447700900750", 0).unwrap();
        l.check("447700900750", 0).unwrap();
        assert_eq!(l.check("447700900750", 0), refused(3_600_000));
        assert_eq!(l.check("447700900751", 0), Ok(()));
    }

    #[test]
    fn sydent_defaults_for_numbers_and_countries() {
        // msisdn: 5, then one an hour.
        let l = limiter(5, 1.0 / 3600.0);
        for _ in 0..5 {
            l.check("447700900750", 0).unwrap();
        }
        assert_eq!(l.check("447700900750", 60_000), refused(3_540_000));
        assert_eq!(l.check("447700900750", 3_600_000), Ok(()));
        // Country: 50, then one a minute.
        let l = limiter(50, 1.0 / 60.0);
        for _ in 0..50 {
            l.check("44", 0).unwrap();
        }
        assert_eq!(l.check("44", 0), refused(60_000));
    }

    #[test]
    fn burst_zero_refuses_everything() {
        let l = limiter(0, 1.0);
        assert_eq!(l.check("key", 0), refused(1000));
        assert!(l.is_empty());
    }

    #[test]
    fn purge_drops_only_drained_buckets() {
        let l = limiter(3, 1.0);
        l.check("once", 0).unwrap();
        for _ in 0..3 {
            l.check("thrice", 0).unwrap();
        }
        assert_eq!(l.purge(999), 0);
        assert_eq!(l.purge(1000), 1);
        assert_eq!(l.len(), 1);
        // The purged key starts over; the kept one still remembers its burst.
        assert_eq!(l.check("once", 1000), Ok(()));
        assert_eq!(l.check("thrice", 1000), Ok(()));
        assert_eq!(l.check("thrice", 1000), refused(1000));
        assert_eq!(l.purge(5000), 2);
        assert!(l.is_empty());
    }

    #[test]
    fn the_map_stays_bounded_without_explicit_purges() {
        let l = limiter(1, 1.0);
        // One new key a millisecond, each drained after a second: about 1000 are live.
        for i in 0..100_000i64 {
            l.check(&format!("10.0.{}.{}", i / 256, i % 256), i)
                .unwrap();
            assert!(l.len() <= 2 * PURGE_FLOOR + 2, "{} keys at {i}", l.len());
        }
    }

    #[test]
    fn concurrent_callers_share_one_burst() {
        let l = std::sync::Arc::new(limiter(50, 1.0 / 60.0));
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let l = &l;
                    s.spawn(move || (0..20).filter(|_| l.check("44", 0).is_ok()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 50);
    }
}
