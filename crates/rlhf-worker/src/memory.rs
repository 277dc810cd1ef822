//! The process's resident memory around a TrainStep, which is what `rlhf-coord plan` estimates
//! (docs/scale.md, "Checked against measured memory").
//!
//! Before a step the kernel's high-water mark of the resident set is reset to the current
//! resident set (`/proc/self/clear_refs`, value 5, Linux 4.0+); after it `VmHWM` of
//! `/proc/self/status` is the step's peak, with the model load (whose memory-mapped
//! safetensors pages are resident next to the copied weights) and earlier phases left out. On
//! CPU that peak is weights, gradients, optimizer state and the step's activations plus the
//! process's own baseline (libtorch's code and threads); on a GPU the tensors are not in it.
//!
//! Hand-written rather than through the `procfs` crate: two lines of one file and one write,
//! where the crate would add a dependency tree to the worker for them.

/// Resident memory of this process over one TrainStep, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepMemory {
    /// The resident set when the step began.
    pub start: u64,
    /// The highest resident set since the step began (since the process started when the
    /// high-water mark could not be reset; see [`StepMemory::since_step`]).
    pub peak: u64,
    /// Whether `peak` covers this step only.
    pub since_step: bool,
}

/// Started before a step, finished after it.
pub struct PeakWatch {
    start: Option<u64>,
    reset: bool,
}

impl PeakWatch {
    /// Resets the high-water mark and reads the resident set.
    pub fn start() -> PeakWatch {
        // clear_refs is writable by the process itself; a kernel without it (or a sandbox that
        // refuses the write) leaves the process-lifetime peak, which `since_step` then says.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        PeakWatch {
            start: status_kib("VmRSS:").map(|k| k * 1024),
            reset,
        }
    }

    /// The step's memory; `None` where `/proc/self/status` has no such lines (not Linux).
    pub fn finish(self) -> Option<StepMemory> {
        Some(StepMemory {
            start: self.start?,
            peak: status_kib("VmHWM:")? * 1024,
            since_step: self.reset,
        })
    }
}

/// The value in KiB of a `/proc/self/status` line such as `VmHWM:   123456 kB`.
fn status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib(&text, key)
}

fn parse_kib(status: &str, key: &str) -> Option<u64> {
    let rest = status.lines().find_map(|l| l.strip_prefix(key))?;
    let mut words = rest.split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_lines_of_proc_status() {
        let s = "Name:\tw\nVmPeak:\t  900 kB\nVmHWM:\t   1234 kB\nVmRSS:\t    567 kB\n";
        assert_eq!(parse_kib(s, "VmHWM:"), Some(1234));
        assert_eq!(parse_kib(s, "VmRSS:"), Some(567));
        assert_eq!(parse_kib(s, "VmSwap:"), None);
        assert_eq!(parse_kib("VmHWM:\t12 MB\n", "VmHWM:"), None);
    }
}
