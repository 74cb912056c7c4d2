//! patchflow's front doors. [`service::TaskService`] is the one implementation of every
//! operation (submit, get, list, cancel, events, result files); [`http`] maps it onto the
//! HTTP API of the README. The other doors (gRPC, the web page, the Kafka trigger) call the
//! same service, and read submissions with the same types (patchflow-api, [`submit`]), so
//! they answer alike.

pub mod auth;
pub mod error;
pub mod grpc;
pub mod http;
pub mod jwt;
pub mod kafka;
pub mod service;
pub mod submit;
pub mod web;
pub mod webhooks;

pub use error::ServiceError;
pub use service::{RetryMode, ServiceConfig, SubmitOutcome, TaskService, Upload};
