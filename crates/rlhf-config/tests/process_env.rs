//! EnvSource::Process reads the real environment, filtered like injected variables. One test
//! only: it sets process variables, which must not race other tests of this binary.

mod common;
use common::*;

use rlhf_config::{load, EnvSource};

#[test]
fn the_process_environment_is_read_and_filtered() {
    let f = Fixture::new();
    let file = f.write("run.yaml", BASE);
    // Edition 2021: set_var is safe to call; this binary runs no other test concurrently.
    std::env::set_var("RLHF_LOG", "not-config");
    std::env::set_var("RLHF_TRAIN__STEPS", "42");
    let loaded = load(&file, &[], EnvSource::Process).unwrap();
    assert_eq!(loaded.config.train.steps, 42);
    assert_eq!(loaded.config.logging.level, "info");
    std::env::remove_var("RLHF_TRAIN__STEPS");
    let loaded = load(&file, &[], EnvSource::Process).unwrap();
    assert_eq!(loaded.config.train.steps, 100);
    // Injected variables replace the process environment entirely.
    std::env::set_var("RLHF_TRAIN__STEPS", "42");
    let loaded = load(&file, &[], EnvSource::empty()).unwrap();
    assert_eq!(loaded.config.train.steps, 100);
    std::env::remove_var("RLHF_TRAIN__STEPS");
}
