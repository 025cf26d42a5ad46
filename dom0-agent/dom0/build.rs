//! Links dom0 at 1 MiB guest-physical (the hypervisor's loader rule) when built for bare metal.
fn main() {
    println!("cargo:rerun-if-changed=dom0.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-T{dir}/dom0.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
