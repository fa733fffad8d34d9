//! The robustness suite's parts: recorded histories, their checker, the
//! network lab for partitions, the `run_once` workers and their check.
#![allow(dead_code)]

pub mod checker;
pub mod history;
pub mod model;
pub mod netlab;
pub mod once;
