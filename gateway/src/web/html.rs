//! Small HTML helpers: escaping, times, and the page frame every page shares.
//!
//! Everything a user or an agent wrote (repository URLs, descriptions, diffs, transcripts)
//! is escaped on its way into the page: the pages are maud templates, which escape every
//! value spliced into them, and the diff and transcript renderers escape through [`esc`].
//! Attributes are always double-quoted, so escaping `"` is enough to keep a value inside
//! its attribute.

use chrono::{DateTime, Utc};
use maud::{Markup, PreEscaped, html};
use patchflow_core::TaskStatus;

/// Escapes text for use in HTML element content and double-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A link target only when it is plain http(s): a `javascript:` or `data:` URL from an
/// untrusted record (a PR URL) must never become a clickable link. The template escapes it.
pub fn safe_href(url: &str) -> Option<&str> {
    let url = url.trim();
    let lower = url.to_ascii_lowercase();
    (lower.starts_with("https://") || lower.starts_with("http://")).then_some(url)
}

/// "12 s", "4 min", "3 h", "2 d": how long ago `t` was, for lists read at a glance.
pub fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..86400 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86400),
    }
}

/// A `<time>` element: exact time for machines (and the script that keeps ages fresh),
/// a short one for people.
pub fn time_el(t: DateTime<Utc>, text: &str) -> Markup {
    html! {
        time datetime=(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            title=(t.format("%Y-%m-%d %H:%M:%S UTC")) { (text) }
    }
}

/// A time of day, to the second, for timelines.
pub fn clock(t: DateTime<Utc>) -> Markup {
    time_el(t, &t.format("%H:%M:%S").to_string())
}

/// Milliseconds as people read them: "850 ms", "12.4 s", "3 min 5 s".
pub fn duration_ms(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// Dollars to the micro-dollar: `$0.012345` (what the model table's prices give).
pub fn usd(amount: f64) -> String {
    format!("${amount:.6}")
}

/// 1234567 -> "1 234 567": token counts stay readable.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

/// The coloured status badge; `data-status` lets the script and tests find it.
pub fn badge(status: TaskStatus) -> Markup {
    let class = match status {
        TaskStatus::Completed => "ok",
        TaskStatus::Failed => "bad",
        TaskStatus::Cancelled => "off",
        _ => "run",
    };
    html! {
        span class={ "badge " (class) } data-status=(status.as_str()) { (status.as_str()) }
    }
}

/// The frame around every page: one stylesheet, one deferred script, nothing inline (the
/// Content-Security-Policy forbids inline code).
pub fn page(title: &str, body: &Markup) -> String {
    page_for(title, body, None)
}

/// Who is signed in, as the page header shows it: tenant, role, and the CSRF token the
/// sign-out form carries.
pub struct SignedIn<'a> {
    pub tenant: &'a str,
    pub role: &'a str,
    pub csrf: &'a str,
}

/// [`page`] with the signed-in caller in the header (and a sign-out button).
pub fn page_for(title: &str, body: &Markup, who: Option<&SignedIn<'_>>) -> String {
    let v = super::ASSET_VERSION.as_str();
    html! {
        (PreEscaped("<!doctype html>\n"))
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width,initial-scale=1";
                title { (title) " · patchflow" }
                link rel="stylesheet" href={ "/assets/app.css?v=" (v) };
                script src={ "/assets/app.js?v=" (v) } defer {}
            }
            body {
                header class="top" {
                    a class="brand" href="/" { "patchflow" }
                    nav { a href="/" { "Tasks" } " " a href="/#submit" { "New task" } }
                    @if let Some(w) = who {
                        form class="inline who" method="post" action="/signout" {
                            span id="whoami" { (w.tenant) " · " (w.role) }
                            input type="hidden" name="csrf" value=(w.csrf);
                            button type="submit" id="signout" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
        "\n"
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<a href="x" onclick='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn only_http_links_are_links() {
        assert_eq!(safe_href("javascript:alert(1)"), None);
        assert_eq!(safe_href(" JAVASCRIPT:alert(1)"), None);
        assert_eq!(safe_href("data:text/html,<b>"), None);
        assert_eq!(safe_href(" http://x/ "), Some("http://x/"));
        assert_eq!(
            safe_href("https://github.com/o/r/pull/1?a=1&b=\"2\""),
            Some("https://github.com/o/r/pull/1?a=1&b=\"2\"")
        );
    }

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(thousands(1_234_567), "1\u{202f}234\u{202f}567");
        assert_eq!(thousands(999), "999");
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(12_400), "12.4 s");
        assert_eq!(duration_ms(185_000), "3 min 5 s");
    }
}
