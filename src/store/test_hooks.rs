//! Fault-injection hooks for the robustness suite's power-loss and slow-disk
//! runs, both off unless their environment variable is set.
//!
//! **fsync ledger** (`IDEMKV_TEST_SYNC_LEDGER` names a file).
//! A `kill -9` keeps the page cache, so it never shows an acknowledgement
//! given before its fsync. A power loss would: it drops every byte written
//! since the file's last fsync. With the hook on, each fsync of a log
//! segment appends one line, `<segment path>\t<length>`, where the length
//! is the file's size *before* the fsync began (every byte below it is on
//! disk once the fsync returns). A test that kills the process can then cut
//! each segment back to its last line (and remove segments with no line),
//! which is what the disk would hold after a power cut, and start the node
//! again. Observing only: the hook never changes what is written or when.
//!
//! sled is not ours to cut back file by file, so with the ledger on, each
//! flush+fsync of sled also copies the sled directory, as it stands right
//! after the fsync and before anyone is told it is durable, to
//! `<ledger>.sled-<pid>-<n>`, and then names that copy in `<ledger>.sled`
//! (written whole, then renamed). After a kill the test puts the named copy
//! in place of the sled directory: the state a power cut could leave, since
//! what sled wrote after that fsync may all be gone. (A copy cut short by
//! the kill is never named: the fsync it belonged to was never reported.)
//!
//! **Disk faults** (`IDEMKV_TEST_FSYNC_CONTROL` names a file, read before
//! each fsync of the log and of a snapshot received from the leader):
//! `delay <ms>` stalls the fsync that long first,
//! as a slow disk would; `eio` makes it fail with EIO, as a dying disk
//! would (fsyncgate: the node must not go on as if the data were safe);
//! empty or missing, nothing. Each time it acts, it appends a line to
//! `<control file>.taken` (the test's proof that the fault struck). What
//! is acknowledged, and when relative to its fsync, is unchanged.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

pub const LEDGER_ENV: &str = "IDEMKV_TEST_SYNC_LEDGER";
pub const FSYNC_CONTROL_ENV: &str = "IDEMKV_TEST_FSYNC_CONTROL";

fn ledger() -> Option<&'static Mutex<File>> {
    static LEDGER: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    LEDGER
        .get_or_init(|| {
            let path = std::env::var_os(LEDGER_ENV)?;
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("{LEDGER_ENV}={}: {e}", Path::new(&path).display()));
            Some(Mutex::new(f))
        })
        .as_ref()
}

/// Is the hook on?
pub fn enabled() -> bool {
    ledger().is_some()
}

/// `path` holds at least `len` bytes on disk.
pub fn synced(path: &Path, len: u64) {
    if let Some(l) = ledger() {
        let mut f = l.lock().unwrap_or_else(|p| p.into_inner());
        // One write per line (O_APPEND): a kill never leaves half a line.
        let _ = f.write_all(format!("{}\t{len}\n", path.display()).as_bytes());
    }
}

/// sled's files in `dir` were just flushed and fsynced: keep a copy of the
/// directory for a power-loss test (see the module docs).
pub fn sled_synced(dir: &Path) {
    if !enabled() {
        return;
    }
    let Some(ledger) = std::env::var_os(LEDGER_ENV) else {
        return;
    };
    static LAST: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let with = |suffix: String| {
        let mut p = ledger.clone();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let copy = with(format!(".sled-{}-{n}", std::process::id()));
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if copy_dir(dir, &copy).is_err() {
        let _ = std::fs::remove_dir_all(&copy);
        return;
    }
    let pointer = with(".sled".into());
    let tmp = with(".sled.tmp".into());
    let named = std::fs::write(&tmp, copy.display().to_string())
        .and_then(|()| std::fs::rename(&tmp, &pointer));
    if named.is_ok() {
        if let Some(old) = last.replace(copy) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
}

/// Copy the directory tree `from` to `to` (also used by the tests that
/// roll a data directory back).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

/// Called before each log fsync: stall or fail like a bad disk, if the
/// control file says so.
pub fn before_fsync() -> std::io::Result<()> {
    static CONTROL: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let Some(path) = CONTROL.get_or_init(|| std::env::var_os(FSYNC_CONTROL_ENV).map(Into::into))
    else {
        return Ok(());
    };
    let order = std::fs::read_to_string(path).unwrap_or_default();
    let mut words = order.split_whitespace();
    let taken = || {
        let mut p = path.as_os_str().to_owned();
        p.push(".taken");
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(p) {
            let _ = f.write_all(order.as_bytes());
        }
    };
    match (
        words.next(),
        words.next().and_then(|w| w.parse::<u64>().ok()),
    ) {
        (Some("delay"), Some(ms)) => {
            taken();
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        (Some("eio"), _) => {
            taken();
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        _ => {}
    }
    Ok(())
}
