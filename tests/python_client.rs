//! The Python package (`clients/python`, import name `idemkv`) against real
//! clusters: its pytest suite (`clients/python/tests`) runs on the package
//! as `pip install` puts it in place, against three `idemkv serve` processes
//! (whose pids it is given, to pause one) and a one-node cluster with TLS,
//! bearer tokens, an Await cap and a small data quota (the refusals only a
//! configured node gives). First, the stubs committed in the package must
//! be what `clients/python/gen.sh` makes from `proto/idemkv/v1/api.proto`.
//!
//! Needs python3 with venv and pip, and PyPI the first time (the venv is kept
//! in the cargo target dir). Without them it prints "skipping: ..." and
//! passes, unless `IDEMKV_REQUIRE_PYTHON=1`, which turns a skip into a failure.
mod support;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::procs;

use idemkv::client::{ClientOptions, ClientTls};
use procs::{ProcCluster, BIN};

const PYTEST_TIMEOUT: Duration = Duration::from_secs(150);

/// Bearer tokens of the secured node: one for every namespace, one for the
/// namespace `other` only.
const TOKEN: &str = "py-full-access-token-0123456789";
const LIMITED_TOKEN: &str = "py-limited-token-0123456789";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Print why the test cannot run and return; or fail when it must run.
fn skip(why: &str) {
    if std::env::var("IDEMKV_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
        panic!("IDEMKV_REQUIRE_PYTHON=1 but: {why}");
    }
    eprintln!("skipping: {why}");
}

fn run(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null()).output()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// Does `venv` hold exactly these requirements, importable?
fn venv_works(venv: &Path, requirements: &str) -> bool {
    let stamp = std::fs::read_to_string(venv.join("idemkv-requirements.txt"));
    if stamp.ok().as_deref() != Some(requirements) {
        return false;
    }
    run(Command::new(venv_python(venv)).args(["-c", "import grpc, grpc_tools.protoc, pytest"]))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The venv with requirements.txt installed: reused when it still works,
/// else built beside it and renamed into place (so concurrent runs never see
/// a half-installed one). `Err` is the reason to skip.
fn venv() -> Result<PathBuf, String> {
    let req_path = root().join("clients/python/requirements.txt");
    let requirements = std::fs::read_to_string(&req_path).expect("read requirements.txt");
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyclient-venv");
    if venv_works(&venv, &requirements) {
        return Ok(venv);
    }
    match run(Command::new("python3").arg("--version")) {
        Ok(o) if o.status.success() => {}
        _ => return Err("python3 is not available".into()),
    }
    let tmp = venv.with_file_name(format!("pyclient-venv.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let made = run(Command::new("python3").arg("-m").arg("venv").arg(&tmp))
        .map_err(|e| format!("python3 -m venv: {e}"))?;
    if !made.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!("python3 -m venv failed: {}", describe(&made)));
    }
    eprintln!("installing {} into {}", req_path.display(), venv.display());
    let started = Instant::now();
    let pip = run(Command::new(venv_python(&tmp))
        .args(["-m", "pip", "install", "--quiet"])
        .arg("--disable-pip-version-check")
        .args(["--timeout", "30", "--retries", "2", "-r"])
        .arg(&req_path))
    .map_err(|e| format!("pip: {e}"))?;
    if !pip.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!(
            "pip install -r requirements.txt failed (no network?): {}",
            describe(&pip)
        ));
    }
    eprintln!("pip install took {:?}", started.elapsed());
    std::fs::write(tmp.join("idemkv-requirements.txt"), &requirements).expect("write stamp");
    let _ = std::fs::remove_dir_all(&venv);
    if std::fs::rename(&tmp, &venv).is_err() {
        // Another run put its venv in place first: use that one.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if venv_works(&venv, &requirements) {
        Ok(venv)
    } else {
        Err(format!("the venv at {} does not work", venv.display()))
    }
}

/// `clients/python/gen.sh --check`: the committed stubs are what the proto
/// gives with the pinned grpcio-tools.
fn check_stubs(python: &Path) {
    let out = run(Command::new("bash")
        .arg(root().join("clients/python/gen.sh"))
        .arg("--check")
        .env("PYTHON", python))
    .expect("run gen.sh --check");
    assert!(
        out.status.success(),
        "the stubs in clients/python/idemkv/v1 drifted from proto/idemkv/v1/api.proto \
         (run clients/python/gen.sh): {}",
        describe(&out)
    );
}

/// `pip install` of a copy of clients/python into `site` (no network: the
/// venv has the build backend and the dependencies), so the tests run on
/// the package as installed and the source tree stays clean.
fn install_package(python: &Path, dir: &Path) -> PathBuf {
    let src = dir.join("pkg-src");
    let copy = run(Command::new("cp")
        .arg("-r")
        .arg(root().join("clients/python"))
        .arg(&src))
    .expect("cp");
    assert!(copy.status.success(), "cp: {}", describe(&copy));
    let site = dir.join("site");
    let pip = run(Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
        ])
        .arg(&site)
        .arg(&src))
    .expect("pip install");
    assert!(
        pip.status.success(),
        "pip install clients/python failed: {}",
        describe(&pip)
    );
    for f in [
        "idemkv/py.typed",
        "idemkv/v1/api_pb2.pyi",
        "idemkv/aio/_client.py",
    ] {
        assert!(site.join(f).exists(), "the installed package lacks {f}");
    }
    site
}

/// `idemkv certs` for one node on loopback: ca.pem, node-1.pem, ...
fn certs(dir: &Path) -> PathBuf {
    let out = run(Command::new(BIN)
        .args([
            "certs",
            "--hosts",
            "localhost,127.0.0.1",
            "--nodes",
            "1",
            "--out",
        ])
        .arg(dir))
    .expect("run idemkv certs");
    assert!(out.status.success(), "idemkv certs: {}", describe(&out));
    dir.to_path_buf()
}

/// One node with TLS, bearer tokens, one Await per namespace and a quota
/// of 6000 bytes.
fn secure_node(dir: &Path) -> (ProcCluster, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let certs = certs(&dir.join("certs"));
    let tokens = dir.join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"full\"\ntoken = \"{TOKEN}\"\nnamespaces = [\"*\"]\n\n\
             [[token]]\nname = \"limited\"\ntoken = \"{LIMITED_TOKEN}\"\nnamespaces = [\"other\"]\n"
        ),
    )
    .unwrap();
    let config = format!(
        "tls_ca = {:?}\nauth_tokens = {:?}\nquota_bytes = 6000\n[caps]\nmax_awaits_per_namespace = 1\n",
        certs.join("ca.pem"),
        tokens
    );
    let mut c = ProcCluster::new(&dir.join("cluster"), 1, &config);
    std::fs::create_dir_all(&c.dir).unwrap();
    let file = |f: &str| certs.join(f).display().to_string();
    c.envs[0] = vec![
        ("IDEMKV_TLS_CERT".into(), file("node-1.pem")),
        ("IDEMKV_TLS_KEY".into(), file("node-1-key.pem")),
    ];
    c.start_all();
    (c, certs.join("ca.pem"))
}

async fn wait_secure_ready(c: &ProcCluster, ca: &Path) {
    let opts = ClientOptions {
        tls: Some(ClientTls::from_files(ca, None, None).expect("CA")),
        token: Some(TOKEN.into()),
        ..ClientOptions::default()
    };
    let client = idemkv::Client::with_options([format!("https://{}", c.api[0])], opts).unwrap();
    if let Err(e) = client.wait_ready(Duration::from_secs(30)).await {
        panic!("{e}; logs in {}", c.dir.display());
    }
}

/// Run pytest on the suite against the clusters; kill it if it hangs.
fn run_pytest(python: &Path, site: &Path, env: &[(&str, String)], dir: &Path) -> (bool, String) {
    let stdout = dir.join("pytest.stdout");
    let stderr = dir.join("pytest.stderr");
    let mut child = Command::new(python)
        .current_dir(dir)
        .args([
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-rfEs",
            "--durations=5",
        ])
        .arg(root().join("clients/python/tests"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PYTHONPATH", site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PYTHONHOME")
        .env_remove("IDEMKV_TLS_CA")
        .env_remove("IDEMKV_AUTH_TOKEN")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn pytest");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait pytest") {
            break Some(s);
        }
        if started.elapsed() > PYTEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = format!(
        "{} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
        match &status {
            Some(s) => s.to_string(),
            None => format!("killed: still running after {PYTEST_TIMEOUT:?}"),
        },
        started.elapsed(),
        std::fs::read_to_string(&stdout).unwrap_or_default(),
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    (status.is_some_and(|s| s.success()), text)
}

fn log_tails(c: &ProcCluster) -> String {
    (1..=c.api.len())
        .map(|i| {
            let p = c.dir.join(format!("node-{i}.log"));
            let log = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("--- {} (last 40 lines)\n{}", p.display(), tail.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_package_passes_its_suite_against_real_clusters() {
    let venv = match venv() {
        Ok(v) => v,
        Err(why) => return skip(&why),
    };
    let python = venv_python(&venv);
    check_stubs(&python);
    let dir = tempfile::tempdir().unwrap();
    let site = install_package(&python, dir.path());

    let mut cluster = ProcCluster::new(&dir.path().join("cluster"), 3, "");
    std::fs::create_dir_all(&cluster.dir).unwrap();
    cluster.start_all();
    let (mut secure, ca) = secure_node(&dir.path().join("secure"));
    cluster.wait_ready(Duration::from_secs(30)).await;
    wait_secure_ready(&secure, &ca).await;

    let pids = (0..3)
        .map(|i| cluster.pid(i).expect("node running").to_string())
        .collect::<Vec<_>>()
        .join(",");
    let env = [
        ("IDEMKV_ENDPOINTS", cluster.api.join(",")),
        ("IDEMKV_TEST_BIN", BIN.to_string()),
        ("IDEMKV_TEST_PIDS", pids),
        ("IDEMKV_TEST_SECURE_ENDPOINT", secure.api[0].clone()),
        ("IDEMKV_TEST_CA", ca.display().to_string()),
        ("IDEMKV_TEST_TOKEN", TOKEN.to_string()),
        ("IDEMKV_TEST_LIMITED_TOKEN", LIMITED_TOKEN.to_string()),
    ];
    let (ok, output) = run_pytest(&python, &site, &env, dir.path());
    // A paused node must not outlive a failed run.
    for i in 0..3 {
        if !cluster.exited(i) {
            cluster.signal(i, "-CONT");
        }
    }
    if !ok {
        panic!(
            "the Python suite failed: {output}\n{}\n{}",
            log_tails(&cluster),
            log_tails(&secure)
        );
    }
    // What ran is the installed package, and nothing was skipped.
    let installed = site.join("idemkv").display().to_string();
    assert!(
        output.contains(&format!("from {installed}")),
        "pytest did not import the installed package ({installed}): {output}"
    );
    assert!(
        !output.contains("skipped") && output.contains(" passed"),
        "tests were skipped or none ran: {output}"
    );
    eprintln!("{output}");
    cluster.kill9_all();
    secure.kill9_all();
}
