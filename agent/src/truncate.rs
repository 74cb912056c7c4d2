//! Bounded text for the model: long outputs keep their head and tail with a marker in
//! between saying how much was cut, so the model sees both the start of a log and the
//! error at its end.

/// What reaches the model from one output: about 10 KiB and 256 lines.
pub const MAX_BYTES: usize = 10 * 1024;
pub const MAX_LINES: usize = 256;

/// Cuts `text` to at most `max_bytes` and `max_lines`, keeping head and tail. Returns the
/// text and whether anything was cut.
pub fn head_tail(text: &str, max_bytes: usize, max_lines: usize) -> (String, bool) {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    if text.len() <= max_bytes && lines.len() <= max_lines {
        return (text.to_string(), false);
    }
    let half_bytes = max_bytes / 2;
    let half_lines = max_lines / 2;
    let mut head = String::new();
    let mut head_n = 0;
    for l in &lines {
        if head_n >= half_lines || head.len() + l.len() > half_bytes {
            break;
        }
        head.push_str(l);
        head_n += 1;
    }
    let mut tail_parts: Vec<&str> = Vec::new();
    let mut tail_len = 0;
    for l in lines[head_n..].iter().rev() {
        if tail_parts.len() >= half_lines || tail_len + l.len() > half_bytes {
            break;
        }
        tail_len += l.len();
        tail_parts.push(l);
    }
    // A single huge line: keep its ends by characters.
    if head.is_empty() && tail_parts.is_empty() {
        let start: String = text.chars().take(half_bytes / 2).collect();
        let end: String = {
            let v: Vec<char> = text.chars().rev().take(half_bytes / 2).collect();
            v.into_iter().rev().collect()
        };
        let cut = text.len() - start.len() - end.len();
        return (
            format!("{start}\n[... {cut} bytes truncated ...]\n{end}"),
            true,
        );
    }
    tail_parts.reverse();
    let tail: String = tail_parts.concat();
    let cut_lines = lines.len() - head_n - tail_parts.len();
    let cut_bytes = text.len() - head.len() - tail.len();
    let mut out = head;
    if !out.ends_with('\n') && !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&format!(
        "[... {cut_lines} lines ({cut_bytes} bytes) truncated ...]\n"
    ));
    out.push_str(&tail);
    (out, true)
}

/// Collects a stream's bytes keeping only the first and last `cap` bytes, so a command
/// that prints gigabytes costs bounded memory.
#[derive(Debug, Default)]
pub struct CappedBuffer {
    cap: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    total: usize,
}

impl CappedBuffer {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len();
        if self.head.len() < self.cap {
            let n = (self.cap - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        for &b in bytes {
            if self.tail.len() == self.cap {
                self.tail.pop_front();
            }
            self.tail.push_back(b);
        }
    }

    /// The kept text; a marker stands where bytes were dropped.
    pub fn into_string(self) -> String {
        let kept = self.head.len() + self.tail.len();
        let mut out = String::from_utf8_lossy(&self.head).into_owned();
        if self.total > kept {
            out.push_str(&format!(
                "\n[... {} bytes truncated ...]\n",
                self.total - kept
            ));
        }
        let tail: Vec<u8> = self.tail.into_iter().collect();
        out.push_str(&String::from_utf8_lossy(&tail));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_head_and_tail_with_a_marker() {
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let (out, cut) = head_tail(&text, MAX_BYTES, MAX_LINES);
        assert!(cut);
        assert!(out.starts_with("line 0\n"));
        assert!(out.ends_with("line 999\n"));
        assert!(out.contains("lines (") && out.contains("truncated ...]"));
        assert!(out.lines().count() <= MAX_LINES + 1);
        let (same, cut) = head_tail("short\n", MAX_BYTES, MAX_LINES);
        assert_eq!((same.as_str(), cut), ("short\n", false));
        let long_line = "x".repeat(50_000);
        let (out, cut) = head_tail(&long_line, MAX_BYTES, MAX_LINES);
        assert!(cut && out.len() < MAX_BYTES && out.contains("bytes truncated"));
    }

    #[test]
    fn capped_buffer_bounds_memory() {
        let mut b = CappedBuffer::new(4);
        b.push(b"0123456789");
        assert_eq!(b.into_string(), "0123\n[... 2 bytes truncated ...]\n6789");
    }
}
