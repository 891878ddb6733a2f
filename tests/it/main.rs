//! The integration-test crate: one module per area of tokenwarden.
mod schedule;
