//! tokenwarden's integration tests: one crate, one module per part of the product.
mod attack_listeners;
mod cli;
mod config;
mod crash;
mod daemon;
mod engine;
mod examples;
mod faults;
mod fuzz_corpus;
mod grpc;
mod metrics;
mod outputs;
mod package;
mod provider;
mod pyclient;
mod reload;
mod schedule;
mod state;
#[allow(dead_code)]
mod support;
mod tls;
mod unit;
mod watcher;
