//! tokenwarden's integration tests: one crate, one module per part of the daemon.
mod outputs;
mod state;
