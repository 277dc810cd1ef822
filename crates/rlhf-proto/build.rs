//! Compiles `proto/rlhf/v1/*.proto` with the protoc from `protoc-bin-vendored`, so building needs
//! no system protoc; and embeds an rpath to libtorch (tch) for this crate's test binaries.
use std::path::PathBuf;

fn main() {
    // Read when the script runs, not when it is compiled: a build script compiled for one
    // checkout may be run for another (worktrees sharing a build directory).
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = PathBuf::from(manifest_dir).join("../../proto");
    let protos: Vec<PathBuf> = ["tensor", "coordinator", "worker"]
        .iter()
        .map(|n| root.join(format!("rlhf/v1/{n}.proto")))
        .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &[root])
        .expect("compile proto/rlhf/v1");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
