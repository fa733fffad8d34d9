//! Generated protobuf and gRPC code (see `proto/`).

/// The public client API: services `Idempotency` and `Cluster`.
pub mod api {
    tonic::include_proto!("idemkv.v1");
}

/// Peer-only Raft RPCs.
pub mod peer {
    tonic::include_proto!("idemkv.raft.v1");
}

/// The slice of etcd's v3 API the load tool uses (client side only).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Encoded descriptors of the public API (not the peer RPCs), for server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/idemkv_descriptor.bin"));
