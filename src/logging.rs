//! Logs (SPEC §8): `tracing` to stderr, as text, as JSON for log shippers, or journald style
//! (one line per event, a syslog priority prefix such as `<4>`, no timestamp, since journald
//! stamps lines itself) when `log_format = "auto"` and `JOURNAL_STREAM` is set.
//!
//! Third-party crates (hyper, h2, reqwest, rustls, tonic, …) are capped at `info` whatever the
//! configured level, because their trace output can carry request headers; a directive naming
//! one of them explicitly still wins. The level can be changed at run time (config reload).

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

/// Crates whose verbose output could show request headers or bodies.
const CAPPED: &[&str] = &[
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
    "tonic",
    "tower",
    "tokio_cron_scheduler",
    "notify",
];

/// Builds the filter for a configured level: the level itself plus the caps above.
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    let mut directives = level.trim().to_string();
    for krate in CAPPED {
        if !level.contains(krate) {
            let cap = if *krate == "tokio_cron_scheduler" {
                "warn"
            } else {
                "info"
            };
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
