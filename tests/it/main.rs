//! tokenwarden's integration tests: one crate, one module per part of the product.
#[allow(dead_code)]
mod support;

mod cli;
mod config;
mod daemon;
mod engine;
mod examples;
mod faults;
mod outputs;
mod provider;
mod schedule;
mod state;
