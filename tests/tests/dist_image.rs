//! The container image (`contrib/container/Containerfile`, FROM scratch with
//! the static binary), run under podman the way the DaemonSet in
//! `contrib/kubernetes/daemonset.yaml` runs it: host PID, cgroup, network and
//! UTS namespaces, not privileged but the capabilities the README lists, a
//! read-only root, the host's bpffs and cgroup2 mounts, the host's
//! `/run/envguard` for the control socket, and the policy — a directory, like
//! the ConfigMap volume — mounted read-only.
//!
//! The test builds its own image (`localhost/envguard-t-<pid>-<n>`) from the
//! static binary `cargo xtask dist` made (`ENVGUARD_DIST`), and names its
//! containers the same way; both are removed on drop. The agent in the
//! container gets the test's own pin root and cgroup tree (`--pin-root`,
//! `--cgroup-root`), never the host's `/sys/fs/bpf/envguard` or root cgroup.
//!
//! It shows: a dev cgroup on the host is refused to prod; `envguard status`
//! on the host works through the socket the container made; the container
//! stopped (SIGTERM through `podman run`) and run again adopts the pinned
//! programs, and a dev→prod loop running across the restart never connects
//! while a prod→prod loop never fails. It prints the image size and the time
//! from `podman run` to `policy_loaded`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use envguard_tests::sinks::TempDir;
use envguard_tests::{Agent, AgentOptions, Client, Family, Lab, Mode, Proto, Site, sys};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const RATE: u32 = 200;
const WAIT: Duration = Duration::from_secs(10);
/// The capabilities the README (and the DaemonSet) list.
const CAPS: &str = "CAP_BPF,CAP_NET_ADMIN,CAP_SYS_ADMIN,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH,CAP_SYS_RESOURCE,CAP_PERFMON";

fn dist_dir() -> PathBuf {
    let dir = std::env::var_os("ENVGUARD_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "ENVGUARD_DIST is not set: run the artifact tests with `cargo xtask dist --test`"
            )
        });
    assert!(
        dir.join("envguard").is_file(),
        "no static binary at {}: run `cargo xtask dist` first",
        dir.join("envguard").display()
    );
    dir
}

fn podman() -> Command {
    let ok = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "podman is missing: install it (and runc) with `cargo xtask setup`"
    );
    let mut c = Command::new("podman");
    // crun refuses this machine kind's hybrid cgroup layout.
    c.args(["--runtime", "runc"]);
    c
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A locally built image, removed on drop.
struct Image {
    tag: String,
}

impl Image {
    fn build(bin: &Path) -> Image {
        let ctx = TempDir::new();
        std::fs::copy(bin, ctx.join("envguard")).expect("copy the static binary");
        let tag = format!("localhost/{}:test", sys::unique_name("envguard-t"));
        let containerfile =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/container/Containerfile");
        let image = Image { tag };
        run_ok(
            podman()
                .args(["build", "-q", "-f"])
                .arg(&containerfile)
                .args(["-t", &image.tag])
                .arg(ctx.path()),
            "podman build",
        );
        image
    }

    fn size(&self) -> u64 {
        run_ok(
            podman().args(["image", "inspect", "--format", "{{.Size}}", &self.tag]),
            "podman image inspect",
        )
        .trim()
        .parse()
        .expect("image size")
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman().args(["rmi", "-f", &self.tag]).output();
    }
}

/// A container name, `podman rm -f`'d on drop should the test stop short.
struct ContainerName(String);

impl Drop for ContainerName {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "--ignore", &self.0]).output();
    }
}

/// A script that runs the image as the DaemonSet would, with the `envguard`
/// arguments the harness passes (`run --policy … --pin-root …`), so the
/// harness's [`Agent`] drives a containerised agent: SIGTERM reaches it
/// through `podman run`'s signal proxy, its stdout is the container's.
fn wrapper(dir: &TempDir, image: &Image, name: &str, policy_dir: &Path) -> PathBuf {
    let cg2 = sys::cgroup2_mount().display().to_string();
    let policy = policy_dir.display();
    let script = format!(
        "#!/bin/sh\nexec podman --runtime runc run --rm --name {name} \
         --pid=host --cgroupns=host --network=host --uts=host \
         --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
         --cap-drop=all --cap-add={CAPS} --security-opt no-new-privileges --read-only \
         -v /sys/fs/bpf:/sys/fs/bpf -v {cg2}:{cg2} -v /run/envguard:/run/envguard \
         -v {policy}:{policy}:ro {tag} \"$@\"\n",
        tag = image.tag
    );
    let path = dir.join("podman-envguard");
    std::fs::write(&path, script).expect("write the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn count(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {field:?} in {v}"))
}

#[test]
fn image_enforces_reports_and_restarts_without_a_gap() {
    let dist = dist_dir();
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any], 9000);
    let image = Image::build(&dist.join("envguard"));
    let image_bytes = image.size();

    // The policy as a directory, like the ConfigMap volume.
    let tmp = TempDir::new();
    let policy_dir = tmp.join("policy.d");
    std::fs::create_dir(&policy_dir).expect("mkdir policy.d");
    std::fs::write(
        policy_dir.join("00-lab.toml"),
        lab.policy_text(&Default::default()),
    )
    .expect("write the policy");
    std::fs::create_dir_all("/run/envguard").expect("mkdir /run/envguard");
    let name = ContainerName(sys::unique_name("envguard-t"));
    let script = wrapper(&tmp, &image, &name.0, &policy_dir);
    let opts = AgentOptions::pinned().binary(&script);
    let start = |opts: &AgentOptions| {
        let t = Instant::now();
        let a = Agent::start(
            &policy_dir,
            &lab.cg.rel(""),
            Mode::Enforce,
            lab.pin_root().path(),
            opts,
        );
        (a, t.elapsed())
    };

    let (agent, first_start) = start(&opts);
    assert_eq!(
        agent.ready_line()["adopted"],
        false,
        "a first start adopts nothing"
    );
    let prod = SocketAddr::new(Site::Prod.addr(Family::V4), 9000);
    let r = lab.probe(Client::Dev, Proto::Tcp, prod, 1500);
    assert!(
        r.is_refused(),
        "dev -> prod must be refused (EPERM) by the containerised agent: {}",
        r.raw
    );
    let ok = lab.probe(Client::Prod, Proto::Tcp, prod, 3000);
    assert!(ok.ok, "prod -> prod must connect: {}", ok.raw);
    agent.wait_for("the dev -> prod violation record", WAIT, |v| {
        v["kind"] == "violation" && v["verdict"] == "denied"
    });

    // `envguard status` on the host, through the socket in the host's /run/envguard.
    let status = agent.status();
    assert_eq!(status["mode"], "enforce", "status --json: {status}");
    assert_eq!(
        status["revision"],
        agent.ready_line()["revision"],
        "status names the policy_loaded revision: {status}"
    );
    assert_eq!(
        status["policy"],
        policy_dir.display().to_string(),
        "{status}"
    );
    // Host PID namespace: the pid the agent reports is its pid on the host.
    let pid = status["pid"].as_u64().expect("status pid") as u32;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    assert!(
        exe.ends_with("usr/bin/envguard"),
        "status pid {pid} must be the containerised agent on the host, /proc/{pid}/exe is {}",
        exe.display()
    );
    let before = lab.footprint();

    // Stop the container and run it again while loops run.
    let dev = lab.connect_loop(Client::Dev, prod, RATE);
    let prd = lab.connect_loop(Client::Prod, prod, RATE);
    dev.wait_attempts(40, WAIT);
    prd.wait_attempts(40, WAIT);
    let stop_ns = sys::mono_ns();
    agent.stop();
    let now = dev.latest().map_or(0, |v| count(&v, "attempts"));
    dev.wait_attempts(now + 20, WAIT);
    let (agent, restart) = start(&opts.clone().adopting());
    let ready_ns = sys::mono_ns();
    let now = dev.latest().map_or(0, |v| count(&v, "attempts"));
    dev.wait_attempts(now + 40, WAIT);
    let d = dev.finish();
    let p = prd.finish();
    let during_gap = envguard_tests::process::attempts_between(&d, stop_ns, ready_ns);
    eprintln!(
        "image {}: {image_bytes} bytes ({:.1} MiB); podman run -> policy_loaded: {:.0} ms (first start), \
         {:.0} ms (restart, adopted); dev->prod {} attempts, {} connected, {} EPERM, {during_gap} between \
         the stop and the new policy_loaded; prod->prod {}/{} ok",
        image.tag,
        image_bytes as f64 / 1048576.0,
        first_start.as_secs_f64() * 1e3,
        restart.as_secs_f64() * 1e3,
        count(&d, "attempts"),
        count(&d, "connected"),
        count(&d, "eperm"),
        count(&p, "ok"),
        count(&p, "attempts"),
    );
    assert_eq!(
        agent.ready_line()["adopted"],
        true,
        "the restarted container must adopt the pinned state"
    );
    assert_eq!(
        lab.footprint().link_progs(),
        before.link_progs(),
        "the restarted container must keep the pinned links and programs"
    );
    assert!(
        count(&d, "connected") == 0
            && count(&d, "ok") == 0
            && count(&d, "eperm") == count(&d, "attempts"),
        "dev -> prod got through (or failed otherwise than EPERM) across the container's restart: {d}"
    );
    assert!(
        count(&p, "ok") == count(&p, "attempts") && count(&p, "attempts") > 0,
        "prod -> prod failed across the container's restart: {p}"
    );
    assert!(
        during_gap > 0,
        "no dev -> prod attempt fell between the stop and the new policy_loaded: the test proved nothing"
    );
    let status = agent.status();
    assert_eq!(
        status["adopted"], true,
        "status after the restart: {status}"
    );
    agent.stop();
}
