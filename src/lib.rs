//! tokenwarden keeps OAuth 2.0 access tokens fresh on Linux hosts.
//!
//! # Layout
//! - [`config`]: the TOML config, raw serde types turned once into checked runtime types.
//! - [`secret`]: redacted secret values and where they come from.
//! - [`keys`]: signing keys for JWT assertions.
//! - [`token`]: an access token with its times and scope.
//! - [`oauth`]: token requests for every grant and client authentication, and their answers.
//! - [`outputs`]: token files in each format, written atomically, and `on_change` commands.
//! - [`state`]: the locked state directory: last token and refresh token per client.
//! - [`logging`]: text, JSON or journald-style logs, with third-party crates capped.
//! - [`daemon`]: `tokenwarden run`: refreshers, reloads, signals, systemd.
//! - [`app`]: the commands wired together (`once`).
//! - [`init`]: `tokenwarden init`, an annotated starting config for one client.
//! - [`demo`]: `tokenwarden demo`, one client per seed dialect against the built-in provider.
//! - [`fuzzing`]: the fuzz targets' entry points, also replayed by the tests.
//! - [`provider`]: a strict built-in OAuth 2.0 token endpoint for the tests and the demo.
//! - [`store`]: every client's current token and status, on `watch` channels.
//! - [`refresher`]: one task per client keeping its token fresh.
//! - [`triggers`]: what starts a reload or a stop: signals and watched files, as daemon events.
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/readyz` on `metrics_listen`.
//! - [`systemd`]: sd_notify readiness, status, reload, stop and watchdog.
//! - [`limits`]: every bound the listeners put on their peers (connections, streams, headers,
//!   messages, timeouts) and the descriptor budget.
//! - [`http`]: plain HTTP/1.1 for local programs on `http_socket` and loopback `http_listen`.
//! - [`audit`]: token reads counted, and logged per (uid, executable) when `daemon.audit` is on.
//! - [`grpc`]: the gRPC API on the Unix socket: tokens, status, refreshes, health, reflection.
//! - [`cli`]: the command line (docs/cli.md), and the manual and completions generated from it.
//! - [`client`]: `tokenwarden get`, `status` and `refresh` over the socket.
//! - [`safepath`]: directories reached without following links or trusting what others can write.
//! - [`schedule`]: when to refresh a token and how long to back off after a failure (pure).
//! - [`sys`]: the calls std and nix do not wrap (peer groups, close-on-exec, heap trim), the
//!   crate's only `unsafe` code.
#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod app;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod fleet;
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod init;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod oauth;
pub mod outputs;
pub mod provider;
pub mod refresher;
pub mod safepath;
pub mod schedule;
pub mod secret;
pub mod state;
pub mod store;
pub mod sys;
pub mod systemd;
pub mod token;
pub mod triggers;
