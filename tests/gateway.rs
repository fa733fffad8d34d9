//! `idemkv gateway` with real processes and real HTTP: a small upstream
//! (in this test, counting its calls, slow or failing on request) behind
//! gateway processes, in front of a three-node cluster.
mod support;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HttpClient};
use support::procs::{self, ProcCluster, BIN};

/// The upstream: counts calls per path, the most running at once, and
/// answers `x-delay-ms` late; `/fail` answers 500.
#[derive(Default)]
struct Upstream {
    calls: Mutex<BTreeMap<String, usize>>,
    running: AtomicUsize,
    most_running: AtomicUsize,
}

impl Upstream {
    fn calls(&self, path: &str) -> usize {
        self.calls.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// Decrements `running` even when the gateway hangs up mid-call (the
/// handler is dropped then).
struct Running(Arc<Upstream>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn upstream_handler(
    State(up): State<Arc<Upstream>>,
    req: Request,
) -> axum::response::Response {
    let path = req.uri().path().to_string();
    let n = {
        let mut calls = up.calls.lock().unwrap();
        let c = calls.entry(path.clone()).or_default();
        *c += 1;
        *c
    };
    let now = up.running.fetch_add(1, Ordering::SeqCst) + 1;
    up.most_running.fetch_max(now, Ordering::SeqCst);
    let _running = Running(up.clone());
    let number = |h: &HeaderMap, name: &str| -> u64 {
        h.get(name)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0)
    };
    let (delay, size) = (
        number(req.headers(), "x-delay-ms"),
        number(req.headers(), "x-size"),
    );
    let body = req.into_body().collect().await.unwrap().to_bytes();
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if path == "/big" {
        return (StatusCode::CREATED, "x".repeat(size as usize)).into_response();
    }
    if path == "/fail" {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("boom {n}")).into_response();
    }
    (
        StatusCode::CREATED,
        [
            ("content-type", "application/json".to_string()),
            ("location", format!("{path}/{n}")),
            ("x-not-saved", "1".to_string()),
        ],
        format!(
            "{{\"call\":{n},\"got\":{:?}}}",
            String::from_utf8_lossy(&body)
        ),
    )
        .into_response()
}

async fn start_upstream() -> (SocketAddr, Arc<Upstream>) {
    let up = Arc::new(Upstream::default());
    let app = axum::Router::new()
        .fallback(upstream_handler)
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, up)
}

/// A gateway process; killed when dropped.
struct Gateway {
    child: Child,
    url: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn gateway(cluster: &ProcCluster, upstream: SocketAddr, extra: &[&str]) -> Gateway {
    let mut args = vec![
        "--upstream".to_string(),
        format!("http://{upstream}"),
        "--endpoints".into(),
        cluster.api.join(","),
        "--require-key".into(),
        "/orders".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    spawn_gateway(cluster, &args, &[]).await
}

/// `idemkv gateway --listen <free port> ARGS` with `env` added.
async fn spawn_gateway(cluster: &ProcCluster, args: &[String], env: &[(&str, &str)]) -> Gateway {
    let port = procs::free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(cluster.dir.join(format!("gateway-{port}.log"))).unwrap();
    let mut child = Command::new(BIN)
        .args(["gateway", "--listen", &listen])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&listen).await.is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the gateway exited: {}",
            std::fs::read_to_string(cluster.dir.join(format!("gateway-{port}.log"))).unwrap()
        );
        assert!(Instant::now() < deadline, "the gateway never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Gateway {
        child,
        url: format!("http://{listen}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }
}

fn http() -> HttpClient<HttpConnector, Body> {
    HttpClient::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn send(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = axum::http::Request::builder().method(method).uri(url);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = http()
        .request(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned(),
    }
}

async fn cluster(dir: &std::path::Path) -> ProcCluster {
    let mut c = ProcCluster::new(dir, 3, "");
    c.start_all();
    c.wait_ready(Duration::from_secs(20)).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_request_gets_the_first_response_and_the_upstream_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let gw = gateway(&c, up_addr, &[]).await;
    let orders = format!("{}/orders", gw.url);

    // The same key and body twice: one upstream call, the same answer.
    let first = send("POST", &orders, Some("k-1"), "{\"sku\":1}", &[]).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(!first.replayed());
    let second = send("POST", &orders, Some("k-1"), "{\"sku\":1}", &[]).await;
    assert_eq!(up.calls("/orders"), 1, "the retry reached the upstream");
    assert!(second.replayed(), "{second:?}");
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("location"), first.header("location"));
    assert_eq!(second.header("content-type"), Some("application/json"));
    assert_eq!(
        second.header("x-not-saved"),
        None,
        "only the configured headers are saved"
    );

    // The same key with another body: 422, the upstream not called.
    let other = send("POST", &orders, Some("k-1"), "{\"sku\":2}", &[]).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    assert_eq!(
        other.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(up.calls("/orders"), 1);

    // No key where one is required: 400; elsewhere, and on GET, the
    // request passes through.
    let missing = send("POST", &orders, None, "{}", &[]).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST, "{missing:?}");
    assert_eq!(up.calls("/orders"), 1);
    let long = "k".repeat(256);
    let bad = send("POST", &orders, Some(&long), "{}", &[]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{bad:?}");
    let through = send("POST", &format!("{}/notes", gw.url), None, "x", &[]).await;
    assert_eq!(through.status, StatusCode::CREATED);
    let get = send("GET", &orders, None, "", &[]).await;
    assert_eq!(get.status, StatusCode::CREATED);
    assert_eq!(up.calls("/orders"), 2, "GET passes through");

    // Scoped: the same key from another caller is another request.
    let scoped = gateway(&c, up_addr, &["--scope-header", "authorization"]).await;
    let so = format!("{}/orders", scoped.url);
    let alice = send("POST", &so, Some("k-s"), "a", &[("authorization", "alice")]).await;
    let bob = send("POST", &so, Some("k-s"), "a", &[("authorization", "bob")]).await;
    assert!(!alice.replayed() && !bob.replayed(), "{alice:?} {bob:?}");
    let alice2 = send("POST", &so, Some("k-s"), "a", &[("authorization", "alice")]).await;
    assert!(alice2.replayed());
    assert_eq!(alice2.body, alice.body);

    // A second gateway in front of the same cluster replays the first's.
    let gw2 = gateway(&c, up_addr, &[]).await;
    let via2 = send(
        "POST",
        &format!("{}/orders", gw2.url),
        Some("k-1"),
        "{\"sku\":1}",
        &[],
    )
    .await;
    assert!(via2.replayed());
    assert_eq!(via2.body, first.body);

    // A 500 passes through and releases: the retry calls upstream again.
    let fail = format!("{}/fail", gw.url);
    let f1 = send("POST", &fail, Some("k-f"), "x", &[]).await;
    assert_eq!(f1.status, StatusCode::INTERNAL_SERVER_ERROR);
    let f2 = send("POST", &fail, Some("k-f"), "x", &[]).await;
    assert_eq!(f2.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!f2.replayed());
    assert_eq!(up.calls("/fail"), 2);
    // With --save-5xx it is saved and replayed.
    let keep = gateway(&c, up_addr, &["--save-5xx"]).await;
    let kf = format!("{}/fail", keep.url);
    let s1 = send("POST", &kf, Some("k-f5"), "x", &[]).await;
    let s2 = send("POST", &kf, Some("k-f5"), "x", &[]).await;
    assert_eq!(up.calls("/fail"), 3);
    assert!(
        s2.replayed() && s2.body == s1.body && s2.status == s1.status,
        "{s2:?}"
    );

    // A response over --max-body streams through whole, unsaved but
    // marked; the retry gets its status, marked, and no second call.
    let mport = procs::free_ports(1)[0];
    let metrics = format!("127.0.0.1:{mport}");
    let small = gateway(
        &c,
        up_addr,
        &["--max-body", "1000", "--metrics-listen", &metrics],
    )
    .await;
    let big = format!("{}/big", small.url);
    let b1 = send("POST", &big, Some("k-big"), "x", &[("x-size", "5000")]).await;
    assert_eq!((b1.status, b1.body.len()), (StatusCode::CREATED, 5000));
    assert!(
        b1.header("idempotent-response-unsaved").is_some(),
        "{:?}",
        b1.headers
    );
    let b2 = send("POST", &big, Some("k-big"), "x", &[("x-size", "5000")]).await;
    assert!(b2.replayed() && b2.status == StatusCode::CREATED && b2.body.is_empty());
    assert!(b2.header("idempotent-response-unsaved").is_some());
    assert_eq!(up.calls("/big"), 1);
    // Its outcomes are counted.
    let scrape = send("GET", &format!("http://{metrics}/metrics"), None, "", &[]).await;
    for line in [
        "idemkv_gateway_requests_total{outcome=\"saved\"} 1",
        "idemkv_gateway_requests_total{outcome=\"replayed\"} 1",
    ] {
        assert!(scrape.body.contains(line), "{line} not in {}", scrape.body);
    }
}

/// A response within --max-body but over the store's result limit (1 MiB)
/// is saved as too large to save whole, as one over --max-body is: the
/// retry replays its status and the upstream is called once. Before, the
/// store's refusal left the claim held and unsaved; the retry got 409, and
/// once the lease ran out the upstream ran a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_over_the_stores_result_limit_is_marked_and_never_called_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let gw = gateway(&c, up_addr, &["--max-body", "2000000"]).await;
    let big = format!("{}/big", gw.url);
    let size = [("x-size", "1500000")];
    let first = send("POST", &big, Some("k-over"), "x", &size).await;
    assert_eq!(
        (first.status, first.body.len()),
        (StatusCode::CREATED, 1_500_000)
    );
    let why = first
        .header("idempotent-response-unsaved")
        .unwrap_or_default();
    assert!(why.contains("result limit"), "{:?}", first.headers);
    let again = send("POST", &big, Some("k-over"), "x", &size).await;
    assert!(
        again.replayed() && again.status == StatusCode::CREATED && again.body.is_empty(),
        "{again:?}"
    );
    assert!(again.header("idempotent-response-unsaved").is_some());
    assert_eq!(up.calls("/big"), 1);
}

/// `n` requests at once with one key and body to a slow upstream.
async fn burst(gateway: &str, key: &str, n: usize) -> Vec<Answer> {
    let orders = format!("{gateway}/orders");
    let slow = [("x-delay-ms", "500")];
    futures::future::join_all((0..n).map(|_| send("POST", &orders, Some(key), "same", &slow))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_key_make_one_upstream_call() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let gw = gateway(&c, up_addr, &[]).await;
    let waits = gateway(&c, up_addr, &["--wait", "10s"]).await;

    // 50 at once, no wait: one runs, the others get 409.
    let all = burst(&gw.url, "k-c", 50).await;
    assert_eq!(up.calls("/orders"), 1);
    let created = all
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .count();
    let conflicts = all
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .count();
    assert_eq!(created + conflicts, 50, "{all:?}");
    assert!(created >= 1);
    assert!(conflicts >= 1, "no request met the first in progress");
    let c409 = all
        .iter()
        .find(|a| a.status == StatusCode::CONFLICT)
        .unwrap();
    assert_eq!(
        c409.header("content-type"),
        Some("application/problem+json")
    );

    // 20 at once with --wait: all get the one response.
    let all = burst(&waits.url, "k-w", 20).await;
    assert_eq!(up.calls("/orders"), 2);
    let bodies: std::collections::BTreeSet<&str> = all.iter().map(|a| a.body.as_str()).collect();
    assert_eq!(bodies.len(), 1, "{all:?}");
    assert!(all.iter().all(|a| a.status == StatusCode::CREATED));
    assert_eq!(all.iter().filter(|a| !a.replayed()).count(), 1);
    assert_eq!(up.most_running.load(Ordering::SeqCst), 1);

    // A caller that hangs up mid-request leaves no key stuck in progress:
    // the upstream call finishes and its response is saved for the retry.
    let orders = format!("{}/orders", gw.url);
    let slow = [("x-delay-ms", "800")];
    let hung_up = send("POST", &orders, Some("k-h"), "h", &slow);
    let hung_up = tokio::time::timeout(Duration::from_millis(200), hung_up).await;
    assert!(hung_up.is_err(), "answered before the upstream did");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let retry = send("POST", &orders, Some("k-h"), "h", &[]).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(up.calls("/orders"), 3);
}

/// POST `/orders` through `gw` with `key` and `body`, answered `delay_ms`
/// late upstream, on a task of its own; returns once the upstream has it.
async fn slow_order(
    gw: &Gateway,
    up: &Upstream,
    key: &str,
    body: &str,
    delay_ms: u64,
) -> tokio::task::JoinHandle<Result<StatusCode, hyper_util::client::legacy::Error>> {
    let r = axum::http::Request::builder()
        .method("POST")
        .uri(format!("{}/orders", gw.url))
        .header("idempotency-key", key)
        .header("x-delay-ms", delay_ms.to_string())
        .body(Body::from(body.to_string()))
        .unwrap();
    let call = tokio::spawn(async move { http().request(r).await.map(|r| r.status()) });
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.calls("/orders") == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_request_and_the_store_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let mut dying = gateway(&c, up_addr, &["--lease", "1s"]).await;
    let slow = slow_order(&dying, &up, "k-d", "d", 5000).await;
    dying.child.kill().unwrap();
    dying.child.wait().unwrap();
    assert!(slow.await.unwrap().is_err(), "the killed gateway answered");
    let other = gateway(&c, up_addr, &["--lease", "1s"]).await;
    let orders = format!("{}/orders", other.url);
    // Until the dead gateway's lease runs out: 409; then the retry runs.
    let started = Instant::now();
    let done = loop {
        let a = send("POST", &orders, Some("k-d"), "d", &[]).await;
        match a.status {
            StatusCode::CONFLICT => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the lease never ran out"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => break a,
        }
    };
    assert_eq!(done.status, StatusCode::CREATED, "{done:?}");
    assert_eq!(
        up.calls("/orders"),
        2,
        "at least once: the retry ran upstream again"
    );
    assert_eq!(
        up.most_running.load(Ordering::SeqCst),
        1,
        "never two at once"
    );
    let again = send("POST", &orders, Some("k-d"), "d", &[]).await;
    assert!(again.replayed() && again.body == done.body);

    // idemkv down: 503 with Retry-After, the upstream not called.
    c.kill9_all();
    let calls = up.calls("/orders");
    let down = send("POST", &orders, Some("k-down"), "x", &[]).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{down:?}");
    assert!(down.header("retry-after").is_some());
    assert_eq!(up.calls("/orders"), calls);
}

/// Settings from `--config FILE`, with flags and `IDEMKV_GATEWAY_*` over
/// it; a file with an unknown key or a bad value is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_come_from_a_config_file_with_flags_and_variables_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let file = dir.path().join("gateway.toml");
    let endpoints: Vec<String> = c.api.iter().map(|a| format!("{a:?}")).collect();
    std::fs::write(
        &file,
        format!(
            "upstream = \"http://{up_addr}\"\n\
             endpoints = [{}]\n\
             namespace = \"from-file\"\n\
             methods = \"POST\"\n\
             require_key = [\"/orders\"]\n\
             save_headers = [\"content-type\", \"x-not-saved\"]\n\
             lease = \"5s\"\n",
            endpoints.join(", ")
        ),
    )
    .unwrap();
    let config = ["--config".to_string(), file.display().to_string()];

    // The file alone: its upstream, endpoints, required route and saved
    // headers are the gateway's.
    let gw = spawn_gateway(&c, &config, &[]).await;
    let orders = format!("{}/orders", gw.url);
    let missing = send("POST", &orders, None, "{}", &[]).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST, "{missing:?}");
    let first = send("POST", &orders, Some("k-c"), "a", &[]).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let again = send("POST", &orders, Some("k-c"), "a", &[]).await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(
        again.header("x-not-saved"),
        Some("1"),
        "the file's save_headers"
    );
    assert_eq!(up.calls("/orders"), 1);
    // PATCH is not among the file's methods: it passes through, unclaimed.
    send("PATCH", &orders, Some("k-c"), "a", &[]).await;
    send("PATCH", &orders, Some("k-c"), "a", &[]).await;
    assert_eq!(up.calls("/orders"), 3);

    // A flag wins over the file: another namespace, so the same key is
    // another request there.
    let mut args = config.to_vec();
    args.extend(["--namespace".to_string(), "from-flag".to_string()]);
    let flagged = spawn_gateway(&c, &args, &[]).await;
    let other = send(
        "POST",
        &format!("{}/orders", flagged.url),
        Some("k-c"),
        "a",
        &[],
    )
    .await;
    assert!(!other.replayed(), "{other:?}");
    assert_eq!(up.calls("/orders"), 4);

    // A variable wins over the file: /notes requires a key, /orders not.
    let varied = spawn_gateway(&c, &config, &[("IDEMKV_GATEWAY_REQUIRE_KEY", "/notes")]).await;
    let open = send("POST", &format!("{}/orders", varied.url), None, "b", &[]).await;
    assert_eq!(open.status, StatusCode::CREATED, "{open:?}");
    let notes = send("POST", &format!("{}/notes", varied.url), None, "b", &[]).await;
    assert_eq!(notes.status, StatusCode::BAD_REQUEST, "{notes:?}");

    // A misspelt key or a bad value: the gateway does not start, and
    // says which.
    for (text, says) in [
        ("upstrem = \"http://127.0.0.1:1\"\n", "upstrem"),
        ("lease = \"5 parsecs\"\n", "lease"),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, format!("upstream = \"http://{up_addr}\"\n{text}")).unwrap();
        let out = Command::new(BIN)
            .args(["gateway", "--listen", "127.0.0.1:0", "--config"])
            .arg(&bad)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {text:?}");
        assert!(err.contains(says) && err.contains("bad.toml"), "{err}");
    }
}

/// A gateway paused past its lease while its upstream call runs: another
/// gateway takes the key over and saves its response; when the first
/// wakes, its response is not saved over the one already saved, and every
/// later retry replays the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_that_lost_its_lease_never_saves_over_the_first_response() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let sleepy = gateway(&c, up_addr, &["--lease", "1s"]).await;
    let other = gateway(&c, up_addr, &["--lease", "1s"]).await;
    let first = {
        let orders = format!("{}/orders", sleepy.url);
        tokio::spawn(async move {
            send("POST", &orders, Some("k-p"), "p", &[("x-delay-ms", "2500")]).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.calls("/orders") == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = sleepy.child.id();
    procs::signal_pid(pid, "-STOP");
    assert!(
        procs::stopped_within(pid, Duration::from_secs(5)),
        "the gateway was not stopped: state {:?}",
        procs::process_state(pid)
    );

    // Once its lease runs out, the other gateway's retry runs and is saved.
    let orders = format!("{}/orders", other.url);
    let started = Instant::now();
    let second = loop {
        let a = send("POST", &orders, Some("k-p"), "p", &[]).await;
        if a.status != StatusCode::CONFLICT {
            break a;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the lease never ran out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(second.status, StatusCode::CREATED, "{second:?}");
    assert!(!second.replayed());
    assert_eq!(up.calls("/orders"), 2);

    // The first wakes: its caller gets its own response, which is not saved.
    procs::signal_pid(pid, "-CONT");
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the woken gateway never answered")
        .unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_ne!(first.body, second.body, "both calls answered alike");
    let unsaved = first.header("idempotent-response-unsaved").unwrap_or("");
    assert!(unsaved.contains("lease was lost"), "{first:?}");
    for gw in [&sleepy, &other] {
        let again = send("POST", &format!("{}/orders", gw.url), Some("k-p"), "p", &[]).await;
        assert!(again.replayed(), "{again:?}");
        assert_eq!(
            again.body, second.body,
            "the woken gateway saved over the first save"
        );
    }
    assert_eq!(up.calls("/orders"), 2);
}

/// A caller that hangs up while the gateway's claim is still on its way
/// (the store's leader paused): its retry gets a response, not 409 for
/// the lease's length with the upstream never called, and the upstream
/// is called once for the key. Which request's claim lands first once the
/// leader wakes is a race: the gateway sees the first request through and
/// the retry replays its response, or the retry's claim wins and runs, and
/// the first request's claim then finds the key taken. Either way the
/// response is saved: a later retry replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_gone_before_the_claim_is_granted_gets_the_response_on_retry() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let gw = gateway(&c, up_addr, &[]).await;
    let orders = format!("{}/orders", gw.url);
    // Warm the gateway's connections, then pause the store's leader.
    let warm = send("POST", &orders, Some("k-warm"), "w", &[]).await;
    assert_eq!(warm.status, StatusCode::CREATED, "{warm:?}");
    let leader = c.leader_index().await;
    c.pause(leader);

    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        send("POST", &orders, Some("k-h"), "h", &[]),
    )
    .await;
    assert!(
        gone.is_err(),
        "answered while the leader was paused: {gone:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.signal(leader, "-CONT");

    let started = Instant::now();
    let retry = loop {
        let a = send("POST", &orders, Some("k-h"), "h", &[]).await;
        if a.status != StatusCode::CONFLICT {
            break a;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "409 for 10 s, the upstream called {} times: the claim was left held",
            up.calls("/orders") - 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    let again = send("POST", &orders, Some("k-h"), "h", &[]).await;
    assert!(again.replayed(), "the response was not saved: {again:?}");
    assert_eq!(again.body, retry.body, "{again:?} after {retry:?}");
    assert_eq!(up.calls("/orders"), 2, "the warm-up and the one call");
}

/// An upstream that does not answer within `--upstream-timeout`: 504, and
/// the claim released at once, so the retry runs (not 409 for the lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_past_its_timeout_gets_504_and_the_key_released() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let gw = gateway(&c, up_addr, &["--upstream-timeout", "500ms"]).await;
    let orders = format!("{}/orders", gw.url);
    let started = Instant::now();
    let slow = send("POST", &orders, Some("k-t"), "t", &[("x-delay-ms", "5000")]).await;
    let took = started.elapsed();
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT, "{slow:?}");
    assert_eq!(
        slow.header("content-type"),
        Some("application/problem+json")
    );
    assert!(took < Duration::from_secs(3), "504 after {took:?}");
    let retry = send("POST", &orders, Some("k-t"), "t", &[]).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.replayed());
    assert_eq!(
        up.calls("/orders"),
        2,
        "the retry called the upstream again"
    );
    let again = send("POST", &orders, Some("k-t"), "t", &[]).await;
    assert!(again.replayed() && again.body == retry.body, "{again:?}");
}

/// A request with the Idempotency-Key header twice is refused (400), not
/// guarded by one of them; `--require-key /orders` covers `/orders/7` but
/// not `/orders-archive`; a scope header sent on several lines is hashed
/// whole, so two callers whose first lines match never share a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_doubled_key_is_refused_and_prefixes_and_scopes_count_whole() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let gw = gateway(&c, up_addr, &["--scope-header", "x-tenant"]).await;
    let orders = format!("{}/orders", gw.url);

    let keys = [("idempotency-key", "k-1"), ("idempotency-key", "k-2")];
    let two = send("POST", &orders, None, "a", &keys).await;
    assert_eq!(two.status, StatusCode::BAD_REQUEST, "{two:?}");
    assert!(two.body.contains("more than once"), "{two:?}");
    assert_eq!(up.calls("/orders"), 0);

    let below = send("POST", &format!("{orders}/7"), None, "a", &[]).await;
    assert_eq!(below.status, StatusCode::BAD_REQUEST, "{below:?}");
    let archive = send("POST", &format!("{orders}-archive"), None, "a", &[]).await;
    assert_eq!(archive.status, StatusCode::CREATED, "{archive:?}");
    assert_eq!(up.calls("/orders-archive"), 1);

    let alice = [("x-tenant", "acme"), ("x-tenant", "alice")];
    let mallory = [("x-tenant", "acme"), ("x-tenant", "mallory")];
    let first = send("POST", &orders, Some("k-s"), "a", &alice).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let other = send("POST", &orders, Some("k-s"), "a", &mallory).await;
    assert!(
        !other.replayed(),
        "another caller got the first one's response: {other:?}"
    );
    assert_eq!(up.calls("/orders"), 2);
    let again = send("POST", &orders, Some("k-s"), "a", &alice).await;
    assert!(again.replayed() && again.body == first.body, "{again:?}");
}

/// A gateway stopped (SIGTERM) while a request whose caller hung up is
/// still upstream sees it through before it exits: the response is saved,
/// so the retry through another gateway is a replay at once, and the
/// upstream was called once. (Cut off at exit, the claim stayed held: the
/// retry met 409 for the lease's length, then called the upstream again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_stopped_mid_request_saves_the_response_before_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let mut stopping = gateway(&c, up_addr, &["--lease", "30s"]).await;
    let caller = slow_order(&stopping, &up, "k-t", "t", 1500).await;
    // The caller hangs up, then the gateway is told to stop.
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    // SAFETY: kill(2) on the pid of a child this test owns and has not reaped.
    let sent = unsafe { libc::kill(stopping.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "SIGTERM sent");
    let status = tokio::task::block_in_place(|| stopping.child.wait()).unwrap();
    assert!(status.success(), "the gateway exited cleanly: {status:?}");

    let other = gateway(&c, up_addr, &["--lease", "30s"]).await;
    let retry = send(
        "POST",
        &format!("{}/orders", other.url),
        Some("k-t"),
        "t",
        &[],
    )
    .await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(up.calls("/orders"), 1, "the upstream was called once");
}

/// A request waiting (`--wait`) on another that holds its key learns when
/// that key fails for good (here: the holder's claim released as
/// permanent): 409 "failed for good", not "being processed" with a
/// Retry-After that no retry can satisfy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_request_learns_that_the_key_failed_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let holder = gateway(&c, up_addr, &[]).await;
    let first = slow_order(&holder, &up, "k-w", "w", 3000).await;
    let store = idemkv::Client::new(c.api.iter()).unwrap();
    let record_key = b"- POST /orders k-w".to_vec();
    let rec = store
        .get(idemkv::pb::api::GetRequest {
            namespace: "http".into(),
            key: record_key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .expect("the holder's claim");
    let waiter = gateway(&c, up_addr, &["--wait", "10s"]).await;
    let orders = format!("{}/orders", waiter.url);
    let waiting = tokio::spawn(async move { send("POST", &orders, Some("k-w"), "w", &[]).await });
    // The waiter is inside its Await before the key fails: a claim answers
    // at once, so a request still unanswered after this is waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the waiter answered before the key failed: the wait was not shown"
    );
    store
        .release(idemkv::pb::api::ReleaseRequest {
            namespace: "http".into(),
            key: record_key,
            token: rec.token,
            error: "given up".into(),
            permanent: true,
        })
        .await
        .unwrap();
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
    assert!(answer.body.contains("failed for good"), "{answer:?}");
    assert_eq!(up.calls("/orders"), 1);
    let _ = first.await;
}

/// A request whose body broke off or is malformed (here a bad chunk size)
/// is told so, with 400, not that its body was too large (413, as before);
/// nothing was claimed, so the same key sent whole afterwards runs at once.
/// A body over `--max-body` still gets 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_cannot_be_read_gets_400_and_claims_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let (up_addr, up) = start_upstream().await;
    let gw = gateway(&c, up_addr, &[]).await;
    let orders = format!("{}/orders", gw.url);

    let mut s = tokio::net::TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(
        b"POST /orders HTTP/1.1\r\nhost: gw\r\nidempotency-key: k-broken\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await
    .unwrap();
    // Read until the whole answer is in: its headers and as many body
    // bytes as its content-length says.
    let whole_answer = |got: &[u8]| {
        let text = String::from_utf8_lossy(got).to_ascii_lowercase();
        let Some(head_end) = text.find("\r\n\r\n") else {
            return false;
        };
        let len = text[..head_end]
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        len.is_some_and(|n| got.len() >= head_end + 4 + n)
    };
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !whole_answer(&got) {
        let mut buf = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "no whole answer ({other:?}): {}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("could not be read"), "{text}");
    assert_eq!(up.calls("/orders"), 0);

    let whole = send("POST", &orders, Some("k-broken"), "a", &[]).await;
    assert_eq!(whole.status, StatusCode::CREATED, "{whole:?}");
    assert!(!whole.replayed());
    assert_eq!(up.calls("/orders"), 1);

    let big = send("POST", &orders, Some("k-big"), &"x".repeat(1_100_000), &[]).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE, "{big:?}");
    assert_eq!(up.calls("/orders"), 1);
}
