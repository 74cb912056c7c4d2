//! Adapters to infrastructure, each a small trait with its implementations beside it.
//!
//! - [`db`]: the task store behind [`db::TaskStore`]: SQLite (embedded), PostgreSQL and
//!   MySQL/MariaDB.
//! - [`objectstore`]: code archives and results (a local directory here; S3/COS behind
//!   [`objectstore::ObjectStore`]).
//!
//! Callers pick an implementation from a URL with [`db::open`] and [`objectstore::open`],
//! so configuration alone selects the back-end.

pub mod archive;
pub mod db;
pub mod objectstore;
pub mod process;

pub use db::{StatusChange, StoreError, TaskStore};
pub use objectstore::{ObjectError, ObjectStore};
