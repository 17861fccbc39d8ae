use super::*;

fn sample_snapshot() -> Snapshot {
    let d = |src: &str, dst: &str, verdict: &str, count| Decision {
        src_env: src.into(),
        dst_env: dst.into(),
        verdict: verdict.into(),
        mode: "enforce".into(),
        direction: "egress".into(),
        proto: "tcp".into(),
        count,
    };
    Snapshot {
        decisions: vec![
            d("dev", "prod", "denied", 3),
            d("prod", "prod", "allowed", 10),
            d("dev", "prod", "denied", 2),
        ],
        events_emitted: [("violation".into(), 5), ("policy_loaded".into(), 1)].into(),
        events_lost: [("ringbuf".into(), 0), ("queue:file".into(), 7)].into(),
        events_suppressed: 4,
        probe_events: [("violation".into(), 2)].into(),
        control_refused: [("per_uid".into(), 3), ("root".into(), 0)].into(),
        policy_revision: 2,
        version: "0.1.0".into(),
        heartbeat_seconds: 1_800_000_000.5,
    }
}

#[test]
fn renders_every_family_with_merged_sorted_samples() {
    let text = render_app(&sample_snapshot());
    let want = r#"# HELP envguard_decisions_total Connection decisions taken by the kernel programs, counted in the kernel.
# TYPE envguard_decisions_total counter
envguard_decisions_total{src_env="dev",dst_env="prod",verdict="denied",mode="enforce",direction="egress",proto="tcp"} 5
envguard_decisions_total{src_env="prod",dst_env="prod",verdict="allowed",mode="enforce",direction="egress",proto="tcp"} 10
# HELP envguard_events_emitted_total Records written to the event stream, per kind.
# TYPE envguard_events_emitted_total counter
envguard_events_emitted_total{kind="policy_loaded"} 1
envguard_events_emitted_total{kind="violation"} 5
# HELP envguard_events_lost_total Records that could not be delivered, per source (ringbuf, queue:<sink>).
# TYPE envguard_events_lost_total counter
envguard_events_lost_total{source="queue:file"} 7
envguard_events_lost_total{source="ringbuf"} 0
# HELP envguard_events_suppressed_total Records held back by the rate limit.
# TYPE envguard_events_suppressed_total counter
envguard_events_suppressed_total 4
# HELP envguard_probe_events_total Records caused by envguard verify probes (also in envguard_events_emitted_total).
# TYPE envguard_probe_events_total counter
envguard_probe_events_total{kind="violation"} 2
# HELP envguard_control_refused_total Control-socket connections and events subscriptions refused over a limit, per limit.
# TYPE envguard_control_refused_total counter
envguard_control_refused_total{reason="per_uid"} 3
envguard_control_refused_total{reason="root"} 0
# HELP envguard_policy_revision Generation of the policy in force: 1 for the first one loaded, +1 per reload.
# TYPE envguard_policy_revision gauge
envguard_policy_revision 2
# HELP envguard_build_info Always 1; the version label names the envguard build.
# TYPE envguard_build_info gauge
envguard_build_info{version="0.1.0"} 1
# HELP envguard_heartbeat_timestamp_seconds Unix time of the agent's last housekeeping tick (once a second).
# TYPE envguard_heartbeat_timestamp_seconds gauge
envguard_heartbeat_timestamp_seconds 1800000000.5
"#;
    assert_eq!(text, want);
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
    assert_eq!(escape_label("a\nb"), r"a\nb");
    assert_eq!(escape_label("prød ✓"), "prød ✓");
    let mut s = Snapshot::new();
    s.events_lost.insert("queue:we\"ird\\\n".into(), 1);
    let text = render_app(&s);
    assert!(
        text.contains("envguard_events_lost_total{source=\"queue:we\\\"ird\\\\\\n\"} 1\n"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "envguard_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
}

#[test]
fn process_stats_parse() {
    // A command name with spaces and parentheses.
    let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 3 0 12345 100000000 2048 18446744073709551615";
    let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
    let (rss, cpu, start) = parse_process(stat, proc_stat, 100, 4096).unwrap();
    assert_eq!(rss, 2048 * 4096);
    assert!((cpu - 4.0).abs() < 1e-9, "{cpu}");
    assert!((start - 1_700_000_123.45).abs() < 1e-6, "{start}");
    assert_eq!(parse_process("garbage", proc_stat, 100, 4096), None);
    let live = process_stats().expect("/proc/self is readable");
    assert!(live.resident_bytes > 1024 * 1024);
    assert!(live.open_fds >= 3);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        live.start_time_seconds <= now + 1.0 && live.start_time_seconds > now - 86_400.0 * 365.0
    );
    let text = render(&Snapshot::new());
    for name in [
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_start_time_seconds ",
        "process_open_fds ",
    ] {
        assert!(text.contains(&format!("\n{name}")), "{name} in {text}");
    }
}

async fn request(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn start(limits: Limits) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let snapshot = Arc::new(Mutex::new(sample_snapshot()));
    (addr, tokio::spawn(accept_loop(listener, snapshot, limits)))
}

#[tokio::test]
async fn serves_metrics_and_404s_the_rest() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve_listener(listener, Arc::new(Mutex::new(sample_snapshot())));
    let r = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
    assert!(body.starts_with(&render_app(&sample_snapshot())));
    assert!(body.contains("\nprocess_open_fds "));
    // A query string and a bare-LF client are fine.
    let r = request(addr, b"GET /metrics?x=1 HTTP/1.0\n\n").await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    for raw in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET /metricsx HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"HEAD /metrics HTTP/1.1\r\n\r\n",
    ] {
        let r = request(addr, raw).await;
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
    }
    for raw in [&b"GET /metrics\r\n\r\n"[..], b"GET /metrics SPDY/3\r\n\r\n"] {
        let r = request(addr, raw).await;
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
    }
    server.abort();
}

#[tokio::test]
async fn hostile_clients_cost_little() {
    let limits = Limits {
        max_head: 1024,
        read_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        max_connections: 4,
        linger: Duration::from_millis(100),
    };
    let (addr, server) = start(limits).await;
    // An endless head is cut off.
    let r = request(addr, &[b'a'; 4096]).await;
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    // Silent clients take every slot; the next connection is closed at once.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let r = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(r, "", "refused while full");
    assert!(started.elapsed() < Duration::from_millis(250));
    // The silent ones time out and free their slots.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    for mut s in idle {
        let mut out = Vec::new();
        // Closed by the server without a response.
        let _ = s.read_to_end(&mut out).await;
        assert!(out.is_empty());
    }
    server.abort();
}

#[tokio::test]
async fn binding_a_busy_address_fails_with_context() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let err = serve(addr, Arc::new(Mutex::new(Snapshot::new())))
        .await
        .expect_err("address in use");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
