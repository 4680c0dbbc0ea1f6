//! Records where libpython lives so the replica binary starts without `LD_LIBRARY_PATH`.
//!
//! pyo3 tells the linker where to find `libpython3.x.so` but not the dynamic loader; interpreters
//! installed outside the default search path (pyenv, /opt) would otherwise fail at start-up.

fn main() {
    let config = pyo3_build_config::get();
    if let Some(dir) = config.lib_dir() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg-benches=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
}
