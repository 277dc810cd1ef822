//! `rlhf-proto`: placeholder.
