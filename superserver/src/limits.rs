//! Per-service limits that need state: the token bucket behind `rate` and the per-source
//! connection counts behind `max_per_source`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use superserver_config::{PerSource, Rate};

/// A token bucket: `count` tokens per `per`, holding at most `count`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: f64::from(rate.count),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let per = self.rate.per.as_secs_f64().max(1e-9);
        self.tokens = (self.tokens + elapsed * f64::from(self.rate.count) / per)
            .min(f64::from(self.rate.count));
        self.last = now;
    }

    /// The tokens in the bucket now (for an in-place upgrade).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// A bucket holding `tokens` (what an upgraded image inherits), at most full.
    pub fn with_tokens(rate: Rate, tokens: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: tokens.clamp(0.0, f64::from(rate.count)),
            last: now,
        }
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True if a token is available now (without taking it).
    pub fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// When the next token will be available (now if there is one).
    pub fn next_token_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            return now;
        }
        let per = self.rate.per.as_secs_f64() / f64::from(self.rate.count);
        let wait = (1.0 - self.tokens) * per;
        now + Duration::from_secs_f64(wait) + Duration::from_micros(100)
    }
}

/// Concurrent connections per source (address masked to the configured prefix).
#[derive(Debug, Default)]
pub struct SourceCounts {
    counts: HashMap<IpNet, u32>,
}

/// The key a peer is counted under: its address truncated to the prefix for its family.
/// IPv4-mapped IPv6 peers count as IPv4.
pub fn source_key(peer: IpAddr, limit: &PerSource) -> IpNet {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        v4 => v4,
    };
    let prefix = if peer.is_ipv4() {
        limit.prefix_v4
    } else {
        limit.prefix_v6
    };
    IpNet::new(peer, prefix)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(peer))
}

impl SourceCounts {
    /// Count one more connection from `key` unless it already has `max`; false when over.
    pub fn try_add(&mut self, key: IpNet, max: u32) -> bool {
        let n = self.counts.entry(key).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// A connection from `key` ended.
    pub fn remove(&mut self, key: &IpNet) {
        if let Some(n) = self.counts.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_empties_and_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            Rate {
                count: 2,
                per: Duration::from_secs(1),
            },
            t0,
        );
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        let next = b.next_token_at(t0);
        assert!(next > t0 + Duration::from_millis(499) && next < t0 + Duration::from_millis(502));
        assert!(b.try_take(t0 + Duration::from_millis(501)));
    }

    #[test]
    fn sources_are_grouped_by_prefix() {
        let limit = PerSource {
            max: 1,
            prefix_v4: 24,
            prefix_v6: 64,
        };
        let mut c = SourceCounts::default();
        let a = source_key("127.0.0.2".parse().unwrap(), &limit);
        let b = source_key("127.0.0.3".parse().unwrap(), &limit);
        let mapped = source_key("::ffff:127.0.0.9".parse().unwrap(), &limit);
        assert_eq!(a, b);
        assert_eq!(a, mapped);
        assert!(c.try_add(a, 1));
        assert!(!c.try_add(b, 1));
        c.remove(&a);
        assert!(c.try_add(b, 1));
    }
}

/// Logs a burst of like events as one line a second: the first is logged, the rest within
/// the second are counted and the count goes with the next line logged. A flood of refused
/// connections costs one log line a second, not one each.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: Option<Instant>,
    suppressed: u32,
}

impl LogLimiter {
    /// Nothing logged yet.
    pub const NEW: LogLimiter = LogLimiter {
        last: None,
        suppressed: 0,
    };

    /// `Some(n)` when this event is to be logged (`n` like events were not since the last
    /// line); `None` when it is only counted.
    pub fn allow(&mut self, now: Instant) -> Option<u32> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < std::time::Duration::from_secs(1) => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod log_limiter_tests {
    use super::LogLimiter;
    use std::time::{Duration, Instant};

    #[test]
    fn one_line_a_second_with_the_count_of_the_rest() {
        let t0 = Instant::now();
        let mut l = LogLimiter::default();
        assert_eq!(l.allow(t0), Some(0));
        for k in 1..=99 {
            assert_eq!(l.allow(t0 + Duration::from_millis(k)), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_millis(1000)), Some(99));
        assert_eq!(l.allow(t0 + Duration::from_millis(1001)), None);
    }
}
