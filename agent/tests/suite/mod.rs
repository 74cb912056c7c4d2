//! Hostile tests of the sandboxed tools: the WebAssembly file/search/API tools and the
//! shell sandbox, each asserting the refusal and its message.

mod call_api;
mod instructions;
mod shell_sandbox;
mod support;
mod wasm_limits;
mod wasm_tools;
