//! End-to-end tests: the real `patchflow` binary against a real Temporal dev server, real
//! git and real files, with the scripted model as the only stand-in.

mod suite;
mod support;
