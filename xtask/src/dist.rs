//! `cargo xtask dist`: the release artifacts, in `target/dist/`.
//!
//! - `envguard` — static (`x86_64-unknown-linux-musl`), kernel programs
//!   embedded, stripped; checked: no ELF interpreter, `--version` names a
//!   layout (not "built without kernel programs").
//! - `envguard-<version>-x86_64-linux.tar.gz` — binary, example policy,
//!   systemd unit, JSON Schemas, README, licenses, third-party list and a
//!   `SHA256SUMS` of them all.
//! - `envguard_<version>_amd64.deb` — built with `dpkg-deb` from
//!   `contrib/deb/` (maintainer scripts, control, copyright).
//! - `envguard-<version>-image.tar` — the FROM-scratch image
//!   (`contrib/container/Containerfile`) built with `podman build` as
//!   `localhost/envguard:<version>`, saved as an OCI archive.
//! - `SHA256SUMS` over the artifacts.
//!
//! `--test` then runs the artifact tests (`tests/tests/dist_*.rs`: install
//! and purge the .deb, run the image under podman) against them.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

pub const MUSL: &str = "x86_64-unknown-linux-musl";

pub struct Dist {
    pub dir: PathBuf,
    pub version: String,
}

fn version(root: &Path) -> anyhow::Result<String> {
    let toml = fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    let mut in_package = false;
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package && let Some(v) = line.strip_prefix("version = ") {
            return Ok(v.trim_matches('"').to_owned());
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copies `from` to `to` with `mode`, creating `to`'s directory.
fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

fn write(to: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// The musl target, added with rustup once.
fn musl_target() -> anyhow::Result<()> {
    let installed = stdout(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == MUSL) {
        return Ok(());
    }
    crate::run(Command::new("rustup").args(["target", "add", MUSL]))
}

/// Whether the ELF file has a PT_INTERP program header (a dynamic loader).
fn has_interpreter(elf: &[u8]) -> anyhow::Result<bool> {
    ensure!(
        elf.len() > 64 && elf[..4] == *b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let u = |at: usize, n: usize| -> u64 {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&elf[at..at + n]);
        u64::from_le_bytes(b)
    };
    let (phoff, phentsize, phnum) = (u(32, 8) as usize, u(54, 2) as usize, u(56, 2) as usize);
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        ensure!(at + 4 <= elf.len(), "truncated program headers");
        if u(at, 4) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Builds the static binary and checks it; returns its path.
fn static_binary(root: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    musl_target()?;
    crate::cargo(
        root,
        &[
            "build",
            "--release",
            "--target",
            MUSL,
            "-p",
            "envguard-agent",
        ],
    )?;
    let built = root.join("target").join(MUSL).join("release/envguard");
    let bin = dir.join("envguard");
    install(&built, &bin, 0o755)?;
    crate::run(Command::new("strip").arg("--strip-all").arg(&bin))?;
    let elf = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    ensure!(
        !has_interpreter(&elf)?,
        "{} asks for a dynamic loader: it is not static",
        bin.display()
    );
    let version = stdout(Command::new(&bin).arg("--version"))?;
    ensure!(
        version.contains("layout: layout-"),
        "{} was built without its kernel programs (is bpf-linker installed?):\n{version}",
        bin.display()
    );
    eprintln!(
        "xtask: static binary {} ({} bytes)\n{version}",
        bin.display(),
        elf.len()
    );
    Ok(bin)
}

/// `name version license` of every crate linked into the agent (normal
/// dependencies of envguard-agent, for the musl target).
fn third_party(root: &Path) -> anyhow::Result<String> {
    let meta = stdout(Command::new("cargo").current_dir(root).args([
        "metadata",
        "--format-version",
        "1",
        "--filter-platform",
        MUSL,
    ]))?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("parsing cargo metadata")?;
    let packages = meta["packages"].as_array().context("no packages")?;
    let nodes = meta["resolve"]["nodes"].as_array().context("no resolve")?;
    let start = packages
        .iter()
        .find(|p| p["name"] == "envguard-agent")
        .and_then(|p| p["id"].as_str())
        .context("no envguard-agent package")?;
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![start.to_owned()];
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(node) = nodes.iter().find(|n| n["id"] == id.as_str()) else {
            continue;
        };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            if normal && let Some(d) = dep["pkg"].as_str() {
                todo.push(d.to_owned());
            }
        }
    }
    let mut rows: Vec<String> = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| seen.contains(id)))
        .filter(|p| p["source"].is_string())
        .map(|p| {
            format!(
                "| {} | {} | {} |",
                p["name"].as_str().unwrap_or("?"),
                p["version"].as_str().unwrap_or("?"),
                p["license"].as_str().unwrap_or("see the crate")
            )
        })
        .collect();
    rows.sort();
    Ok(format!(
        "# Third-party code in the envguard binary\n\n\
         The static binary links these crates (from crates.io, each under the \
         license it names; their texts are in the crates' sources) and musl \
         libc (MIT, shipped with Rust's `{MUSL}` target).\n\n\
         | crate | version | license |\n|---|---|---|\n{}\n",
        rows.join("\n")
    ))
}

fn sha256sums(dir: &Path, files: &[&str], out: &Path) -> anyhow::Result<()> {
    let sums = stdout(Command::new("sha256sum").current_dir(dir).args(files))?;
    fs::write(out, sums).with_context(|| format!("writing {}", out.display()))
}

fn tarball(root: &Path, d: &Dist, bin: &Path, commit_time: &str) -> anyhow::Result<PathBuf> {
    let name = format!("envguard-{}-x86_64-linux", d.version);
    let stage = d.dir.join("stage").join(&name);
    fresh_dir(&stage)?;
    install(bin, &stage.join("envguard"), 0o755)?;
    install(
        &root.join("examples/policy.toml"),
        &stage.join("policy.toml"),
        0o644,
    )?;
    install(
        &root.join("contrib/envguard.service"),
        &stage.join("envguard.service"),
        0o644,
    )?;
    for f in ["README.md", "LICENSE-MIT", "LICENSE-APACHE"] {
        install(&root.join(f), &stage.join(f), 0o644)?;
    }
    write(&stage.join("THIRD-PARTY.md"), &third_party(root)?, 0o644)?;
    let mut files = vec![
        "envguard".to_owned(),
        "policy.toml".to_owned(),
        "envguard.service".to_owned(),
        "README.md".to_owned(),
        "LICENSE-MIT".to_owned(),
        "LICENSE-APACHE".to_owned(),
        "THIRD-PARTY.md".to_owned(),
    ];
    let mut schemas: Vec<_> = fs::read_dir(root.join("docs/schemas"))
        .context("listing docs/schemas")?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    schemas.sort();
    for s in schemas {
        install(
            &root.join("docs/schemas").join(&s),
            &stage.join("schemas").join(&s),
            0o644,
        )?;
        files.push(format!("schemas/{s}"));
    }
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    sha256sums(&stage, &refs, &stage.join("SHA256SUMS"))?;
    let out = d.dir.join(format!("{name}.tar.gz"));
    crate::run(
        Command::new("tar")
            .current_dir(stage.parent().context("stage has a parent")?)
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                &format!("--mtime=@{commit_time}"),
                "--use-compress-program=gzip -9n",
                "-cf",
            ])
            .arg(&out)
            .arg(&name),
    )?;
    Ok(out)
}

fn deb(root: &Path, d: &Dist, bin: &Path, commit: &str) -> anyhow::Result<PathBuf> {
    let stage = d.dir.join("stage/deb");
    fresh_dir(&stage)?;
    let contrib = root.join("contrib/deb");
    install(bin, &stage.join("usr/bin/envguard"), 0o755)?;
    let unit = fs::read_to_string(root.join("contrib/envguard.service"))
        .context("reading contrib/envguard.service")?
        .replace("/usr/local/bin/envguard", "/usr/bin/envguard")
        .replace(
            "# Install: copy the binary to /usr/local/bin/envguard and the policy to\n\
             # /etc/envguard/policy.toml, then `systemctl enable --now envguard`.\n",
            "# Installed by the envguard package: review /etc/envguard/policy.toml,\n\
             # then `systemctl enable --now envguard`.\n",
        );
    write(
        &stage.join("lib/systemd/system/envguard.service"),
        &unit,
        0o644,
    )?;
    install(
        &root.join("examples/policy.toml"),
        &stage.join("etc/envguard/policy.toml"),
        0o644,
    )?;
    let doc = stage.join("usr/share/doc/envguard");
    for f in ["README.md", "LICENSE-MIT", "LICENSE-APACHE"] {
        install(&root.join(f), &doc.join(f), 0o644)?;
    }
    install(&contrib.join("copyright"), &doc.join("copyright"), 0o644)?;
    write(&doc.join("THIRD-PARTY.md"), &third_party(root)?, 0o644)?;
    for e in fs::read_dir(root.join("docs/schemas")).context("listing docs/schemas")? {
        let e = e?;
        install(&e.path(), &doc.join("schemas").join(e.file_name()), 0o644)?;
    }
    let du = stdout(
        Command::new("du")
            .args(["-sk", "--apparent-size"])
            .arg(&stage),
    )?;
    let kib = du.split_whitespace().next().unwrap_or("0");
    let control = fs::read_to_string(contrib.join("control"))
        .context("reading contrib/deb/control")?
        .replace("@VERSION@", &d.version)
        .replace("@INSTALLED_SIZE@", kib)
        .replace("@COMMIT@", commit);
    let debian = stage.join("DEBIAN");
    write(&debian.join("control"), &control, 0o644)?;
    write(
        &debian.join("conffiles"),
        "/etc/envguard/policy.toml\n",
        0o644,
    )?;
    for s in ["postinst", "prerm", "postrm"] {
        install(&contrib.join(s), &debian.join(s), 0o755)?;
    }
    let out = d.dir.join(format!("envguard_{}_amd64.deb", d.version));
    crate::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&out),
    )?;
    Ok(out)
}

fn image(root: &Path, d: &Dist, bin: &Path, commit: &str) -> anyhow::Result<PathBuf> {
    let context = d.dir.join("stage/image");
    fresh_dir(&context)?;
    install(bin, &context.join("envguard"), 0o755)?;
    let tag = format!("localhost/envguard:{}", d.version);
    crate::run(
        Command::new("podman")
            .arg("build")
            .arg("-f")
            .arg(root.join("contrib/container/Containerfile"))
            .args(["--build-arg", &format!("VERSION={}", d.version)])
            .args(["--build-arg", &format!("REVISION={commit}")])
            .args(["-t", &tag])
            .arg(&context),
    )?;
    // The image this one replaced under the same tag, now dangling.
    crate::run(Command::new("podman").args([
        "image",
        "prune",
        "-f",
        "--filter",
        "label=org.opencontainers.image.title=envguard",
    ]))?;
    let size =
        stdout(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &tag]))?;
    eprintln!("xtask: image {tag}: {} bytes", size.trim());
    let out = d.dir.join(format!("envguard-{}-image.tar", d.version));
    let _ = fs::remove_file(&out);
    crate::run(
        Command::new("podman")
            .args(["save", "--format", "oci-archive", "-o"])
            .arg(&out)
            .arg(&tag),
    )?;
    Ok(out)
}

/// Builds every artifact into `target/dist/`.
pub fn dist(root: &Path) -> anyhow::Result<Dist> {
    crate::setup::setup()?;
    let d = Dist {
        dir: root.join("target/dist"),
        version: version(root)?,
    };
    fs::create_dir_all(&d.dir).with_context(|| format!("creating {}", d.dir.display()))?;
    let git = |args: &[&str]| stdout(Command::new("git").current_dir(root).args(args));
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?.trim().to_owned();
    let commit_time = git(&["log", "-1", "--format=%ct"])?.trim().to_owned();
    let bin = static_binary(root, &d.dir)?;
    let tar = tarball(root, &d, &bin, &commit_time)?;
    let deb = deb(root, &d, &bin, &commit)?;
    let image = image(root, &d, &bin, &commit)?;
    let names: Vec<String> = [&bin, &tar, &deb, &image]
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    sha256sums(&d.dir, &refs, &d.dir.join("SHA256SUMS"))?;
    fs::remove_dir_all(d.dir.join("stage")).context("removing target/dist/stage")?;
    eprintln!("xtask: artifacts in {}:", d.dir.display());
    for n in &names {
        let len = fs::metadata(d.dir.join(n)).map(|m| m.len()).unwrap_or(0);
        eprintln!("  {n} ({len} bytes)");
    }
    eprintln!("  SHA256SUMS");
    Ok(d)
}
