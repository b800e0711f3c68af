//! Per-client-IP rate limit of the WHIP requests that cost something:
//! `POST` (a new session), `PATCH` (trickle, ICE restart) and `DELETE`. A
//! keyed token bucket (governor's GCRA); beyond it, 429 with `Retry-After`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimitConfig;
use crate::error::AppError;
use crate::telemetry;

/// Every this many checks, buckets that are full again are forgotten, so
/// the map holds only recently active IPs.
const PRUNE_EVERY: u64 = 4096;

pub struct RateLimit {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    exempt_loopback: bool,
    checks: AtomicU64,
}

impl RateLimit {
    pub fn new(config: &RateLimitConfig) -> Arc<Self> {
        let limiter = (config.per_second > 0.0).then(|| {
            let period = Duration::from_secs_f64(1.0 / config.per_second);
            let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::with_period(period)
                .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                .allow_burst(burst);
            DefaultKeyedRateLimiter::keyed(quota)
        });
        Arc::new(Self {
            limiter,
            exempt_loopback: config.exempt_loopback,
            checks: AtomicU64::new(0),
        })
    }

    /// `Err` with the seconds to wait when `ip` is over its rate.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if self.exempt_loopback && ip.to_canonical().is_loopback() {
            return Ok(());
        }
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// Middleware on the WHIP routes.
pub async fn limit(State(limit): State<Arc<RateLimit>>, req: Request, next: Next) -> Response {
    let costly = matches!(*req.method(), Method::POST | Method::PATCH | Method::DELETE);
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    if let (true, Some(ip)) = (costly, ip)
        && let Err(wait) = limit.check(ip)
    {
        telemetry::counters().rate_limited.increment(1);
        tracing::info!(%ip, method = %req.method(), "rate limited");
        return AppError::RateLimited {
            retry_after: wait.max(1),
        }
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_second: f64, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            per_second,
            burst,
            exempt_loopback: true,
        }
    }

    #[test]
    fn burst_then_refused_with_a_wait_per_ip() {
        let rl = RateLimit::new(&config(0.5, 3));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(rl.check(a).is_ok());
        }
        // One token every 2 s.
        let wait = rl.check(a).unwrap_err();
        assert!((1..=2).contains(&wait), "{wait}");
        // Another IP has its own bucket.
        assert!(rl.check(b).is_ok());
    }

    #[test]
    fn loopback_exempt_and_zero_is_off() {
        let rl = RateLimit::new(&config(1.0, 1));
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert!(rl.check(lo).is_ok());
            assert!(rl.check(mapped).is_ok());
        }
        let off = RateLimit::new(&config(0.0, 1));
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..100 {
            assert!(off.check(ip).is_ok());
        }
    }
}
