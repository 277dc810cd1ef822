//! libtorch's CUDA support, loaded when a CUDA device is first asked for.
//!
//! libtorch's CUDA kernels and device hooks live in `libtorch_cuda.so` and register themselves
//! when it is loaded. Nothing here references a symbol of it, so the linker (with `--as-needed`)
//! would drop it from the binaries; linking it anyway would make every process, CPU-only runs
//! too, map libtorch's CUDA libraries at start: +0.13 s per process start on the 2-core dev
//! machine (median of 8, quiet; more under load), paid by every worker and CLI call. Instead
//! [`check_device`] opens it on first use of a CUDA device: by its plain name, which the
//! binaries' rpath to their libtorch (each crate's `build.rs`) or `LD_LIBRARY_PATH` resolves.

use std::ffi::CStr;
use std::sync::OnceLock;

use tch::Device;

use crate::error::{ModelError, Result};

const LIBRARY: &CStr = c"libtorch_cuda.so";

/// Opens `libtorch_cuda.so` once per process; later calls return the first answer.
pub fn load() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: dlopen of libtorch's own CUDA library, whose static initialisers only
            // register kernels and hooks with the libtorch already loaded; the handle is never
            // closed. dlerror is read on the same thread right after the failing call.
            unsafe {
                let handle = libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
                if handle.is_null() {
                    let msg = libc::dlerror();
                    let msg = if msg.is_null() {
                        "unknown error".to_string()
                    } else {
                        CStr::from_ptr(msg).to_string_lossy().into_owned()
                    };
                    return Err(msg);
                }
            }
            Ok(())
        })
        .clone()
}

/// Makes `device` usable and checks that it exists: for `cuda:N`, loads libtorch's CUDA
/// library (once) and checks that libtorch sees more than N devices. The CPU always passes.
pub fn check_device(device: Device) -> Result<()> {
    let Device::Cuda(index) = device else {
        return Ok(());
    };
    let bad = |msg: String| ModelError::InvalidArgument {
        key: "device",
        value: format!("cuda:{index}"),
        msg,
    };
    load().map_err(|e| {
        bad(format!(
            "this libtorch has no usable CUDA library ({e}); install a CUDA build of PyTorch \
             2.11 (scripts/setup-torch.sh installs the default PyPI wheel, which has CUDA) or \
             put its torch/lib on LD_LIBRARY_PATH"
        ))
    })?;
    let count = tch::Cuda::device_count();
    if index as i64 >= count {
        return Err(bad(format!(
            "libtorch sees {count} CUDA device(s) (check the driver, nvidia-smi and \
             CUDA_VISIBLE_DEVICES) and CUDA devices are numbered from 0"
        )));
    }
    Ok(())
}

/// The device of the device tests (`tests/device.rs` of rlhf-model and rlhf-algo): GPU 0 when
/// `RLHF_TEST_CUDA=1` (panicking, with the cause, when it cannot be used), the CPU otherwise.
pub fn test_device() -> Device {
    if std::env::var("RLHF_TEST_CUDA").as_deref() != Ok("1") {
        return Device::Cpu;
    }
    if let Err(e) = check_device(Device::Cuda(0)) {
        panic!("RLHF_TEST_CUDA=1 but {e}");
    }
    Device::Cuda(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_needs_nothing_and_a_missing_gpu_is_named() {
        check_device(Device::Cpu).unwrap();
        // No machine has 1000 GPUs: whether or not CUDA loads here, the error names the device.
        let e = check_device(Device::Cuda(1000)).unwrap_err().to_string();
        assert!(e.contains("`device` = cuda:1000"), "{e}");
        assert!(
            e.contains("CUDA device(s)") || e.contains("no usable CUDA library"),
            "{e}"
        );
    }
}
