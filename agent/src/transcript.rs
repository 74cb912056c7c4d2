//! `transcript.jsonl`: one JSON object per line for every message, model response and tool
//! call, with timing and token usage. Each line is flushed as it is written, so a run that
//! dies still leaves the transcript up to its last step.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use chrono::Utc;
use serde_json::{Value, json};

pub struct Transcript {
    out: BufWriter<File>,
    /// The conversation turn every entry belongs to (`turn`).
    turn: Option<u32>,
}

impl Transcript {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            out: BufWriter::new(File::create(path)?),
            turn: None,
        })
    }

    /// Stamps every later entry with the turn it belongs to.
    pub fn set_turn(&mut self, turn: u32) {
        self.turn = Some(turn);
    }

    /// Appends one entry of `kind` with `fields`, stamped with the time.
    pub fn write(&mut self, kind: &str, fields: Value) {
        let mut entry = json!({ "type": kind, "ts": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true) });
        if let (Some(turn), Some(obj)) = (self.turn, entry.as_object_mut()) {
            obj.insert("turn".into(), turn.into());
        }
        if let (Some(obj), Value::Object(extra)) = (entry.as_object_mut(), fields) {
            obj.extend(extra);
        }
        // A transcript write failing (disk full) must not end the run; the log says so.
        if let Err(e) = writeln!(self.out, "{entry}").and_then(|_| self.out.flush()) {
            tracing::warn!(error = %e, "cannot write transcript entry");
        }
    }
}
