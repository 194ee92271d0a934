//! Generates the gRPC bindings from `proto/` with protox (a protobuf compiler in Rust), so the
//! build needs no `protoc`.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The google.protobuf well-known types come with protox.
    let fds = protox::compile(["snapshots.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
