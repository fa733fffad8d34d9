//! The commands' lines to standard output and standard error, for
//! commands whose reader may go away: `idemkv ctl status | head -1`, a log
//! pipe that closed, `idemkv up 2>&1 | head`. `println!` and `eprintln!`
//! panic there; a long-running `idemkv up` would stop its whole cluster
//! over a line of output. A leaf: it uses nothing of the crate, and the
//! binary and the bench tool share it.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static OUTPUT_LOST: AtomicBool = AtomicBool::new(false);

/// Write one line to standard output, as `println!` does, except that a
/// reader that went away does not stop the command: the line is dropped,
/// the command goes on, and [`output_lost`] says so, for its exit code.
/// Any other failure to write (a full disk under a redirect) still panics,
/// as `println!` does: the output the user asked for would be silently
/// cut.
pub fn print_line(line: std::fmt::Arguments<'_>) {
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => OUTPUT_LOST.store(true, Ordering::Relaxed),
        Err(e) => panic!("failed printing to stdout: {e}"),
    }
}

/// Write one line to standard error, as `eprintln!` does, except that a
/// failure to write is not a panic: the line is dropped. What goes there is
/// an error or a warning, and a panic would only replace it with another
/// message to the same closed stream and a different exit code.
pub fn print_error_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Whether [`print_line`] dropped a line because its reader went away.
pub fn output_lost() -> bool {
    OUTPUT_LOST.load(Ordering::Relaxed)
}
