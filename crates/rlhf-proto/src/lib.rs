//! `rlhf-proto`: the wire between the coordinator and the worker daemons.
//!
//! Owns: the code generated from `proto/rlhf/v1/*.proto` by tonic + prost ([`pb`]), the tensor
//! wire format (dtype + shape + little-endian bytes) and its chunking for large payloads
//! ([`wire`]), the run-token check every RPC goes through ([`auth`]), the run's mutual TLS (its
//! CA and certificates in `RUN_DIR/tls/`, and the tonic TLS settings of every server and client:
//! [`tls`]), the explicit message size limits ([`limits`]), how the binaries print an error
//! ([`errors`]), and the conversions between the
//! typed loss, KL and optimizer settings messages and the `rlhf-settings` types ([`settings`]).
//!
//! May use: tonic, prost, tch (for tensor conversion only), rcgen and rustls (certificates),
//! rlhf-settings (serde-only). Knows nothing about the other crates of the workspace: roles,
//! algorithms and the controller build on this, never the other way.

pub mod auth;
pub mod errors;
pub mod settings;
pub mod tls;
pub mod wire;

/// Generated messages and services of package `rlhf.v1`.
pub mod pb {
    tonic::include_proto!("rlhf.v1");
}

/// Message-size limits, set explicitly on every client and server (tonic's default decode limit
/// is 4 MiB, which a rollout batch of long sequences exceeds). Weights never travel in one
/// message: they are streamed in [`limits::WEIGHT_CHUNK_BYTES`] pieces.
pub mod limits {
    /// Largest message either side accepts or sends: 256 MiB.
    pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
    /// Size of one weight chunk in ExportWeights/ImportWeights streams: 4 MiB, small enough to
    /// interleave with other traffic on the HTTP/2 connection.
    pub const WEIGHT_CHUNK_BYTES: usize = 4 << 20;
}

pub use wire::{from_wire, to_wire, WeightAssembler, WireError};
