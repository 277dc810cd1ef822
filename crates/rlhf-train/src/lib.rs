//! `rlhf-train`: placeholder until the reward-model jobs land.
