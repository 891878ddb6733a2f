//! When to refresh a token and how long to wait after a failure
//! (docs/operations.md#refresh-schedule), as pure functions.
//!
//! Nothing here reads a clock or a random source: the time `now` and the uniform random draw `u`
//! (in `[0, 1)`) are parameters, so the refresher decides with real time and real randomness and
//! the tests decide with tables and seeded generators. Nothing here panics: lifetimes of zero,
//! one second or a year, durations from config near [`Duration::MAX`], and `u` outside `[0, 1)`
//! or NaN (clamped into `[0, 1]`, NaN read as 0) all give an answer.
//!
//! # The refresh time
//!
//! A token issued at `t0` with lifetime `L` is refreshed `delay` after `t0`, where
//! (docs/operations.md#refresh-schedule)
//!
//! ```text
//! raw     = L · (refresh_at − u · jitter)
//! margin' = min(refresh_margin, L / 4)      // "never later than this before expiry"
//! floor'  = min(min_interval,  L / 2)       // "never sooner than this after the last token"
//! delay   = min(max(raw, floor'), L − margin')
//! ```
//!
//! Both clamps shrink for short-lived tokens, so that a token of a few seconds still gets a
//! usable window. Because `margin' ≤ L/4` and `floor' ≤ L/2`, the window `[floor', L − margin']`
//! is never empty; were it ever (odd config), the upper bound wins: a token is never refreshed
//! later than `expiry − margin'`.
//!
//! Worked examples with the defaults (`refresh_at` 0.75, `jitter` 0.10, `refresh_margin` 30 s,
//! `min_interval` 10 s):
//!
//! | `L`  | raw (u = 0 … 1)   | margin' | floor' | refresh after issue |
//! |------|-------------------|---------|--------|---------------------|
//! | 1 h  | 2700 s … 2340 s   | 30 s    | 10 s   | 39 min … 45 min     |
//! | 20 s | 15 s … 13 s       | 5 s     | 10 s   | 13 s … 15 s         |
//! | 6 s  | 4.5 s … 3.9 s     | 1.5 s   | 3 s    | 3.9 s … 4.5 s       |
//! | 1 s  | 0.75 s … 0.65 s   | 0.25 s  | 0.5 s  | 0.65 s … 0.75 s     |
//! | 0 s  | 0                 | 0       | 0      | at once             |
//!
//! With `refresh_at` 0.95 and a 6 s token, raw would be 5.7 s: the margin clamp brings it to
//! 4.5 s. With `min_interval` 10 s and `refresh_at` 0.1 on a 1 h token, raw (360 s) is above the
//! floor and stays; on a 20 s token raw (2 s) is raised to the floor, 10 s.
//!
//! # Bursts
//!
//! When many clients get a token at about the same moment (the daemon starting, a provider back
//! from an outage, SIGUSR1), the plain schedule would bring them all back within the same
//! `jitter · L` window, every lifetime. So the first refresh after a burst uses
//! [`burst_delay`]: uniform over `[0.25, refresh_at] · L`, with the same clamps. For 1,000
//! clients with a 600 s token that is 150 s … 450 s, about 33 requests per 10 s against a
//! long-run mean of `N / (L · (refresh_at − jitter/2))`, about 24 per 10 s: 1.4× the mean
//! instead of about 7× (all within 390 s … 450 s). Each later plain refresh adds an independent
//! 390 s … 450 s, which keeps the spread. One run of 1,000 clients adds counting noise (about
//! ±6 per 10 s window), which takes its busiest window near 2×; `tests/it/schedule.rs` shows
//! both schedules. Use [`is_burst`] to decide when a token came from a burst.
//!
//! # Backoff
//!
//! After the `n`-th consecutive failure (`n` counted from 0) the next attempt waits
//! `u · min(retry_max, retry_initial · 2ⁿ)`: exponential backoff with *full jitter* ("Exponential
//! Backoff And Jitter", AWS Architecture Blog, 2015), which spreads the retries of clients that
//! failed together. Errors that cannot heal by themselves go straight to `retry_max`; a
//! `Retry-After` is honoured, even above `retry_max`. See [`Backoff::next_delay`].

use std::time::{Duration, SystemTime};

use crate::config::Timing;

/// The exponent of the backoff stops growing here: `retry_initial · 2³¹` exceeds any sane
/// `retry_max` (a 1 ns initial delay reaches 2 s), and a larger shift would overflow.
const MAX_BACKOFF_EXPONENT: u32 = 31;

/// How far below `retry_max` a permanent error's delay may land (a fraction of `retry_max`).
pub const PERMANENT_JITTER: f64 = 0.10;

/// The lower end of the burst spread, as a fraction of the lifetime
/// (docs/operations.md#refresh-schedule).
pub const BURST_START: f64 = 0.25;

/// `u` (or any fraction) read into `[0, 1]`; NaN reads as 0.
fn unit(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// `d · f` for `f` taken into `[0, 1]`; never above `d`, never panics.
fn fraction_of(d: Duration, f: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * unit(f)).map_or(d, |x| x.min(d))
}

/// `margin'`: how long before expiry a token of this lifetime must be refreshed at the latest,
/// `min(refresh_margin, L/4)`. Also what the store should use for "valid for at least the
/// margin" (docs/operations.md#restarts, `/readyz` in #metrics-and-health) when it wants the
/// short-token rule.
pub fn effective_margin(t: &Timing, lifetime: Duration) -> Duration {
    t.refresh_margin.min(lifetime / 4)
}

/// `floor'`: how soon after issue a token of this lifetime may be refreshed at the earliest,
/// `min(min_interval, L/2)`.
pub fn effective_floor(t: &Timing, lifetime: Duration) -> Duration {
    t.min_interval.min(lifetime / 2)
}

/// The two clamps of docs/operations.md#refresh-schedule, the upper one last so that it wins.
fn clamp(t: &Timing, lifetime: Duration, raw: Duration) -> Duration {
    let latest = lifetime.saturating_sub(effective_margin(t, lifetime));
    raw.max(effective_floor(t, lifetime)).min(latest)
}

/// Delay after issue of the next scheduled refresh of a token with this lifetime:
/// `L · (refresh_at − u · jitter)` clamped into `[floor', L − margin']` (module docs,
/// docs/operations.md#refresh-schedule).
/// `u` is a uniform draw in `[0, 1)`.
pub fn refresh_delay(t: &Timing, lifetime: Duration, u: f64) -> Duration {
    let f = unit(t.refresh_at) - unit(u) * unit(t.jitter);
    clamp(t, lifetime, fraction_of(lifetime, f))
}

/// Delay after issue of the first refresh after a burst: `L · (0.25 + u · (refresh_at − 0.25))`,
/// uniform over `[0.25, refresh_at] · L`, with the same clamps as [`refresh_delay`] (so for
/// short tokens the floor `min(min_interval, L/2)` may narrow the spread). A `refresh_at` below
/// 0.25 spreads over `[refresh_at, 0.25] · L`.
pub fn burst_delay(t: &Timing, lifetime: Duration, u: f64) -> Duration {
    let a = unit(t.refresh_at);
    let (lo, hi) = if a < BURST_START {
        (a, BURST_START)
    } else {
        (BURST_START, a)
    };
    clamp(t, lifetime, fraction_of(lifetime, lo + unit(u) * (hi - lo)))
}

/// The absolute time of the next refresh of a token issued at `issued_at` and expiring at
/// `expires_at`, seen at `now`; `burst` picks [`burst_delay`] over [`refresh_delay`].
///
/// The exact rule, with `L = expires_at − issued_at` (zero if negative),
/// `latest = expires_at − margin'` and `at = issued_at + delay`:
/// - `now ≥ latest` (less than `margin'` left, or already expired): `now`;
/// - otherwise `at`, if it has not passed;
/// - otherwise (a stored token reused after a restart late in its life): for a burst, a time
///   uniform over what is left, `now + u · (latest − now)`, so that a fleet restarted half-way
///   through its tokens' lives does not ask for half of them at once (issue 6: a restart makes
///   no token request); for a scheduled refresh, `now`.
///
/// The answer is never after `latest` unless `now` is. A token with a zero (or negative)
/// lifetime is due at once, every time: the caller should not take such a response as a token
/// at all (treat it as a failure and back off), or it would ask the provider in a tight loop.
pub fn next_refresh_at(
    t: &Timing,
    issued_at: SystemTime,
    expires_at: SystemTime,
    now: SystemTime,
    u: f64,
    burst: bool,
) -> SystemTime {
    let lifetime = expires_at
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO);
    let latest = expires_at
        .checked_sub(effective_margin(t, lifetime))
        .unwrap_or(expires_at);
    if now >= latest {
        return now;
    }
    let delay = if burst {
        burst_delay(t, lifetime, u)
    } else {
        refresh_delay(t, lifetime, u)
    };
    let at = issued_at
        .checked_add(delay)
        .map_or(latest, |at| at.min(latest));
    if at >= now {
        return at;
    }
    if burst {
        let left = latest.duration_since(now).unwrap_or(Duration::ZERO);
        return now + left.mul_f64(unit(u));
    }
    now
}

/// When to refresh a stored token reused at start (docs/operations.md#restarts), `planned`
/// being the time the schedule had planned for it before the restart, if the state kept one:
/// - `planned` still ahead, and no later than `expires_at − margin'`: `planned`, so a restart
///   asks the provider for nothing sooner than it would have without the restart;
/// - a plan that fell due while the daemon was down (or lies past the margin, the timing having
///   changed): a time uniform over what is left, `now + u · (latest − now)`, so the tokens that
///   fell due together are spread instead of asked for at once;
/// - no plan (a state file from before plans were kept): [`next_refresh_at`] after a burst.
pub fn resume_at(
    t: &Timing,
    token: &crate::token::Token,
    planned: Option<SystemTime>,
    now: SystemTime,
    u: f64,
) -> SystemTime {
    let lifetime = token.lifetime();
    let latest = token
        .expires_at
        .checked_sub(effective_margin(t, lifetime))
        .unwrap_or(token.expires_at);
    match planned {
        Some(at) if at >= now && at <= latest => at,
        Some(_) => match latest.duration_since(now) {
            Ok(left) => now + left.mul_f64(unit(u)),
            Err(_) => now,
        },
        None => next_refresh_at(t, token.issued_at, token.expires_at, now, u, true),
    }
}

/// Why the token request that produced a token was made, as the refresher knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The first request of a client after the daemon started, or after a reload added it.
    Startup,
    /// The scheduled refresh ([`next_refresh_at`]).
    Schedule,
    /// A retry: any request that follows one or more failures, whatever first prompted it.
    Retry,
    /// A request for this one client: gRPC `RefreshToken`, `get --min-valid`.
    Demand,
    /// A `rotate_cron` time (several clients may share one expression).
    Rotation,
    /// SIGUSR1: every client at once.
    RefreshAll,
    /// A reload changed the client's credentials or identity (a shared secret file may change
    /// many clients at once).
    Reload,
}

/// Whether the token obtained by a request made for `trigger` should be treated as part of a
/// burst, i.e. its next refresh computed with `burst = true`.
///
/// Each client decides alone, with no shared state: every occasion on which many clients may
/// get a token at the same moment counts (start-up, recovery after failures (a provider back
/// from an outage), cron rotation, SIGUSR1, reload). Over-counting is cheap: one refresh lands
/// earlier in its lifetime, once. Only the plain schedule and a single client's on-demand
/// refresh are not bursts.
pub fn is_burst(trigger: Trigger) -> bool {
    !matches!(trigger, Trigger::Schedule | Trigger::Demand)
}

/// What kind of failure a token request ended with, for the backoff (the refresher maps the
/// OAuth error classification onto this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// May heal by itself: network errors, timeouts, 5xx, 429, `temporarily_unavailable`.
    Retryable,
    /// Cannot heal without the operator: `invalid_client`, `unauthorized_client`,
    /// `unsupported_grant_type`, `invalid_scope` (docs/operations.md#failures-and-retries).
    Permanent,
    /// `invalid_grant` (RFC 6749 §5.2) with no grant left to fall back to. When a refresh-token
    /// grant gets it and the client has a primary grant, the refresher forgets the refresh
    /// token and tries the primary grant at once instead (docs/oauth.md#refresh-tokens): that is
    /// not a backoff. Timed like [`FailureKind::Permanent`].
    InvalidGrant,
}

/// The state of consecutive failures of one client, and the delay before its next attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    /// Failures since the last success (`ClientStatus.consecutive_failures`).
    failures: u32,
}

// === impl Backoff ===

impl Backoff {
    /// No failures yet.
    pub fn new() -> Self {
        Backoff::default()
    }

    /// A success: the next failure starts again from `retry_initial`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures since the last success (saturates at `u32::MAX`).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records one more failure and returns the delay before the next attempt.
    ///
    /// With `n` the failures before this one (0 for the first):
    /// - [`FailureKind::Retryable`]: `u · min(retry_max, retry_initial · 2ⁿ)`, full jitter
    ///   (the exponent stops at 31, so it never overflows);
    /// - [`FailureKind::Permanent`] and [`FailureKind::InvalidGrant`]:
    ///   `retry_max · (1 − 0.1 · u)`, within the last 10% below `retry_max`. Straight to the
    ///   cap, but not exactly at it, so that clients that fail together (a secret rotated
    ///   everywhere at once) do not come back together; never above the cap;
    /// - a `Retry-After` (RFC 9110 §10.2.3) gives `max(retry_after, computed)`: never sooner
    ///   than the provider asked, even when that is beyond `retry_max`, and no later than
    ///   `max(retry_after, retry_max)`.
    pub fn next_delay(
        &mut self,
        t: &Timing,
        kind: FailureKind,
        retry_after: Option<Duration>,
        u: f64,
    ) -> Duration {
        let n = self.failures;
        self.failures = self.failures.saturating_add(1);
        let computed = match kind {
            FailureKind::Retryable => fraction_of(backoff_ceiling(t, n), u),
            FailureKind::Permanent | FailureKind::InvalidGrant => {
                fraction_of(t.retry_max, 1.0 - PERMANENT_JITTER * unit(u))
            }
        };
        retry_after.map_or(computed, |ra| ra.max(computed))
    }
}

/// The ceiling of the full-jitter draw after `n` earlier failures:
/// `min(retry_max, retry_initial · 2^min(n, 31))`, saturating to `retry_max` on overflow.
pub fn backoff_ceiling(t: &Timing, n: u32) -> Duration {
    let factor = 1u32 << n.min(MAX_BACKOFF_EXPONENT);
    t.retry_initial
        .checked_mul(factor)
        .map_or(t.retry_max, |d| d.min(t.retry_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Just under 1, the largest `u` in `[0, 1)`.
    const U_MAX: f64 = 1.0 - f64::EPSILON;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn refresh_delay_with_defaults() {
        let t = Timing::default();
        // (lifetime s, u, expected ms)
        let cases: &[(f64, f64, u128)] = &[
            (3600.0, 0.0, 2_700_000),
            (3600.0, U_MAX, 2_340_000),
            (3600.0, 0.5, 2_520_000),
            (20.0, 0.0, 15_000),
            (20.0, U_MAX, 13_000),
            (6.0, 0.0, 4_500),
            (6.0, U_MAX, 3_900),
            (1.0, 0.0, 750),
            (1.0, U_MAX, 650),
            (0.0, 0.0, 0),
            (0.0, U_MAX, 0),
        ];
        for &(l, u, want) in cases {
            let got = refresh_delay(&t, s(l), u);
            assert_eq!(ms(got), want, "L = {l} s, u = {u}");
        }
    }

    #[test]
    fn refresh_delay_with_custom_timing() {
        let base = Timing::default();
        // The default timing, refreshing at `refresh_at` of the lifetime without jitter.
        let no_jitter = |refresh_at| Timing {
            refresh_at,
            jitter: 0.0,
            ..Timing::default()
        };
        // (timing, lifetime s, u, expected ms, why)
        let cases: Vec<(Timing, f64, f64, u128, &str)> = vec![
            (
                no_jitter(0.95),
                6.0,
                0.0,
                4_500,
                "margin clamp: 5.7 s → 6 − 1.5",
            ),
            (no_jitter(0.95), 3600.0, 0.0, 3_420_000, "no clamp"),
            (
                no_jitter(1.0),
                3600.0,
                0.0,
                3_570_000,
                "margin clamp: 30 s before expiry",
            ),
            (no_jitter(0.1), 3600.0, 0.0, 360_000, "above the floor"),
            (no_jitter(0.1), 20.0, 0.0, 10_000, "floor: 2 s → 10 s"),
            (
                Timing {
                    min_interval: s(600.0),
                    ..no_jitter(0.1)
                },
                3600.0,
                0.0,
                600_000,
                "floor: custom min_interval",
            ),
            (
                Timing {
                    refresh_at: 0.5,
                    jitter: 0.4,
                    ..base.clone()
                },
                1000.0,
                U_MAX,
                100_000,
                "wide jitter, u → 1",
            ),
            (
                Timing {
                    refresh_margin: s(600.0),
                    ..base.clone()
                },
                3600.0,
                0.0,
                2_700_000,
                "margin 600 s not binding at 0.75",
            ),
            (
                Timing {
                    refresh_margin: s(1200.0),
                    ..base.clone()
                },
                3600.0,
                0.0,
                2_700_000,
                "margin 1200 s shrunk to L/4 = 900 s, not binding",
            ),
            (
                Timing {
                    refresh_margin: s(1200.0),
                    ..no_jitter(0.9)
                },
                3600.0,
                0.0,
                2_700_000,
                "margin shrunk to L/4 binds at 0.9",
            ),
            (
                Timing {
                    refresh_margin: Duration::MAX,
                    min_interval: Duration::MAX,
                    ..base.clone()
                },
                3600.0,
                0.0,
                2_700_000,
                "huge config durations shrink to L/4 and L/2",
            ),
        ];
        for (t, l, u, want, why) in cases {
            assert_eq!(ms(refresh_delay(&t, s(l), u)), want, "{why}");
        }
    }

    #[test]
    fn refresh_delay_never_panics_on_extremes() {
        let t = Timing::default();
        for l in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            for u in [0.0, U_MAX, 1.0, -3.0, 7.0, f64::NAN, f64::INFINITY] {
                let d = refresh_delay(&t, l, u);
                assert!(d <= l.saturating_sub(effective_margin(&t, l)));
                let b = burst_delay(&t, l, u);
                assert!(b <= l.saturating_sub(effective_margin(&t, l)));
            }
        }
        let odd = Timing {
            refresh_at: f64::NAN,
            jitter: f64::INFINITY,
            ..Timing::default()
        };
        assert_eq!(refresh_delay(&odd, s(100.0), 0.5), s(10.0));
        // A year: 0.75 of it.
        let year = Duration::from_secs(365 * 86_400);
        assert_eq!(refresh_delay(&t, year, 0.0).as_secs(), 365 * 86_400 * 3 / 4);
    }

    #[test]
    fn burst_delay_bounds() {
        let t = Timing::default();
        // (lifetime s, u, expected ms)
        let cases: &[(f64, f64, u128)] = &[
            (600.0, 0.0, 150_000),
            (600.0, 0.5, 300_000),
            (600.0, U_MAX, 450_000),
            (3600.0, 0.0, 900_000),
            (3600.0, U_MAX, 2_700_000),
            // 20 s: 5 s raised to floor' = 10 s; top 15 s.
            (20.0, 0.0, 10_000),
            (20.0, U_MAX, 15_000),
            // 6 s: floor' 3 s, latest 4.5 s.
            (6.0, 0.0, 3_000),
            (6.0, U_MAX, 4_500),
            (0.0, 0.5, 0),
        ];
        for &(l, u, want) in cases {
            assert_eq!(ms(burst_delay(&t, s(l), u)), want, "L = {l} s, u = {u}");
        }
        let low = Timing {
            refresh_at: 0.2,
            min_interval: Duration::ZERO,
            ..Timing::default()
        };
        assert_eq!(ms(burst_delay(&low, s(1000.0), 0.0)), 200_000);
        assert_eq!(ms(burst_delay(&low, s(1000.0), U_MAX)), 250_000);
    }

    #[test]
    fn next_refresh_at_cases() {
        let t = Timing::default();
        // (why, issued, expires, now, u, burst, expected)
        let cases: &[(&str, u64, u64, u64, f64, bool, u64)] = &[
            ("fresh token", 0, 3600, 0, 0.0, false, 2700),
            ("fresh token, u → 1", 0, 3600, 0, U_MAX, false, 2340),
            ("fresh token, burst", 0, 3600, 0, 0.0, true, 900),
            ("restart, half used", 0, 3600, 1800, 0.0, false, 2700),
            (
                "restart, past the computed time",
                0,
                3600,
                3000,
                0.0,
                false,
                3000,
            ),
            ("restart, burst time passed", 0, 3600, 1800, 0.0, true, 1800),
            // Spread over what is left (latest 3570 s): 1800 + 0.2 · 1770.
            (
                "restart, burst time passed, u = 0.2",
                0,
                3600,
                1800,
                0.2,
                true,
                2154,
            ),
            (
                "restart, inside the margin",
                0,
                3600,
                3580,
                0.0,
                false,
                3580,
            ),
            ("exactly at the margin", 0, 3600, 3570, 0.0, false, 3570),
            ("expired", 0, 3600, 4000, 0.0, false, 4000),
            ("zero lifetime", 100, 100, 100, 0.0, false, 100),
            ("expiry before issue", 100, 50, 100, 0.0, false, 100),
            ("6 s token", 0, 6, 0, 0.0, false, 4), // 4.5 s, checked below
        ];
        for &(why, issued, expires, now, u, burst, want) in cases {
            let got = next_refresh_at(&t, at(issued), at(expires), at(now), u, burst);
            let got = got.duration_since(at(0)).unwrap_or_default().as_secs();
            assert_eq!(got, want, "{why}");
        }
        let six = next_refresh_at(&t, at(0), at(6), at(0), 0.0, false);
        assert_eq!(six.duration_since(at(0)).ok(), Some(s(4.5)));
        // Inside the margin of a short token: 6 s token at 5 s (margin' 1.5 s).
        let late = next_refresh_at(&t, at(0), at(6), at(5), 0.0, false);
        assert_eq!(late, at(5));
    }

    /// A fleet restarted half-way through its tokens' lives: the reused tokens whose burst
    /// time has passed are spread over what is left, none is due at once, all before `latest`.
    #[test]
    fn reused_tokens_late_in_life_are_spread_not_due_at_once() {
        let t = Timing::default();
        let (issued, expires, now) = (at(0), at(600), at(400));
        let latest = at(600 - 30);
        let mut due_now = 0;
        let mut buckets = [0usize; 4];
        for i in 0..1000 {
            let u = (i as f64 + 0.5) / 1000.0;
            let got = next_refresh_at(&t, issued, expires, now, u, true);
            assert!(got >= now && got < latest, "u = {u}: {got:?}");
            if got == now {
                due_now += 1;
            }
            let frac = got.duration_since(now).unwrap().as_secs_f64() / 170.0;
            buckets[((frac * 4.0) as usize).min(3)] += 1;
        }
        assert_eq!(due_now, 0);
        // The share planned in each quarter of what is left: spread, not piled up.
        for b in buckets {
            assert!(b < 450, "{buckets:?}");
        }
    }

    #[test]
    fn burst_triggers() {
        let cases = [
            (Trigger::Startup, true),
            (Trigger::Schedule, false),
            (Trigger::Retry, true),
            (Trigger::Demand, false),
            (Trigger::Rotation, true),
            (Trigger::RefreshAll, true),
            (Trigger::Reload, true),
        ];
        for (trigger, want) in cases {
            assert_eq!(is_burst(trigger), want, "{trigger:?}");
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let t = Timing::default();
        let mut b = Backoff::new();
        // With u → 1 the delay is just under the ceiling: 1, 2, 4, … 256, then 300 s.
        let want = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300];
        for (i, &w) in want.iter().enumerate() {
            assert_eq!(backoff_ceiling(&t, i as u32), s(w as f64));
            let d = b.next_delay(&t, FailureKind::Retryable, None, U_MAX);
            assert!(
                d <= s(w as f64) && d > s(w as f64 * 0.999),
                "step {i}: {d:?}"
            );
            assert_eq!(b.failures(), i as u32 + 1);
        }
        // Huge exponents neither overflow nor exceed the cap.
        for n in [31, 32, 64, 1000, u32::MAX] {
            assert_eq!(backoff_ceiling(&t, n), s(300.0));
        }
        let huge = Timing {
            retry_initial: Duration::MAX,
            retry_max: Duration::MAX,
            ..Timing::default()
        };
        assert_eq!(backoff_ceiling(&huge, 5), Duration::MAX);
        let mut b = Backoff {
            failures: u32::MAX - 1,
        };
        b.next_delay(&t, FailureKind::Retryable, None, 0.5);
        b.next_delay(&t, FailureKind::Retryable, None, 0.5);
        assert_eq!(b.failures(), u32::MAX);
    }

    #[test]
    fn backoff_full_jitter_bounds() {
        let t = Timing::default();
        let mut b = Backoff::new();
        for _ in 0..3 {
            b.next_delay(&t, FailureKind::Retryable, None, 0.0);
        }
        // Fourth failure: ceiling 8 s.
        let cases = [(0.0, 0.0), (0.25, 2.0), (0.5, 4.0), (1.0, 8.0), (-1.0, 0.0)];
        for (u, want) in cases {
            let mut b = b.clone();
            assert_eq!(
                b.next_delay(&t, FailureKind::Retryable, None, u),
                s(want),
                "u = {u}"
            );
        }
    }

    #[test]
    fn backoff_permanent_and_retry_after() {
        use FailureKind::{InvalidGrant, Permanent, Retryable};
        let t = Timing::default();
        // (why, kind, retry_after s, u, expected ms)
        let cases: &[(&str, FailureKind, Option<f64>, f64, u128)] = &[
            ("permanent, u = 0", Permanent, None, 0.0, 300_000),
            ("permanent, u → 1", Permanent, None, U_MAX, 270_000),
            ("invalid_grant", InvalidGrant, None, 0.5, 285_000),
            ("retry-after above draw", Retryable, Some(30.0), 0.5, 30_000),
            ("retry-after below draw", Retryable, Some(0.2), 0.5, 500),
            (
                "retry-after beyond max",
                Retryable,
                Some(3600.0),
                0.5,
                3_600_000,
            ),
            (
                "permanent, retry-after longer",
                Permanent,
                Some(900.0),
                0.0,
                900_000,
            ),
            (
                "permanent, retry-after shorter",
                Permanent,
                Some(10.0),
                0.0,
                300_000,
            ),
        ];
        for &(why, kind, ra, u, want) in cases {
            let mut b = Backoff::new();
            let d = b.next_delay(&t, kind, ra.map(s), u);
            assert_eq!(ms(d), want, "{why}");
            assert_eq!(b.failures(), 1);
        }
    }

    #[test]
    fn backoff_reset_starts_over() {
        let t = Timing::default();
        let mut b = Backoff::new();
        for _ in 0..6 {
            b.next_delay(&t, FailureKind::Retryable, None, 0.5);
        }
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!(b.failures(), 0);
        let d = b.next_delay(&t, FailureKind::Retryable, None, U_MAX);
        assert!(d <= s(1.0) && d > s(0.999), "{d:?}");
    }
}
