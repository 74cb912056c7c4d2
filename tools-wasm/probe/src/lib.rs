//! A hostile guest of the `tool-guest` world, used only by the host's tests: `read-file`
//! spins forever (the CPU limit must stop it) and `search-code` allocates without bound
//! (the memory limit must stop it). Every other function answers normally so a test can
//! check the host goes on after a limit was hit.

wit_bindgen::generate!({
    world: "tool-guest",
    path: "../wit",
});

use exports::patchflow::tools::tools::{
    ApiRequest, ApiResponse, DirListing, DocHit, EditResult, Guest, PatchedFile, ReadResult,
    SearchResult, SourceFile,
};

struct Probe;

impl Guest for Probe {
    fn read_file(_: String, _: Option<u32>, _: Option<u32>) -> Result<ReadResult, String> {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }

    fn search_code(_: String, _: u32, _: Vec<SourceFile>) -> Result<SearchResult, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }

    fn list_dir(_: String, _: u32) -> Result<DirListing, String> {
        Ok(DirListing {
            entries: Vec::new(),
            truncated: false,
        })
    }

    fn edit_file(_: String, _: String, _: String) -> Result<EditResult, String> {
        Err("the probe does not edit".into())
    }

    fn apply_diff(_: String) -> Result<Vec<PatchedFile>, String> {
        Err("the probe does not patch".into())
    }

    fn search_docs(_: Vec<String>, _: u32, _: Vec<SourceFile>) -> Result<Vec<DocHit>, String> {
        Ok(Vec::new())
    }

    fn call_api(_: ApiRequest) -> Result<ApiResponse, String> {
        Err("the probe makes no requests".into())
    }
}

export!(Probe);
