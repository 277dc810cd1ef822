//! `rlhf-worker`: the per-node worker daemon.
//!
//! Owns: role instances (actor, critic, reward, reference) and their tch computations
//! ([`roles`], with rule rewards in [`reward_rules`]), one OS thread per role that owns its
//! tensors ([`host`]), the gRPC `Worker` service over them ([`service`]), and the daemon's life:
//! register with the coordinator, heartbeat, serve, stop on SIGTERM ([`daemon`]).
//!
//! Collective groups with peer workers (gradient all-reduce, weight sync) are in [`comm`];
//! the process's malloc settings (freed tensor memory kept for the next step) in [`malloc`];
//! the resident-memory peak of each TrainStep, logged for `rlhf-coord plan`'s check, in [`memory`].
//!
//! May use: rlhf-model, rlhf-algo, rlhf-proto, rlhf-comm, tch, tonic, tokio. Knows nothing of the
//! controller's internals: everything it learns arrives through the proto, and the coordinator
//! never reaches into a worker's memory except through it.

pub mod comm;
pub mod daemon;
pub mod error;
pub mod external_rewards;
pub mod host;
pub mod malloc;
pub mod memory;
pub mod reward_rules;
pub mod roles;
pub mod service;

pub use error::{RoleError, RoleResult};
