//! Compiles `proto/tokenwarden/v1/tokenwarden.proto` with protox (pure Rust, no system
//! `protoc`) into a FileDescriptorSet, generates the tonic server and client from it, and writes
//! the encoded set to `OUT_DIR` for server reflection.
//!
//! Fleet mode's etcd v3 client is generated the same way from the vendored protos under
//! `proto/etcd` (KV, Watch, Lease and Auth's `Authenticate` only): client stubs, no server, and
//! no system `protoc` either.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tokenwarden/v1/tokenwarden.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tokenwarden_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    println!("cargo:rerun-if-changed=proto/etcd");
    let etcd = protox::compile(["etcdserverpb/rpc.proto"], ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(etcd)?;
    Ok(())
}
