//! tokenwarden's integration tests: one crate, one module per part of the product.
mod outputs;
mod provider;
mod state;
