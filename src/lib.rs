//! The wiring the `patchflow` binary and `patchflow-bench` share: configuration layers
//! (`settings`), the stores, Temporal, the worker and the gateway (`stack`, `devserver`)
//! and Kafka's place in them (`kafka`). The command line itself is in main.rs.

pub mod devserver;
pub mod kafka;
pub mod settings;
pub mod stack;
