//! Adapters to infrastructure, each a small trait with its implementations beside it.
//!
//! - [`db`]: the task store behind [`db::TaskStore`]: SQLite (embedded), PostgreSQL and
//!   MySQL/MariaDB.
//! - [`objectstore`]: code archives and results behind [`objectstore::ObjectStore`]: a
//!   local directory (embedded) or an S3-compatible service (S3, Tencent COS, MinIO).
//! - [`bus`]: Kafka (rdkafka): the task trigger topic, the results topic and the DLQ.
//! - [`cache`]: hot-path services beside the task store (status cache, idempotency keys,
//!   rate limits, live events), in-process or on Redis, bundled in [`cache::Hot`].
//! - [`forge`]: GitHub and GitLab REST APIs: pull (merge) requests and issue comments.
//! - [`git_remote`]: which git remotes a worker may reach (no private addresses, no
//!   credentials in URLs), checked before git runs.
//! - [`metrics`]: the process's Prometheus metrics.
//! - [`results`]: making a best-of-N candidate's results the task's.
//! - [`status`]: the one way to change a task's status (store, then event and cache).
//!
//! Callers pick an implementation from a URL with [`db::open`] and [`objectstore::open`],
//! so configuration alone selects the back-end.

pub mod archive;
pub mod bus;
pub mod cache;
pub mod db;
pub mod forge;
pub mod git_remote;
pub mod metrics;
pub mod objectstore;
pub mod process;
pub mod results;
pub mod secret_box;
pub mod status;

pub use db::{StatusChange, StoreError, TaskStore};
pub use objectstore::{ObjectError, ObjectStore};
