//! glibc `malloc` settings for a worker process.
//!
//! A training step allocates and frees the same large tensors (activations, gradients, optimizer
//! temporaries: megabytes each) every time. With glibc's defaults, blocks that size are
//! `mmap`ed and unmapped, or the heap is trimmed after they are freed, so every step page-faults
//! and zero-fills its memory again (`clear_page_erms` and `exc_page_fault` in `perf`). Serving
//! blocks up to 32 MiB from the heap and never trimming it keeps the pages mapped after the first
//! step: in an A/B on the 2-core dev machine (RLOO, 20.5M model) the train phase went from 1.13
//! to 1.00 s and the step from 2.17 to 2.01 s (docs/benchmarks.md). The price is that the process
//! keeps its peak heap, which it needs again the next step anyway.

/// The environment variables through which a user sets glibc's malloc tunables directly.
const USER_TUNABLES: [&str; 4] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
];

/// Blocks up to this size come from the heap (glibc's maximum for the threshold on 64-bit).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap kept rather than returned to the system.
const TRIM_THRESHOLD: i32 = i32::MAX;
/// Extra memory requested from the system with each heap growth.
const TOP_PAD: i32 = 256 << 20;

/// Applies the settings above, unless the user set glibc's own variables (their choice wins).
/// Returns what was done, for the log.
pub fn keep_freed_memory() -> &'static str {
    if USER_TUNABLES.iter().any(|v| std::env::var_os(v).is_some()) {
        return "left as set by the environment (MALLOC_*_ / GLIBC_TUNABLES)";
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> &'static str {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
    };
    if ok {
        "freed memory kept for reuse (mmap threshold 32 MiB, no trimming)"
    } else {
        "glibc refused the settings; defaults in use"
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> &'static str {
    "not glibc; allocator defaults in use"
}
