//! The usage report: `GET /api/usage?from=&to=` (and gRPC `GetUsage`, `patchflow usage`).
//! [`UsageRange::parse`] is the one reading of `from` and `to` for every door.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use patchflow_core::{UsageRow, UsageTotal};
use serde::{Deserialize, Serialize};

/// The range a report covers when `from` is not given: this many days before `to`.
pub const DEFAULT_USAGE_DAYS: i64 = 30;
/// The longest range one report covers.
pub const MAX_USAGE_DAYS: i64 = 366;

/// `{"from", "to", "tenants", "days": [...], "total"}`: tasks created in `[from, to)`,
/// summed per day (UTC), tenant and model, then in all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageAnswer {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The tenants the report is about: the caller's own, the one an admin named, or (an
    /// admin's report of everyone) those with tasks in the range.
    pub tenants: Vec<String>,
    /// By day, then tenant, then model.
    pub days: Vec<UsageRow>,
    pub total: UsageTotal,
}

impl UsageAnswer {
    pub fn new(range: UsageRange, tenants: Vec<String>, days: Vec<UsageRow>) -> Self {
        Self {
            from: range.from,
            to: range.to,
            tenants,
            total: UsageTotal::of(&days),
            days,
        }
    }
}

/// Which tasks a report sums: those created from `from` (inclusive) to `to` (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl UsageRange {
    /// The range `from` and `to` name (blank: not given): each an RFC 3339 time or a
    /// `YYYY-MM-DD` date (its midnight, UTC). `to` defaults to `now`, `from` to
    /// [`DEFAULT_USAGE_DAYS`] before `to`. The error is the message a client sees.
    pub fn parse(from: Option<&str>, to: Option<&str>, now: DateTime<Utc>) -> Result<Self, String> {
        let to = match given(to) {
            Some(t) => time_of("to", t)?,
            None => now,
        };
        let from = match given(from) {
            Some(f) => time_of("from", f)?,
            None => to - Duration::days(DEFAULT_USAGE_DAYS),
        };
        if from >= to {
            return Err(format!(
                "from ({}) must be before to ({})",
                from.to_rfc3339(),
                to.to_rfc3339()
            ));
        }
        if to - from > Duration::days(MAX_USAGE_DAYS) {
            return Err(format!(
                "from {} to {} is longer than {MAX_USAGE_DAYS} days: ask for a shorter range",
                from.to_rfc3339(),
                to.to_rfc3339()
            ));
        }
        Ok(Self { from, to })
    }
}

/// A bound's text, blank meaning not given.
fn given(t: Option<&str>) -> Option<&str> {
    t.map(str::trim).filter(|t| !t.is_empty())
}

/// One bound as given: an RFC 3339 time, or a date meaning its midnight UTC.
fn time_of(name: &str, text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.to_utc());
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        && let Some(midnight) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(midnight.and_utc());
    }
    Err(format!(
        "{name}: `{}` is neither an RFC 3339 time (2026-03-01T00:00:00Z) nor a date (2026-03-01)",
        text.chars().take(64).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    #[test]
    fn bounds_are_times_or_dates_with_defaults_from_now() {
        let now = at(2026, 3, 31, 15);
        let r = UsageRange::parse(None, None, now).unwrap();
        assert_eq!((r.from, r.to), (at(2026, 3, 1, 15), now));
        let r = UsageRange::parse(Some("2026-03-01"), Some(" 2026-03-02T12:00:00+02:00 "), now)
            .unwrap();
        assert_eq!((r.from, r.to), (at(2026, 3, 1, 0), at(2026, 3, 2, 10)));
        let r = UsageRange::parse(Some(""), Some("2026-02-01"), now).unwrap();
        assert_eq!((r.from, r.to), (at(2026, 1, 2, 0), at(2026, 2, 1, 0)));
        // Exactly 366 days is allowed.
        UsageRange::parse(Some("2025-01-01"), Some("2026-01-02"), now).unwrap();
    }

    #[test]
    fn bad_bounds_say_which_and_why() {
        let now = at(2026, 3, 31, 15);
        for (from, to, needle) in [
            (Some("yesterday"), None, "from: `yesterday` is neither"),
            (None, Some("2026-13-01"), "to: `2026-13-01` is neither"),
            (Some("1714000000"), None, "from: `1714000000`"),
            (
                Some("2026-03-02"),
                Some("2026-03-02"),
                "from (2026-03-02T00:00:00+00:00) must be before to",
            ),
            (Some("2026-03-03"), Some("2026-03-02"), "must be before to"),
            (
                Some("2025-01-01"),
                Some("2026-01-03"),
                "longer than 366 days",
            ),
            (Some("2026-04-01"), None, "must be before to"),
        ] {
            let e = UsageRange::parse(from, to, now).unwrap_err();
            assert!(e.contains(needle), "{from:?} {to:?}: {e}");
        }
        let long = "x".repeat(1000);
        let e = UsageRange::parse(Some(&long), None, now).unwrap_err();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn the_answer_totals_its_days() {
        let now = at(2026, 3, 31, 15);
        let row = UsageRow {
            day: NaiveDate::from_ymd_opt(2026, 3, 9).unwrap(),
            tenant: "a".into(),
            model: "m".into(),
            tasks: 1,
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_tokens: 2,
            reasoning_tokens: 1,
            total_tokens: 15,
            cost_usd: 0.25,
        };
        let a = UsageAnswer::new(
            UsageRange::parse(None, None, now).unwrap(),
            vec!["a".into()],
            vec![row.clone(), row],
        );
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["total"]["tasks"], 2);
        assert_eq!(v["total"]["cost_usd"], 0.5);
        assert_eq!(v["days"][0]["day"], "2026-03-09");
        assert_eq!(v["to"], "2026-03-31T15:00:00Z");
        assert_eq!(serde_json::from_value::<UsageAnswer>(v).unwrap(), a);
    }
}
