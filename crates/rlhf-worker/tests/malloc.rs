//! The worker's malloc settings keep freed tensor-sized blocks mapped (its own process: the
//! settings are process-wide).

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Allocates and touches a 16 MiB block, frees it, and returns how much of it left the
/// resident set.
fn released_after_free() -> i64 {
    let mut block = vec![0u8; 16 << 20];
    for i in (0..block.len()).step_by(4096) {
        block[i] = 1;
    }
    std::hint::black_box(&block);
    let before = resident_bytes();
    drop(block);
    before as i64 - resident_bytes() as i64
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn freed_blocks_stay_mapped_after_the_settings_and_not_before() {
    // glibc's default: a 16 MiB block is mmapped and unmapped when freed.
    let released = released_after_free();
    assert!(
        released > 8 << 20,
        "default malloc kept the block ({released} bytes released)"
    );
    let what = rlhf_worker::malloc::keep_freed_memory();
    assert!(what.starts_with("freed memory kept"), "{what}");
    released_after_free(); // the first heap-served block grows the heap
    let released = released_after_free();
    assert!(
        released < 1 << 20,
        "{released} bytes returned to the system after free"
    );
}
