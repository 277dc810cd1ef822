//! `rlhf-ckpt`: placeholder until the checkpoint format lands.
