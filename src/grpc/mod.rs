//! The gRPC API on `daemon.socket` (docs/grpc.md#the-service): `tokenwarden.v1.TokenService`,
//! health and reflection, over a Unix socket whose peers are identified by SO_PEERCRED.
//!
//! - [`pb`]: the code generated from `proto/tokenwarden/v1/tokenwarden.proto`.
//! - [`service`]: the four RPCs over the store, and the one conversion into `tonic::Status`.
//! - [`conn`]: one HTTP/2 connection, served on `h2` directly.
//! - [`fast`]: `GetToken`'s common case answered from an encoded-once answer.
//! - [`access`]: the caller's identity and the pure access rule.
//! - [`server`]: binding the socket (stale file replaced, mode set before anyone can connect),
//!   serving, stopping.
//! - [`authority`]: the per-connection adaptor that lets stock grpcio / grpc-java clients in.
//! - [`writes`]: the per-connection adaptor that sends what h2 writes until a flush in one
//!   system call.

pub mod access;
pub mod authority;
pub mod conn;
pub mod fast;
pub mod pb;
pub mod server;
pub mod service;
pub mod writes;

pub use server::{GrpcServer, ServeError};
