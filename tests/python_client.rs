//! "The proto is the contract": a Python client generated from
//! `proto/idemkv/v1/api.proto` with grpcio-tools drives a real three-process
//! cluster through claim, complete, replay and the error contract
//! (`clients/python/idemkv_client_test.py`).
//!
//! Needs python3 with venv and pip, and PyPI the first time (the venv is kept
//! in the cargo target dir). Without them it prints "skipping: ..." and
//! passes, unless `IDEMKV_REQUIRE_PYTHON=1`, which turns a skip into a failure.
mod support;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::procs;

use procs::ProcCluster;

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

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
    run(Command::new(venv_python(venv)).args(["-c", "import grpc, grpc_tools.protoc"]))
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

/// `python -m grpc_tools.protoc` on the public proto, into `out`.
fn generate_stubs(python: &Path, out: &Path) {
    let gen = run(Command::new(python)
        .current_dir(root())
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("proto/idemkv/v1/api.proto"))
    .expect("run grpc_tools.protoc");
    assert!(
        gen.status.success(),
        "grpc_tools.protoc failed: {}",
        describe(&gen)
    );
    for f in ["api_pb2.py", "api_pb2_grpc.py"] {
        let p = out.join("idemkv/v1").join(f);
        assert!(p.exists(), "protoc did not write {}", p.display());
    }
}

/// Run the client script against the cluster; kill it if it hangs.
fn run_script(python: &Path, stubs: &Path, endpoints: &str, logs: &Path) -> (bool, String) {
    let stdout = logs.join("python.stdout");
    let stderr = logs.join("python.stderr");
    let mut child = Command::new(python)
        .arg(root().join("clients/python/idemkv_client_test.py"))
        .env("IDEMKV_ENDPOINTS", endpoints)
        .env("PYTHONPATH", stubs)
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PYTHONHOME")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn python");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait python") {
            break Some(s);
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
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
            None => format!("killed: still running after {SCRIPT_TIMEOUT:?}"),
        },
        started.elapsed(),
        std::fs::read_to_string(&stdout).unwrap_or_default(),
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    (status.is_some_and(|s| s.success()), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_generated_from_the_proto_drives_a_cluster() {
    let venv = match venv() {
        Ok(v) => v,
        Err(why) => return skip(&why),
    };
    let python = venv_python(&venv);
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    generate_stubs(&python, &stubs);

    let mut cluster = ProcCluster::new(&dir.path().join("cluster"), 3, "");
    std::fs::create_dir_all(&cluster.dir).unwrap();
    cluster.start_all();
    cluster.wait_ready(Duration::from_secs(30)).await;

    let endpoints = cluster.api.join(",");
    let (ok, output) = run_script(&python, &stubs, &endpoints, dir.path());
    if !ok {
        let logs = (1..=3)
            .map(|i| {
                let p = cluster.dir.join(format!("node-{i}.log"));
                let log = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} (last 40 lines)\n{}", p.display(), tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n");
        panic!("the Python client failed against {endpoints}: {output}\n{logs}");
    }
    eprintln!("{output}");
    cluster.kill9_all();
}
