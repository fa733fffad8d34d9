//! What integration tests share: [`inproc`] runs nodes inside the test
//! process (real sled directories, ports the OS picks); [`procs`] runs
//! `idemkv serve` child processes (crash, CLI, fault tests).
pub mod inproc;
pub mod procs;
