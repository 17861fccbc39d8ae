//! Installs the eBPF toolchain the way it is verified on this machine kind:
//! stable Rust with rust-src (for `-Z build-std=core` under RUSTC_BOOTSTRAP=1)
//! and bpf-linker built against the LLVM that rustc itself ships.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13";

pub fn setup() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    test_tools()?;
    python_tools()?;
    Ok(())
}

/// The manifest checkers, from PyPI, pinned, in a venv of their own under
/// `target/venv` (never the system's Python packages): `kubernetes-validate`
/// (it bundles the Kubernetes JSON schemas, so validation is offline) and
/// `yamllint`. Reinstalled only when the pins change.
pub const PY_TOOLS: [&str; 2] = ["kubernetes-validate==1.37.0", "yamllint==1.38.0"];

pub fn venv_dir() -> PathBuf {
    crate::workspace_root().join("target/venv")
}

fn python_tools() -> anyhow::Result<()> {
    let venv = venv_dir();
    let stamp = venv.join("envguard-tools.stamp");
    let want = PY_TOOLS.join("\n") + "\n";
    if fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str())
        && venv.join("bin/kubernetes-validate").is_file()
        && venv.join("bin/yamllint").is_file()
    {
        return Ok(());
    }
    if !Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        apt_install(&["python3-venv"])?;
    }
    crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    crate::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PY_TOOLS),
    )?;
    fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    crate::run(Command::new("apt-get").arg("update"))?;
    crate::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages),
    )
}

fn output(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output("rustup", &["component", "list", "--installed"])?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    crate::run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn data_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/envguard"))
}

/// rustc's own libLLVM, e.g. `libLLVM.so.22.1-rust-1.95.0-stable`, and the
/// LLVM major version from `rustc -vV`.
fn rustc_llvm() -> anyhow::Result<(PathBuf, String, String)> {
    let sysroot = PathBuf::from(output("rustc", &["--print", "sysroot"])?.trim());
    let lib = sysroot.join("lib");
    let so = fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: is this a rustup toolchain?",
                lib.display()
            )
        })?;
    let vv = output("rustc", &["-vV"])?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV names no LLVM version")?
        .to_owned();
    Ok((lib.join(&so), so, major))
}

fn symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    if fs::read_link(link).ok().as_deref() == Some(target) {
        return Ok(());
    }
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

fn bpf_linker() -> anyhow::Result<()> {
    let (llvm_so, so_name, major) = rustc_llvm()?;
    let prefix = data_dir()?.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    symlink(&llvm_so, &lib.join("libLLVM.so"))?;
    symlink(&llvm_so, &lib.join(&so_name))?;

    // The stamp ties the installed linker to the LLVM it was built against:
    // a toolchain update rebuilds it.
    let stamp = data_dir()?.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} against {so_name}\n");
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_linker && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    crate::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                &format!("^{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
                "--force",
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))
}

/// Tools the tests drive, each installed from Debian only when missing:
/// `ip` (iproute2) for the integration tests' namespaces and veths,
/// `promtool` (prometheus) to check the metrics exposition and test the alert
/// rules, `dot` (graphviz) to render `envguard report --format dot`, and `rsyslogd`
/// (rsyslog) for the syslog sink's end-to-end test (it runs its own rsyslogd
/// with its own config; no system service is needed); for the release
/// artifacts and their tests and the container tests, `podman` with `runc`
/// (crun refuses the hybrid cgroup layout of this machine kind) and
/// `busybox-static` (the containers' root filesystem), `systemd-analyze` (systemd) and
/// `strip` (binutils); rsyslog-relp for the rsyslog relay test.
fn test_tools() -> anyhow::Result<()> {
    let works = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut missing = Vec::new();
    if !works("ip", "-V") {
        missing.push("iproute2");
    }
    // promtool also runs the alert rules' unit tests (contrib/prometheus).
    if !works("promtool", "--version") {
        missing.push("prometheus");
    }
    // `dot` renders `envguard report --format dot` in the report test.
    if !works("dot", "-V") {
        missing.push("graphviz");
    }
    // /usr/sbin is not on every PATH.
    if !works("rsyslogd", "-v") && !works("/usr/sbin/rsyslogd", "-v") {
        missing.push("rsyslog");
    }
    // RELP for the rsyslog relay test (contrib/rsyslog/).
    let relp = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "rsyslog-relp"])
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"installed"));
    if !relp {
        missing.push("rsyslog-relp");
    }
    if !works("podman", "--version") {
        missing.push("podman");
    }
    if !works("runc", "--version") {
        missing.push("runc");
    }
    // The container tests' root filesystem (tests/src/podman.rs): a static
    // busybox needs nothing else inside the container.
    if !std::path::Path::new("/bin/busybox").is_file() {
        missing.push("busybox-static");
    }
    if !works("systemd-analyze", "--version") {
        missing.push("systemd");
    }
    if !works("strip", "--version") {
        missing.push("binutils");
    }
    // The verify tests change a kernel map behind the agent's back with it.
    if !works("bpftool", "version") && !works("/usr/sbin/bpftool", "version") {
        missing.push("bpftool");
    }
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}
