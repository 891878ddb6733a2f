//! tokenwarden's integration tests: one crate, one module per part of the product.
mod config;
mod outputs;
mod provider;
mod state;
