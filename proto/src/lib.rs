//! Generated Rust types for the `twopc.v1` gRPC protocol (see `proto/twopc/v1/twopc.proto`).
//!
//! - [`v1`]: messages plus client and server stubs for the `Coordinator` and
//!   `Participant` services.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, served by gRPC reflection.

/// The `twopc.v1` package: messages, `coordinator_client`/`coordinator_server`,
/// `participant_client`/`participant_server`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("twopc.v1");
}

/// Encoded `FileDescriptorSet` of `twopc.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("twopc_v1_descriptor");
