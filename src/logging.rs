//! Logs (docs/operations.md#logs): `tracing` to stderr, as text, as JSON for log shippers, or
//! journald style (one line per event, a syslog priority prefix such as `<4>`, no timestamp, since
//! journald stamps lines itself) when `log_format = "auto"` and `JOURNAL_STREAM` is set.
//!
//! Third-party crates (hyper, h2, reqwest, rustls, tonic, …) are capped at `info` whatever the
//! configured level, because their trace output can carry request headers; a directive naming
//! one of them (the crate, or a module in it) still wins. rustls-platform-verifier is silenced:
//! it logs a second, context-free ERROR line for a certificate our own error already reports.
//! The level can be changed at run time (config reload).

use std::fmt;
use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

/// Crates whose verbose output could show request headers or bodies (or is only noise), and
/// the most each may log unless the configured level names it.
const CAPPED: &[(&str, &str)] = &[
    ("h2", "info"),
    ("hyper", "info"),
    ("hyper_util", "info"),
    ("iana_time_zone", "info"),
    ("loona_hpack", "info"),
    ("mio", "info"),
    ("notify", "info"),
    ("notify_debouncer_full", "info"),
    ("reqwest", "info"),
    ("rustls", "info"),
    // Its one ERROR ("failed to verify TLS certificate") repeats, without the client or the
    // host, what our own connect error says.
    ("rustls_platform_verifier", "off"),
    ("tokio_cron_scheduler", "warn"),
    ("tokio_util", "info"),
    ("tonic", "info"),
    ("tower", "info"),
];

/// Whether the directives in `level` name `krate`: a directive's target is the crate itself or
/// a module in it (`hyper_util=trace` names `hyper_util`, not `hyper`).
fn names_crate(level: &str, krate: &str) -> bool {
    level.split(',').any(|directive| {
        let target = directive
            .split(['=', '['])
            .next()
            .unwrap_or_default()
            .trim();
        target == krate
            || target
                .strip_prefix(krate)
                .is_some_and(|rest| rest.starts_with("::"))
    })
}

/// Builds the filter for a configured level: the level itself plus the caps above.
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    let mut directives = level.trim().to_string();
    for (krate, cap) in CAPPED {
        if !names_crate(level, krate) {
            directives.push_str(&format!(",{krate}={cap}"));
        }
    }
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| format!("invalid log_level {level:?}: {e}"))
}

/// Lets the daemon change the level after start.
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    /// Applies a new level (from a reloaded config).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let f = filter(level)?;
        self.handle
            .reload(f)
            .map_err(|e| format!("cannot change the log level: {e}"))
    }
}

/// Which style `auto` resolves to here.
pub fn resolve(format: LogFormat) -> LogFormat {
    match format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Auto,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    }
}

/// Installs the global subscriber writing to stderr. `LogFormat::Auto` here means journald.
pub fn init(format: LogFormat, level: &str) -> Result<LogHandle, String> {
    let (filter_layer, handle) = reload::Layer::new(filter(level)?);
    type Base = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;
    let fmt_layer: Box<dyn Layer<Base> + Send + Sync> = match resolve(format) {
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(false)
                .with_writer(std::io::stderr),
        ),
        // Colours only on a terminal: a pipe, a file or journald would keep the escape codes.
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        ),
        LogFormat::Auto => Box::new(
            tracing_subscriber::fmt::layer()
                .event_format(Journald)
                .with_ansi(false)
                .with_writer(std::io::stderr),
        ),
    };
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt_layer)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(LogHandle { handle })
}

/// journald line format: `<PRIORITY>message key=value …` (sd-daemon(3) prefixes).
struct Journald;

/// The syslog priority of a level: err, warning, info, debug.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{}: ", fields)?;
                }
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn third_party_crates_are_capped_unless_named() {
        let f = filter("trace").unwrap().to_string();
        assert!(f.contains("hyper=info"), "{f}");
        assert!(f.contains("tokio_cron_scheduler=warn"), "{f}");
        let f = filter("debug,hyper=trace").unwrap().to_string();
        assert!(!f.contains("hyper=info"), "{f}");
        assert!(f.contains("hyper_util=info"), "{f}");
        // Naming hyper_util (or a module of h2) does not uncap hyper (or h2's neighbours).
        let f = filter("trace,hyper_util=trace,h2::codec=debug")
            .unwrap()
            .to_string();
        assert!(f.contains("hyper=info"), "{f}");
        assert!(!f.contains("hyper_util=info"), "{f}");
        assert!(!f.contains("h2=info"), "{f}");
        let f = filter("trace").unwrap().to_string();
        for cap in [
            "loona_hpack=info",
            "mio=info",
            "rustls_platform_verifier=off",
        ] {
            assert!(f.contains(cap), "{cap} in {f}");
        }
        assert!(filter("info,=[").is_err());
    }

    #[test]
    fn priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::TRACE), 7);
    }
}
