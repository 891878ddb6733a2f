//! Properties of the refresh schedule and backoff (docs/operations.md#refresh-schedule) over random
//! timings, and a simulation of 1,000 clients that got their tokens at the same instant.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenwarden::config::Timing;
use tokenwarden::schedule::{
    Backoff, FailureKind, burst_delay, effective_floor, effective_margin, next_refresh_at,
    refresh_delay, resume_at,
};
use tokenwarden::token::Token;

/// Slack for comparisons with bounds computed here in floating point.
const SLACK: Duration = Duration::from_micros(1);

fn timing() -> impl Strategy<Value = Timing> {
    (
        0.01f64..=1.0,
        0.0f64..1.0,
        0u64..7_200_000,
        0u64..7_200_000,
        1u64..600_000,
        1u64..86_400_000,
    )
        .prop_map(|(refresh_at, j, margin, floor, initial, max)| Timing {
            refresh_at,
            // The config checks 0 ≤ jitter < refresh_at.
            jitter: j * refresh_at,
            refresh_margin: Duration::from_millis(margin),
            min_interval: Duration::from_millis(floor),
            retry_initial: Duration::from_millis(initial),
            retry_max: Duration::from_millis(max),
            ..Timing::default()
        })
}

/// 1 s … 30 days, in milliseconds.
fn lifetime() -> impl Strategy<Value = Duration> {
    (1_000u64..=30 * 86_400_000).prop_map(Duration::from_millis)
}

/// The clamps of docs/operations.md#refresh-schedule, computed independently of the module.
fn clamp(t: &Timing, l: Duration, raw: Duration) -> Duration {
    let latest = l - effective_margin(t, l);
    raw.max(effective_floor(t, l)).min(latest)
}

fn failure_kind() -> impl Strategy<Value = FailureKind> {
    prop_oneof![
        Just(FailureKind::Retryable),
        Just(FailureKind::Permanent),
        Just(FailureKind::InvalidGrant),
    ]
}

proptest! {
    #[test]
    fn refresh_lands_inside_the_clamps(t in timing(), l in lifetime(), u in 0.0f64..1.0) {
        let margin = effective_margin(&t, l);
        let floor = effective_floor(&t, l);
        prop_assert!(margin <= l / 4 && floor <= l / 2);
        let latest = l - margin;
        let d = refresh_delay(&t, l, u);
        prop_assert!(d <= latest, "{d:?} > {latest:?}");
        prop_assert!(d >= floor.min(latest), "{d:?} < {floor:?}");
    }

    #[test]
    fn jitter_stays_within_bounds(t in timing(), l in lifetime(), u in 0.0f64..1.0) {
        // Unclamped, L·(refresh_at − jitter) ≤ raw ≤ L·refresh_at; the clamp is monotonic.
        let lo = clamp(&t, l, l.mul_f64(t.refresh_at - t.jitter));
        let hi = clamp(&t, l, l.mul_f64(t.refresh_at));
        let d = refresh_delay(&t, l, u);
        prop_assert!(d + SLACK >= lo && d <= hi + SLACK, "{lo:?} ≤ {d:?} ≤ {hi:?}");
        // And exactly the formula.
        let want = clamp(&t, l, l.mul_f64(t.refresh_at - u * t.jitter));
        prop_assert!(d.abs_diff(want) <= SLACK, "{d:?} vs {want:?}");
    }

    #[test]
    fn burst_spreads_over_a_quarter_to_refresh_at(t in timing(), l in lifetime(), u in 0.0f64..1.0) {
        let (a, b) = if t.refresh_at < 0.25 { (t.refresh_at, 0.25) } else { (0.25, t.refresh_at) };
        let lo = clamp(&t, l, l.mul_f64(a));
        let hi = clamp(&t, l, l.mul_f64(b));
        let d = burst_delay(&t, l, u);
        prop_assert!(d + SLACK >= lo && d <= hi + SLACK, "{lo:?} ≤ {d:?} ≤ {hi:?}");
        prop_assert!(d <= l - effective_margin(&t, l));
    }

    #[test]
    fn next_refresh_is_never_past_expiry_minus_margin(
        t in timing(),
        l in lifetime(),
        elapsed in 0.0f64..1.5,
        u in 0.0f64..1.0,
        burst in any::<bool>(),
    ) {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let expires = issued + l;
        let now = issued + l.mul_f64(elapsed);
        let latest = expires - effective_margin(&t, l);
        let at = next_refresh_at(&t, issued, expires, now, u, burst);
        prop_assert!(at >= now);
        if now >= latest {
            prop_assert_eq!(at, now);
        } else {
            prop_assert!(at <= latest);
        }
    }

    #[test]
    fn backoff_never_exceeds_the_cap_or_retry_after(
        t in timing(),
        steps in prop::collection::vec(
            (failure_kind(), prop::option::of(0u64..100_000_000), 0.0f64..1.0),
            1..60,
        ),
    ) {
        let mut b = Backoff::new();
        for (i, (kind, retry_after, u)) in steps.into_iter().enumerate() {
            let retry_after = retry_after.map(Duration::from_millis);
            let d = b.next_delay(&t, kind, retry_after, u);
            let cap = retry_after.map_or(t.retry_max, |ra| ra.max(t.retry_max));
            prop_assert!(d <= cap, "{d:?} > {cap:?}");
            if let Some(ra) = retry_after {
                prop_assert!(d >= ra);
            }
            if kind != FailureKind::Retryable {
                prop_assert!(d + SLACK >= t.retry_max.mul_f64(0.9));
            }
            prop_assert_eq!(b.failures() as usize, i + 1);
        }
    }
}

/// Refresh times (seconds after the common issue instant) of `clients` clients issued a
/// `lifetime` token at 0, up to `horizon`, the first refresh by `first` and later ones by
/// [`refresh_delay`]. Each new token is taken as issued at its refresh instant.
fn simulate(
    t: &Timing,
    clients: usize,
    lifetime: Duration,
    horizon: Duration,
    first: fn(&Timing, Duration, f64) -> Duration,
    seed: u64,
) -> Vec<Duration> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut times = Vec::new();
    for _ in 0..clients {
        let mut at = first(t, lifetime, rng.random::<f64>());
        while at < horizon {
            times.push(at);
            at += refresh_delay(t, lifetime, rng.random::<f64>());
        }
    }
    times
}

/// Counts per `window` over `[0, horizon)`.
fn buckets(times: &[Duration], window: Duration, horizon: Duration) -> Vec<usize> {
    let n = (horizon.as_millis() / window.as_millis()) as usize;
    let mut counts = vec![0; n];
    for t in times {
        let i = (t.as_millis() / window.as_millis()) as usize;
        if let Some(c) = counts.get_mut(i) {
            *c += 1;
        }
    }
    counts
}

/// The simulation of the burst rule of docs/operations.md#refresh-schedule: 1,000 clients issued a
/// 600 s token at the same instant, refresh times of the first two lifetimes counted per 10 s
/// window.
struct Burst {
    timing: Timing,
    clients: usize,
    lifetime: Duration,
    horizon: Duration,
    window: Duration,
}

impl Burst {
    fn new() -> Self {
        let lifetime = Duration::from_secs(600);
        Burst {
            timing: Timing::default(),
            clients: 1_000,
            lifetime,
            horizon: lifetime * 2,
            window: Duration::from_secs(10),
        }
    }

    /// The long-run mean per window: each client refreshes every `L·(refresh_at − jitter/2)`
    /// on average (about 23.8 per 10 s here).
    fn mean_per_window(&self) -> f64 {
        let t = &self.timing;
        let interval = self.lifetime.mul_f64(t.refresh_at - t.jitter / 2.0);
        self.clients as f64 * self.window.as_secs_f64() / interval.as_secs_f64()
    }

    /// Window counts of one seeded run, the first refresh by `first`.
    fn run(&self, first: fn(&Timing, Duration, f64) -> Duration, seed: u64) -> Vec<usize> {
        let times = simulate(
            &self.timing,
            self.clients,
            self.lifetime,
            self.horizon,
            first,
            seed,
        );
        buckets(&times, self.window, self.horizon)
    }

    /// Window counts averaged over `runs` seeded runs: the expected rate, without most of the
    /// counting noise of one run.
    fn expected(&self, first: fn(&Timing, Duration, f64) -> Duration, runs: u64) -> Vec<f64> {
        let mut sum = vec![0.0; (self.horizon.as_secs() / self.window.as_secs()) as usize];
        for seed in 0..runs {
            for (s, c) in sum.iter_mut().zip(self.run(first, seed)) {
                *s += c as f64;
            }
        }
        sum.into_iter().map(|s| s / runs as f64).collect()
    }
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

#[test]
fn after_a_burst_the_expected_rate_stays_under_twice_the_mean() {
    let sim = Burst::new();
    let mean = sim.mean_per_window();
    let spread = sim.expected(burst_delay, 20);
    let plain = sim.expected(refresh_delay, 20);
    let (busiest, busiest_plain) = (max_of(&spread), max_of(&plain));
    eprintln!(
        "mean {mean:.1} per 10 s; busiest window with the burst spread {busiest:.1} \
         ({:.2}×), with the plain schedule {busiest_plain:.1} ({:.2}×)",
        busiest / mean,
        busiest_plain / mean
    );
    // Uniform over [0.25, 0.75]·L is 1,000 / 300 s = 33.3 per 10 s: 1.4× the mean.
    assert!(busiest <= 2.0 * mean, "{busiest:.1} > 2 × {mean:.1}");
    // Without it, all first refreshes land within [0.65, 0.75]·L: about 7× the mean.
    assert!(busiest_plain > 5.0 * mean, "{busiest_plain:.1}");
}

#[test]
fn one_run_of_a_thousand_clients_stays_near_the_expected_rate() {
    let sim = Burst::new();
    let mean = sim.mean_per_window();
    let t = &sim.timing;
    // The busiest expected count, uniform over [0.25, refresh_at]·L.
    let peak = sim.clients as f64 * sim.window.as_secs_f64()
        / sim.lifetime.mul_f64(t.refresh_at - 0.25).as_secs_f64();
    // One run counts ~33 per window with Poisson noise (σ ≈ 5.8); over ~100 busy windows the
    // largest lies around 2.5σ above: a single run can touch 2× the mean by chance alone.
    let allowed = peak + 3.0 * peak.sqrt();
    for seed in [1, 2, 3, 42, 2026] {
        let busiest = sim.run(burst_delay, seed).into_iter().max().unwrap_or(0) as f64;
        let busiest_plain = sim.run(refresh_delay, seed).into_iter().max().unwrap_or(0) as f64;
        eprintln!(
            "seed {seed}: busiest {busiest} ({:.2}× the mean {mean:.1}), plain {busiest_plain} \
             ({:.2}×)",
            busiest / mean,
            busiest_plain / mean
        );
        assert!(busiest <= allowed, "seed {seed}: {busiest} > {allowed:.1}");
        assert!(busiest_plain > 5.0 * mean, "seed {seed}: {busiest_plain}");
    }
}

// === A restart keeps the schedule (docs/operations.md#restarts) ===

/// Just under 1, the largest `u` in `[0, 1)`.
const U_MAX: f64 = 1.0 - f64::EPSILON;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn token(issued: SystemTime, lifetime: u64) -> Token {
    Token {
        access_token: tokenwarden::secret::Secret::new("t"),
        token_type: "Bearer".into(),
        issued_at: issued,
        expires_at: issued + Duration::from_secs(lifetime),
        scope: Vec::new(),
    }
}

#[test]
fn a_reused_token_keeps_its_planned_refresh() {
    let t = Timing::default();
    // Issued at 0, 600 s: latest = 570 s. Restarted at 300 s.
    let tok = token(at(0), 600);
    let now = at(300);
    // (planned, u, expected)
    let cases: &[(Option<u64>, f64, u64)] = &[
        (Some(450), 0.0, 450), // ahead: kept, whatever u
        (Some(450), U_MAX, 450),
        (Some(300), 0.5, 300), // due right now: kept
        (Some(570), 0.5, 570), // at the latest allowed: kept
        (Some(580), 0.0, 300), // past the margin (timing changed): spread from now…
        (Some(200), 0.0, 300), // fell due while down: spread over what is left…
        (Some(200), 0.5, 435), // …300 + 0.5 · (570 − 300)
        (Some(200), U_MAX, 570),
        (None, 0.0, 300), // no plan kept: the burst spread, [150, 450] s after issue
        (None, 0.75, 375), // 150 + 0.75 · 300 = 375
    ];
    for &(planned, u, want) in cases {
        assert_eq!(
            resume_at(&t, &tok, planned.map(at), now, u),
            at(want),
            "planned {planned:?}, u {u}"
        );
    }
}

/// Issue 12, item 7: 10,000 stored tokens 200–316 s old (of 600 s) and a restart. With the
/// plans kept, nothing is asked for before its plan (none within 5 s of the restart), and
/// no 10 s window holds more than twice the mean.
#[test]
fn a_restart_asks_for_nothing_before_its_plan_and_spreads_what_fell_due() {
    let t = Timing::default();
    let now = at(1_000);
    // A small fixed generator: the same draws every run.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut u = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let n = 10_000;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let age = 200 + (i as u64 * 117 / n as u64);
        let issued = now - Duration::from_secs(age);
        let tok = token(issued, 600);
        let planned = next_refresh_at(&t, issued, tok.expires_at, issued, u(), false);
        let resumed = resume_at(&t, &tok, Some(planned), now, u());
        assert!(resumed >= now);
        if planned >= now {
            assert_eq!(resumed, planned, "a plan still ahead is kept");
        }
        times.push(resumed.duration_since(now).unwrap().as_secs());
    }
    let soon = times.iter().filter(|&&s| s < 5).count();
    assert_eq!(soon, 0, "requests within 5 s of the restart");
    let (first, last) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
    let windows = (last - first) / 10 + 1;
    let mut per_window = vec![0usize; windows as usize];
    for s in &times {
        per_window[((s - first) / 10) as usize] += 1;
    }
    let mean = n as f64 / windows as f64;
    let busiest = *per_window.iter().max().unwrap() as f64;
    assert!(
        busiest <= 2.0 * mean,
        "busiest 10 s window {busiest}, mean {mean:.0}: {per_window:?}"
    );

    // The same tokens, their plans all passed while the daemon was down: spread over what
    // is left of each, no window above twice the mean.
    let due: Vec<u64> = (0..n)
        .map(|i| {
            let issued = now - Duration::from_secs(200 + (i as u64 * 117 / n as u64));
            let tok = token(issued, 600);
            let planned = now - Duration::from_secs(1);
            let at = resume_at(&t, &tok, Some(planned), now, u());
            at.duration_since(now).unwrap().as_secs()
        })
        .collect();
    let mut per_window = vec![0usize; 40];
    for s in &due {
        per_window[(*s / 10) as usize] += 1;
    }
    let last = due.iter().max().unwrap() / 10 + 1;
    let mean = n as f64 / last as f64;
    let busiest = *per_window.iter().max().unwrap() as f64;
    assert!(
        busiest <= 2.0 * mean,
        "busiest 10 s window {busiest}, mean {mean:.0}: {per_window:?}"
    );
}
