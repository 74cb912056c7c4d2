//! Renders a unified diff (`diff.patch`, as git writes it) as HTML tables, one per file:
//! unified (one column) or side by side (old left, new right). Every line of the diff is
//! untrusted text and goes through [`esc`].

use std::fmt::Write as _;

use super::html::esc;

#[derive(Debug, Default, PartialEq)]
pub struct FileDiff {
    pub old_path: Option<String>,
    pub new_path: Option<String>,
    /// Lines between the file header and its first hunk (`new file mode`, `Binary files…`).
    pub meta: Vec<String>,
    pub hunks: Vec<Hunk>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Hunk {
    pub header: String,
    pub old_start: u64,
    pub new_start: u64,
    pub lines: Vec<Line>,
}

#[derive(Debug, PartialEq)]
pub enum Line {
    Context(String),
    Added(String),
    Removed(String),
    /// `\ No newline at end of file`
    Note(String),
}

impl FileDiff {
    /// The name to show: the new path, or the old one for a deleted file.
    pub fn name(&self) -> String {
        match (&self.old_path, &self.new_path) {
            (Some(o), Some(n)) if o != n => format!("{o} → {n}"),
            (_, Some(n)) => n.clone(),
            (Some(o), None) => o.clone(),
            (None, None) => "(unnamed)".to_string(),
        }
    }

    pub fn counts(&self) -> (usize, usize) {
        let mut added = 0;
        let mut removed = 0;
        for l in self.hunks.iter().flat_map(|h| &h.lines) {
            match l {
                Line::Added(_) => added += 1,
                Line::Removed(_) => removed += 1,
                _ => {}
            }
        }
        (added, removed)
    }
}

fn strip_prefix(path: &str) -> Option<String> {
    let path = path.split('\t').next().unwrap_or(path).trim_end();
    if path == "/dev/null" {
        return None;
    }
    Some(
        path.strip_prefix("a/")
            .or_else(|| path.strip_prefix("b/"))
            .unwrap_or(path)
            .to_string(),
    )
}

/// `@@ -12,3 +12,4 @@ fn x` -> (12, 3, 12, 4); a missing count means 1.
fn hunk_range(header: &str) -> Option<(u64, u64, u64, u64)> {
    let body = header.strip_prefix("@@ ")?;
    let (ranges, _) = body.split_once(" @@")?;
    let (old, new) = ranges.split_once(' ')?;
    let parse = |r: &str, sign: char| -> Option<(u64, u64)> {
        let r = r.strip_prefix(sign)?;
        match r.split_once(',') {
            Some((s, n)) => Some((s.parse().ok()?, n.parse().ok()?)),
            None => Some((r.parse().ok()?, 1)),
        }
    };
    let (os, oc) = parse(old, '-')?;
    let (ns, nc) = parse(new, '+')?;
    Some((os, oc, ns, nc))
}

/// Parses a unified diff. Hunk line counts decide where a hunk ends, so a removed line
/// that itself starts with `--` is not taken for a file header.
pub fn parse(text: &str) -> Vec<FileDiff> {
    let mut files: Vec<FileDiff> = Vec::new();
    let mut left_old = 0u64;
    let mut left_new = 0u64;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let in_hunk = left_old > 0 || left_new > 0;
        if in_hunk {
            let Some(file) = files.last_mut() else { break };
            let Some(hunk) = file.hunks.last_mut() else {
                break;
            };
            let (tag, rest) = line.split_at(line.chars().next().map_or(0, char::len_utf8));
            match tag {
                "+" => {
                    left_new = left_new.saturating_sub(1);
                    hunk.lines.push(Line::Added(rest.to_string()));
                }
                "-" => {
                    left_old = left_old.saturating_sub(1);
                    hunk.lines.push(Line::Removed(rest.to_string()));
                }
                "\\" => hunk.lines.push(Line::Note(line.to_string())),
                // A context line; an empty line is an empty context line some tools trim.
                _ => {
                    left_old = left_old.saturating_sub(1);
                    left_new = left_new.saturating_sub(1);
                    hunk.lines.push(Line::Context(rest.to_string()));
                }
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("diff --git ") {
            let mut f = FileDiff::default();
            // Paths come from ---/+++ when present; this is the fallback (binary, mode-only).
            if let Some((a, b)) = rest.split_once(" b/") {
                f.old_path = strip_prefix(a);
                f.new_path = strip_prefix(&format!("b/{b}"));
            }
            files.push(f);
        } else if line.starts_with("--- ") && lines.peek().is_some_and(|n| n.starts_with("+++ ")) {
            // After `diff --git` the file exists already; in a plain diff this starts one.
            if files.last().is_none_or(|f| !f.hunks.is_empty()) {
                files.push(FileDiff::default());
            }
            let plus = lines.next().unwrap_or_default();
            if let Some(f) = files.last_mut() {
                f.old_path = strip_prefix(&line[4..]);
                f.new_path = strip_prefix(&plus[4..]);
            }
        } else if line.starts_with("@@ ") {
            if files.is_empty() {
                files.push(FileDiff::default());
            }
            let (os, oc, ns, nc) = hunk_range(line).unwrap_or((0, 0, 0, 0));
            left_old = oc;
            left_new = nc;
            if let Some(f) = files.last_mut() {
                f.hunks.push(Hunk {
                    header: line.to_string(),
                    old_start: os,
                    new_start: ns,
                    lines: Vec::new(),
                });
            }
        } else if let Some(f) = files.last_mut()
            && !line.starts_with("index ")
        {
            f.meta.push(line.to_string());
        }
    }
    files
}

fn file_header(out: &mut String, f: &FileDiff) {
    let (added, removed) = f.counts();
    let _ = write!(
        out,
        "<h3 class=\"fh\"><span class=\"fname\">{}</span> <span class=\"fstat\"><b class=\"a\">+{added}</b> <b class=\"d\">−{removed}</b></span></h3>",
        esc(&f.name())
    );
    for m in &f.meta {
        let _ = write!(out, "<p class=\"meta\">{}</p>", esc(m));
    }
}

fn num(n: Option<u64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_default()
}

/// One file per `<section>`, lines in a single column with old and new line numbers.
pub fn render_unified(files: &[FileDiff]) -> String {
    let mut out = String::new();
    for f in files {
        out.push_str("<section class=\"file\">");
        file_header(&mut out, f);
        if !f.hunks.is_empty() {
            out.push_str("<div class=\"scroll\"><table class=\"diff u\">");
            for h in &f.hunks {
                let _ = write!(
                    out,
                    "<tr class=\"hh\"><td colspan=\"3\">{}</td></tr>",
                    esc(&h.header)
                );
                let (mut o, mut n) = (h.old_start, h.new_start);
                for l in &h.lines {
                    let (class, on, nn, sign, text) = match l {
                        Line::Context(t) => {
                            o += 1;
                            n += 1;
                            ("", Some(o - 1), Some(n - 1), ' ', t)
                        }
                        Line::Added(t) => {
                            n += 1;
                            ("add", None, Some(n - 1), '+', t)
                        }
                        Line::Removed(t) => {
                            o += 1;
                            ("del", Some(o - 1), None, '-', t)
                        }
                        Line::Note(t) => ("note", None, None, ' ', t),
                    };
                    let _ = write!(
                        out,
                        "<tr class=\"{class}\"><td class=\"ln\">{}</td><td class=\"ln\">{}</td><td class=\"c\">{sign}{}</td></tr>",
                        num(on),
                        num(nn),
                        esc(text)
                    );
                }
            }
            out.push_str("</table></div>");
        }
        out.push_str("</section>");
    }
    out
}

/// Side by side: removed lines on the left paired with the added lines that replace them.
pub fn render_split(files: &[FileDiff]) -> String {
    let mut out = String::new();
    for f in files {
        out.push_str("<section class=\"file\">");
        file_header(&mut out, f);
        if !f.hunks.is_empty() {
            out.push_str("<div class=\"scroll\"><table class=\"diff s\">");
            for h in &f.hunks {
                let _ = write!(
                    out,
                    "<tr class=\"hh\"><td colspan=\"4\">{}</td></tr>",
                    esc(&h.header)
                );
                let (mut o, mut n) = (h.old_start, h.new_start);
                let mut i = 0;
                while i < h.lines.len() {
                    match &h.lines[i] {
                        Line::Context(t) => {
                            let _ = write!(
                                out,
                                "<tr><td class=\"ln\">{o}</td><td class=\"c\">{t}</td><td class=\"ln\">{n}</td><td class=\"c\">{t}</td></tr>",
                                t = esc(t)
                            );
                            o += 1;
                            n += 1;
                            i += 1;
                        }
                        Line::Note(t) => {
                            let _ = write!(
                                out,
                                "<tr class=\"note\"><td colspan=\"4\">{}</td></tr>",
                                esc(t)
                            );
                            i += 1;
                        }
                        Line::Removed(_) | Line::Added(_) => {
                            let mut removed = Vec::new();
                            let mut added = Vec::new();
                            while let Some(Line::Removed(t)) = h.lines.get(i) {
                                removed.push(t);
                                i += 1;
                            }
                            while let Some(Line::Added(t)) = h.lines.get(i) {
                                added.push(t);
                                i += 1;
                            }
                            for k in 0..removed.len().max(added.len()) {
                                out.push_str("<tr>");
                                match removed.get(k) {
                                    Some(t) => {
                                        let _ = write!(
                                            out,
                                            "<td class=\"ln del\">{o}</td><td class=\"c del\">{}</td>",
                                            esc(t)
                                        );
                                        o += 1;
                                    }
                                    None => out.push_str(
                                        "<td class=\"ln nil\"></td><td class=\"c nil\"></td>",
                                    ),
                                }
                                match added.get(k) {
                                    Some(t) => {
                                        let _ = write!(
                                            out,
                                            "<td class=\"ln add\">{n}</td><td class=\"c add\">{}</td>",
                                            esc(t)
                                        );
                                        n += 1;
                                    }
                                    None => out.push_str(
                                        "<td class=\"ln nil\"></td><td class=\"c nil\"></td>",
                                    ),
                                }
                                out.push_str("</tr>");
                            }
                        }
                    }
                }
            }
            out.push_str("</table></div>");
        }
        out.push_str("</section>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = "diff --git a/calc.py b/calc.py\nindex 1..2 100644\n--- a/calc.py\n+++ b/calc.py\n@@ -1,4 +1,3 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n--- not a header\n \n@@ -10 +10,2 @@ x\n ctx\n+<img src=x onerror=alert(1)>\n\\ No newline at end of file\ndiff --git a/new.txt b/new.txt\nnew file mode 100644\n--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1 @@\n+hi\n";

    #[test]
    fn parses_files_hunks_and_tricky_lines() {
        let files = parse(DIFF);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].name(), "calc.py");
        assert_eq!(files[0].hunks.len(), 2);
        // "--- not a header" sits inside the first hunk (its counts say so): a removal.
        assert!(
            files[0].hunks[0]
                .lines
                .contains(&Line::Removed("-- not a header".into()))
        );
        assert_eq!(files[0].counts(), (2, 2));
        assert_eq!(files[1].old_path, None);
        assert_eq!(files[1].name(), "new.txt");
        assert_eq!(files[1].meta, vec!["new file mode 100644".to_string()]);
        assert_eq!(files[1].counts(), (1, 0));
    }

    #[test]
    fn both_views_escape_the_diff_and_number_lines() {
        let files = parse(DIFF);
        for html in [render_unified(&files), render_split(&files)] {
            assert!(!html.contains("<img"), "{html}");
            assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
            assert!(html.contains("calc.py"));
        }
        let u = render_unified(&files);
        assert!(u.contains(
            "<tr class=\"add\"><td class=\"ln\"></td><td class=\"ln\">2</td><td class=\"c\">+    return a + b</td></tr>"
        ));
        let s = render_split(&files);
        assert!(s.contains("<td class=\"ln del\">2</td><td class=\"c del\">    return a - b</td><td class=\"ln add\">2</td><td class=\"c add\">    return a + b</td>"));
    }
}
