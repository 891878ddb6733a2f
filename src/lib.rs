//! tokenwarden keeps OAuth 2.0 access tokens fresh on Linux hosts.
//!
//! # Layout
//! - [`config`]: the TOML config, raw serde types turned once into checked runtime types.
//! - [`secret`]: redacted secret values and where they come from.
//! - [`keys`]: signing keys for JWT assertions.
//! - [`token`]: an access token with its times and scope.
//! - [`provider`]: a strict built-in OAuth 2.0 token endpoint for the tests and the demo.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod config;
pub mod keys;
pub mod provider;
pub mod secret;
pub mod token;
