//! `rlhf-worker`: placeholder.
