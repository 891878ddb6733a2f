//! tokenwarden keeps OAuth 2.0 access tokens fresh on Linux hosts.
//!
//! # Layout
//! - [`config`]: the TOML config, raw serde types turned once into checked runtime types.
//! - [`secret`]: redacted secret values and where they come from.
//! - [`keys`]: signing keys for JWT assertions.
//! - [`token`]: an access token with its times and scope.
//! - [`schedule`]: when to refresh a token and how long to back off after a failure (pure).
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod config;
pub mod keys;
pub mod schedule;
pub mod secret;
pub mod token;
