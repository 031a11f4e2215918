//! Compiles `proto/` with protox (no system `protoc`) and generates the tonic code.
//! The encoded descriptor set is written to OUT_DIR for server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [
        root.join("listen/v1/listen.proto"),
        root.join("pusher/v1/pusher.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // `rpc Connect` would collide with the generated transport `connect(dst)` (E0592).
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
