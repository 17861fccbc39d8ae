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

/// `ENVGUARD_COMMIT` for `envguard --version`: the variable if the build sets
/// it (`cargo xtask dist` does), else `git rev-parse --short=12 HEAD` with
/// `-dirty` for uncommitted changes, else `unknown` (a build from a tarball).
fn commit(manifest_dir: &std::path::Path) {
    println!("cargo:rerun-if-env-changed=ENVGUARD_COMMIT");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(manifest_dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = env::var("ENVGUARD_COMMIT").ok().or_else(|| {
        // Rebuild when HEAD moves (a commit, a checkout) or the index changes.
        for p in ["HEAD", "logs/HEAD", "index"] {
            if let Some(path) = git(&["rev-parse", "--git-path", p]) {
                println!(
                    "cargo:rerun-if-changed={}",
                    manifest_dir.join(path).display()
                );
            }
        }
        let head = git(&["rev-parse", "--short=12", "HEAD"])?;
        let dirty =
            git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        Some(if dirty { format!("{head}-dirty") } else { head })
    });
    println!(
        "cargo:rustc-env=ENVGUARD_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".to_owned())
    );
}

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let ebpf_dir = manifest_dir.join("../envguard-ebpf");
    let common_dir = manifest_dir.join("../envguard-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-env-changed=PATH");
    commit(&manifest_dir);
    // `envguard --version` names the target (…-musl for the static build).
    println!(
        "cargo:rustc-env=ENVGUARD_TARGET={}",
        env::var("TARGET").unwrap_or_default()
    );

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
