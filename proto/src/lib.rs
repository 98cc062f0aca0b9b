//! Generated Rust types for the `twopc.v1` gRPC protocol (see `proto/twopc/v1/twopc.proto`
//! and, for the operator's `Admin` service, `proto/twopc/v1/admin.proto`).
//!
//! - [`v1`]: messages plus client and server stubs for the `Coordinator`,
//!   `Participant` and `Admin` services.
//! - [`mux`]: batched call streams (the `Pipeline` and `Exchange` RPCs): a calling
//!   [`mux::Session`] and the serving side [`mux::serve`].
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, served by gRPC reflection.
//! - [`example`]: an example application service (not part of the protocol) that joins
//!   its caller's transaction.

/// The `twopc.v1` package: messages, `coordinator_client`/`coordinator_server`,
/// `participant_client`/`participant_server`, `admin_client`/`admin_server`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("twopc.v1");
}

/// Encoded `FileDescriptorSet` of `twopc.v1` (both files), for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("twopc_v1_descriptor");

/// Example application services (see `proto/twopc/example/v1/inventory.proto`): what a
/// service that takes part in its caller's distributed transaction looks like on the
/// wire. They are not part of the coordinator protocol; tests and demos use them to
/// show transaction ids propagated over gRPC (the `twopc-tx-id` metadata entry).
pub mod example {
    /// The `twopc.example.v1` package: the `Inventory` service
    /// (`inventory_client`/`inventory_server`), whose `Reserve` reserves stock for an
    /// order inside the caller's transaction, and its messages.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("twopc.example.v1");

        /// Encoded `FileDescriptorSet` of `twopc.example.v1`, for `tonic-reflection`.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("twopc_example_v1_descriptor");
    }
}

pub mod auth;
pub mod mux;
