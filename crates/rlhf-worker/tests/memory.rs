//! `PeakWatch` against the process's real resident set. In a process of its own: the other unit
//! tests of the crate (the command reward's pools among them) allocate and free memory on other
//! threads, which moves the resident set between `start` and `finish`.

use rlhf_worker::memory::PeakWatch;

#[cfg(target_os = "linux")]
#[test]
fn the_peak_covers_memory_touched_during_the_step_only() {
    // A first large buffer, touched and freed, raises the lifetime peak; after the reset
    // the peak must be near the current resident set plus what is touched afterwards.
    let big = vec![1u8; 256 << 20];
    std::hint::black_box(&big);
    drop(big);
    let w = PeakWatch::start();
    let small = vec![1u8; 64 << 20];
    std::hint::black_box(&small);
    let m = w.finish().expect("linux has /proc/self/status");
    drop(small);
    assert!(m.peak >= m.start + (60 << 20), "{m:?}");
    if m.since_step {
        assert!(m.peak < m.start + (200 << 20), "{m:?}");
    }
}
