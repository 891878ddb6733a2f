//! Configuration: the TOML of SPEC §3 read into checked runtime types.
//!
//! `types` holds the checked types the rest of the crate uses; the loader reads the raw TOML
//! (with spans for error locations), fills in defaults, reads secrets, parses keys and reports
//! every problem at once.

mod types;

pub use types::*;
