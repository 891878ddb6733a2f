//! Configuration: the TOML of docs/configuration.md read into checked runtime types.
//!
//! - `types`: the checked types the rest of the crate uses.
//! - `raw`: the serde types of the file, one per table, and the value syntaxes (durations,
//!   modes, scopes, secrets).
//! - `check`: pure checks of single values (URLs, names, cron, headers, timing rules).
//! - `load`: reads the file and its includes with spans, fills in defaults, reads secrets,
//!   parses keys and reports every problem at once, each with its file, line and column.
//! - `error`: [`ConfigError`] / [`ConfigErrors`].
//! - `diff`: what a reload changes, client by client (pure).
//! - `explain`: which keys of a client a reload changed, in words for the log (pure).

mod check;
mod diff;
mod error;
mod explain;
mod load;
mod raw;
mod types;

pub(crate) use check::check_fleet_host as check_fleet_host_name;
pub(crate) use check::check_token_url;
pub use check::is_client_name;
pub use diff::*;
pub use error::{ConfigError, ConfigErrors, did_you_mean};
pub use explain::{KeyChange, changed_keys, describe};
pub(crate) use load::parent_dir;
pub use load::{Layout, Reuse, access_warnings, load, load_reusing, load_str};
pub use types::*;
