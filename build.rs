//! Builds the test guest (tests/guest) with a nested cargo, so that `skvm run`
//! can boot it with no arguments and tests and benches find it under target/.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest_dir = manifest_dir.join("tests/guest");
    for input in ["src", "link.ld", "build.rs", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(input).display());
    }

    // OUT_DIR is <target>/<profile>/build/skvm-<hash>/out; keep the guest beside it.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_root = out_dir.ancestors().nth(4).unwrap_or(&out_dir).to_path_buf();
    let guest_target = target_root.join("guest");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--offline", "--target-dir"])
        .arg(&guest_target);
    // The outer build's flags and wrappers (clippy, coverage) are not for the guest:
    // it has its own in tests/guest/.cargo/config.toml.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("failed to run cargo for the test guest");
    if !status.success() {
        panic!("building the test guest in {} failed", guest_dir.display());
    }
    let guest = guest_target.join("release/skvm-test-guest");
    assert!(Path::new(&guest).exists(), "test guest missing at {}", guest.display());
    println!("cargo:rustc-env=SKVM_TEST_GUEST={}", guest.display());
}
