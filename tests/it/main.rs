//! tokenwarden's integration tests: one crate, one module per area.
mod config;
