//! The agent's file, search and API tools as a WebAssembly component (world `tool-guest`).
//!
//! The host preopens one directory, the task workspace, at [`ROOT`]; nothing else exists
//! for this guest. Paths from the model are checked lexically first (so the refusal reads
//! well), but the wall is the capability: a symlink or `..` that leads outside fails inside
//! WASI whatever this code does. Outputs are bounded the same way as the native tools'
//! (about 10 KiB / 256 lines with a marker), so the model sees the same shapes.

mod api;
mod diff;
mod files;
mod search;

wit_bindgen::generate!({
    world: "tool-guest",
    path: "../wit",
});

use exports::patchflow::tools::tools::{
    ApiRequest, ApiResponse, DirListing, DocHit, EditResult, Guest, PatchedFile, ReadResult,
    SearchResult, SourceFile,
};

/// Where the host mounts the workspace.
pub const ROOT: &str = "/workspace";
/// What reaches the model from one output: about 10 KiB and 256 lines.
pub const MAX_BYTES: usize = 10 * 1024;
pub const MAX_LINES: usize = 256;

struct Tools;

impl Guest for Tools {
    fn read_file(
        path: String,
        start_line: Option<u32>,
        end_line: Option<u32>,
    ) -> Result<ReadResult, String> {
        files::read_file(&path, start_line, end_line)
    }

    fn list_dir(path: String, max_entries: u32) -> Result<DirListing, String> {
        files::list_dir(&path, max_entries)
    }

    fn edit_file(path: String, old_text: String, new_text: String) -> Result<EditResult, String> {
        files::edit_file(&path, &old_text, &new_text)
    }

    fn apply_diff(diff: String) -> Result<Vec<PatchedFile>, String> {
        diff::apply(&diff)
    }

    fn search_code(
        pattern: String,
        max_hits: u32,
        files: Vec<SourceFile>,
    ) -> Result<SearchResult, String> {
        search::search_code(&pattern, max_hits, &files)
    }

    fn search_docs(
        words: Vec<String>,
        max_results: u32,
        files: Vec<SourceFile>,
    ) -> Result<Vec<DocHit>, String> {
        search::search_docs(&words, max_results, &files)
    }

    fn call_api(request: ApiRequest) -> Result<ApiResponse, String> {
        api::call(request)
    }
}

export!(Tools);
