//! Project chores: `cargo xtask setup | build | run | test | bench | dist`.
//!
//! Every step is idempotent and installs what it needs itself, so the README's
//! commands work on a fresh machine and CI never depends on a hand-made setup.
mod dist;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain (rust-src, bpf-linker against rustc's own LLVM)
    /// and the test tools; does nothing that is already done.
    Setup,
    /// Set up, then build the agent (with its kernel programs) in release mode.
    Build,
    /// Set up, build, and run the agent in the foreground (needs root).
    /// Arguments after `--` go to `envguard run`; without them it runs the
    /// example policy in audit mode.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test: unit tests, then the root-only integration
    /// tests against the real kernel. Arguments after `--` go to the
    /// integration tests' harness (e.g. a test name filter).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build the agent in release mode and run the benchmarks (needs
    /// root): prints a table, writes BENCHMARKS.md and bench/results.json.
    /// `--quick` is the smoke run CI does; it writes under target/bench-quick/.
    Bench {
        #[arg(long)]
        quick: bool,
    },
    /// Set up, then build the release artifacts into target/dist/: the static
    /// (musl) binary, the tarball, the .deb, the container image (podman) and
    /// SHA256SUMS. `--test` then runs the artifact tests against them (needs
    /// root): install and purge the .deb, run the image under podman.
    Dist {
        #[arg(long)]
        test: bool,
        /// Arguments for the artifact tests' harness (e.g. a name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build => {
            setup::setup()?;
            cargo(&root, &["build", "--release", "-p", "envguard-agent"])
        }
        Cmd::Run { args } => {
            setup::setup()?;
            cargo(&root, &["build", "--release", "-p", "envguard-agent"])?;
            let mut cmd = Command::new(root.join("target/release/envguard"));
            cmd.arg("run");
            if args.is_empty() {
                cmd.args(["--policy", "examples/policy.toml"]);
            } else {
                cmd.args(&args);
            }
            run(cmd.current_dir(&root))
        }
        Cmd::Test { args } => {
            setup::setup()?;
            // SAFETY: geteuid cannot fail.
            if unsafe { libc_geteuid() } != 0 {
                bail!(
                    "the integration tests load eBPF programs and create network namespaces: run `cargo xtask test` as root"
                );
            }
            cargo(
                &root,
                &[
                    "test",
                    "--workspace",
                    "--exclude",
                    "envguard-ebpf",
                    "--exclude",
                    "envguard-tests",
                ],
            )?;
            cargo(&root, &["build", "-p", "envguard-agent"])?;
            let bin = root.join("target/debug/envguard");
            let mut cmd = Command::new("cargo");
            cmd.args(["test", "-p", "envguard-tests", "--"]).args(&args);
            cmd.env("ENVGUARD_BIN", &bin);
            run(cmd.current_dir(&root))
        }
        Cmd::Dist { test, args } => {
            // SAFETY: geteuid cannot fail.
            if test && unsafe { libc_geteuid() } != 0 {
                bail!(
                    "the artifact tests install a package and run containers: run `cargo xtask dist --test` as root"
                );
            }
            let d = dist::dist(&root)?;
            if !test {
                return Ok(());
            }
            let mut cmd = Command::new("cargo");
            cmd.args([
                "test",
                "-p",
                "envguard-tests",
                "--features",
                "dist",
                "--test",
                "dist_deb",
                "--test",
                "dist_image",
                "--",
            ])
            .args(&args);
            cmd.env("ENVGUARD_DIST", &d.dir)
                .env("ENVGUARD_DIST_VERSION", &d.version)
                .env("ENVGUARD_BIN", d.dir.join("envguard"));
            run(cmd.current_dir(&root))
        }
        Cmd::Bench { quick } => {
            // SAFETY: geteuid cannot fail.
            if unsafe { libc_geteuid() } != 0 {
                bail!(
                    "the benchmarks load eBPF programs and create cgroups and network namespaces: run `cargo xtask bench` as root"
                );
            }
            setup::setup()?;
            cargo(&root, &["build", "--release", "-p", "envguard-agent"])?;
            let mut cmd = Command::new("cargo");
            cmd.args([
                "run",
                "--release",
                "-p",
                "envguard-tests",
                "--bin",
                "envguard-bench",
                "--",
            ]);
            if quick {
                cmd.arg("--quick");
            }
            cmd.arg("--agent")
                .arg(root.join("target/release/envguard"))
                .arg("--out")
                .arg(&root);
            run(cmd.current_dir(&root))
        }
    }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(root);
    run(&mut cmd)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
