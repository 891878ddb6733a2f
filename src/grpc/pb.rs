//! Code generated from `proto/tokenwarden/v1/tokenwarden.proto` (package `tokenwarden.v1`).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("tokenwarden.v1");

/// The encoded FileDescriptorSet of the proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tokenwarden_descriptor.bin"));
