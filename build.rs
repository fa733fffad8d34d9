//! Generates the gRPC code from `proto/` with protox (pure Rust), so no system
//! `protoc` is needed. The public API's descriptor set is kept for server
//! reflection.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/idemkv/v1/api.proto", "proto/idemkv/v1/raft.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection shows clients the public API only, never the peer RPCs.
    let public = protox::compile(["proto/idemkv/v1/api.proto"], ["proto"])?;
    std::fs::write(out.join("idemkv_descriptor.bin"), public.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // The slice of etcd's API that `idemkv bench --target etcd` speaks.
    let etcd = "proto/etcd/kv_subset.proto";
    println!("cargo:rerun-if-changed={etcd}");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(protox::compile([etcd], ["proto"])?)?;
    Ok(())
}
