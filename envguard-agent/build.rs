//! Builds the kernel programs (`envguard-ebpf`) for the BPF target and leaves
//! the object in OUT_DIR for `include_bytes!`.
//!
//! The BPF toolchain (bpf-linker, rust-src) is installed by `cargo xtask setup`.
//! Without it this script still succeeds and embeds an empty object, so a plain
//! `cargo build` / `cargo test` of the userspace code works anywhere; the binary
//! then refuses `envguard run` with a message saying how to build it properly.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::Context as _;

const OBJECT: &str = "envguard-ebpf";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let ebpf_dir = manifest_dir.join("../envguard-ebpf");
    let common_dir = manifest_dir.join("../envguard-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-env-changed=PATH");

    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        println!(
            "cargo:warning=bpf-linker not found: building envguard without its kernel programs; \
             run `cargo xtask setup` (or `cargo xtask build`) for a working agent"
        );
        fs::write(out_dir.join(OBJECT), b"").context("writing empty object")?;
        return Ok(());
    }

    // The BPF crate needs `-Z build-std=core` on the stable toolchain.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    let root_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to envguard-ebpf")?
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "envguard-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
