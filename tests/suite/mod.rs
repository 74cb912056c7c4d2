mod api;
mod backends;
mod deploy;
mod durability;
mod e2e;
mod failures;
mod grpc;
mod retry;
