//! The agent crate's integration tests: one binary, the suites under `suite/`.

mod suite;
