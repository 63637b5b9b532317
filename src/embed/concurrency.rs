//! Adaptive request concurrency for a remote embedding service.
//!
//! One request at a time caps throughput at the service's latency, not its capacity: a GPU
//! service answers 4 requests in about the time of one. Too many at once, and it queues them
//! (latency grows) or refuses (429, 503). So, as Vector's adaptive request concurrency does,
//! the limit is found at run time, between 1 and `embedding.max_in_flight`:
//!
//! - **additive increase**: when a request came back about as fast as the best recent ones
//!   while every permit was in use, allow one more (at most once per round trip);
//! - **multiplicative decrease**: on back-pressure (429, 503, a timeout, a slower round trip
//!   than 2× the baseline) halve it.
//!
//! The current limit is the gauge `cdc_indexer_embed_concurrency`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What a request's outcome says about the service's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered, in this round-trip time.
    Ok(Duration),
    /// Refused or timed out because it is loaded: slow down.
    Backpressure,
    /// Failed for another reason: no information.
    Other,
}

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    /// Smoothed round-trip time (seconds) and the best one seen lately.
    ewma: Option<f64>,
    baseline: Option<f64>,
    last_change: Instant,
}

/// Hands out permits for concurrent requests; the number adapts.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    released: Notify,
    max: usize,
}

/// One request's right to run; released on drop.
pub struct Permit<'a> {
    limiter: &'a Limiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut s = self.limiter.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        drop(s);
        self.limiter.released.notify_waiters();
    }
}

impl Limiter {
    /// Up to `max` requests at once, starting with one.
    pub fn new(max: usize) -> Limiter {
        Limiter {
            state: Mutex::new(State {
                limit: 1,
                in_flight: 0,
                ewma: None,
                baseline: None,
                last_change: Instant::now(),
            }),
            released: Notify::new(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Waits for a free permit.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let released = self.released.notified();
            {
                let mut s = self.lock();
                if s.in_flight < s.limit {
                    s.in_flight += 1;
                    return Permit { limiter: self };
                }
            }
            released.await;
        }
    }

    /// Feeds back one request's outcome.
    pub fn record(&self, signal: Signal) {
        let mut s = self.lock();
        match signal {
            Signal::Ok(rtt) => {
                let rtt = rtt.as_secs_f64();
                let ewma = s.ewma.map_or(rtt, |e| 0.8 * e + 0.2 * rtt);
                s.ewma = Some(ewma);
                // The best recent round trip; it drifts up slowly, so it follows a service
                // that got slower for good.
                let baseline = s.baseline.map_or(rtt, |b| rtt.min(b * 1.01));
                s.baseline = Some(baseline);
                let full = s.in_flight >= s.limit;
                let a_round_trip_ago = s.last_change.elapsed().as_secs_f64() >= ewma;
                if rtt > 2.0 * baseline && s.limit > 1 {
                    s.limit = (s.limit / 2).max(1);
                    s.last_change = Instant::now();
                } else if full && a_round_trip_ago && ewma <= 1.5 * baseline && s.limit < self.max {
                    s.limit += 1;
                    s.last_change = Instant::now();
                }
            }
            Signal::Backpressure => {
                s.limit = (s.limit / 2).max(1);
                s.last_change = Instant::now();
            }
            Signal::Other => {}
        }
        drop(s);
        self.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_answers_while_full_raise_the_limit_up_to_the_maximum() {
        let l = Limiter::new(4);
        for _ in 0..50 {
            let mut s = l.lock();
            s.in_flight = s.limit;
            s.last_change = Instant::now() - Duration::from_secs(1);
            drop(s);
            l.record(Signal::Ok(Duration::from_millis(10)));
        }
        assert_eq!(l.limit(), 4);
    }

    #[test]
    fn back_pressure_halves_the_limit() {
        let l = Limiter::new(16);
        l.lock().limit = 12;
        l.record(Signal::Backpressure);
        assert_eq!(l.limit(), 6);
        l.record(Signal::Backpressure);
        l.record(Signal::Backpressure);
        l.record(Signal::Backpressure);
        assert_eq!(l.limit(), 1, "never below one");
    }

    #[test]
    fn a_much_slower_round_trip_counts_as_back_pressure() {
        let l = Limiter::new(8);
        l.record(Signal::Ok(Duration::from_millis(10)));
        l.lock().limit = 8;
        l.record(Signal::Ok(Duration::from_millis(100)));
        assert_eq!(l.limit(), 4);
    }

    #[tokio::test]
    async fn permits_wait_for_a_release() {
        let l = Limiter::new(4);
        let first = l.acquire().await;
        let second = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
        assert!(second.is_err(), "limit 1: the second waits");
        drop(first);
        let third = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
        assert!(third.is_ok());
    }
}
