//! placeholder until the algorithms land
