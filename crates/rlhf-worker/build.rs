//! Embeds an rpath to the libtorch this crate was built against (reported by torch-sys as
//! `DEP_TCH_LIBTORCH_LIB`), so test binaries run without `LD_LIBRARY_PATH`.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
