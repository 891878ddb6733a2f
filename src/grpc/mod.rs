//! The gRPC API on `daemon.socket` (SPEC §7).
pub mod pb;
