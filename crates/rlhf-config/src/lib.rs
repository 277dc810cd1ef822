//! `rlhf-config`: placeholder until the schema lands.
