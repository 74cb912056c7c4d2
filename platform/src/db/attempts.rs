//! How a status write lands among a task's attempts, decided once for every back-end.
//!
//! A write names the Temporal run it comes from (a workflow's `record_status`), or none
//! (the gateway). The run tells the three cases apart: the current attempt's run moves
//! its attempt forward; a run never seen before is a new attempt (a retry, or a reset done
//! by hand in the Temporal Web UI or CLI, which patchflow never hears of otherwise); a run
//! of an earlier attempt is late and changes nothing.

use patchflow_core::TaskStatus;

/// What the store does with one status write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Plan {
    /// Move the current attempt; `adopt_run` records the run as the attempt's carrier.
    Same { adopt_run: bool },
    /// Begin attempt `number`; `close_previous` ends an attempt still in flight (a reset
    /// replaced its run).
    New { number: u32, close_previous: bool },
    /// Out of order, repeated, or from an older attempt's run: nothing changes.
    Ignore,
}

/// The current state of a task as the write sees it (read under the task's row lock).
pub(super) struct Current<'a> {
    pub status: TaskStatus,
    pub attempt: u32,
    /// Every attempt's number and run, in any order.
    pub runs: &'a [(u32, Option<String>)],
}

pub(super) fn plan(current: &Current<'_>, run: Option<&str>, next: TaskStatus) -> Plan {
    let forward = |adopt_run| {
        if current.status.can_move_to(next) {
            Plan::Same { adopt_run }
        } else {
            Plan::Ignore
        }
    };
    let Some(run) = run else {
        return forward(false);
    };
    let current_run = current
        .runs
        .iter()
        .find(|(n, _)| *n == current.attempt)
        .and_then(|(_, r)| r.as_deref());
    if current_run == Some(run) {
        return forward(false);
    }
    if current.runs.iter().any(|(_, r)| r.as_deref() == Some(run)) {
        return Plan::Ignore;
    }
    // The first run of the first attempt is learnt from its first write.
    if current_run.is_none() && !current.status.is_terminal() {
        return forward(true);
    }
    if !current.status.can_begin_attempt(next) {
        return Plan::Ignore;
    }
    let number = current
        .runs
        .iter()
        .map(|(n, _)| *n)
        .max()
        .unwrap_or(current.attempt)
        .max(current.attempt)
        + 1;
    Plan::New {
        number,
        close_previous: !current.status.is_terminal(),
    }
}

/// What an attempt replaced while still in flight is recorded as.
pub(super) fn replaced_message(by: u32) -> String {
    format!("replaced by attempt {by} (the workflow was reset)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskStatus::*;

    fn runs(v: &[(u32, Option<&str>)]) -> Vec<(u32, Option<String>)> {
        v.iter().map(|(n, r)| (*n, r.map(str::to_string))).collect()
    }

    #[test]
    fn the_first_run_is_adopted_and_moves_forward() {
        let r = runs(&[(1, None)]);
        let c = Current {
            status: Queued,
            attempt: 1,
            runs: &r,
        };
        assert_eq!(
            plan(&c, Some("r1"), DownloadingCode),
            Plan::Same { adopt_run: true }
        );
        assert_eq!(plan(&c, None, Pending), Plan::Ignore);
    }

    #[test]
    fn a_new_run_after_the_end_is_a_new_attempt_and_an_old_run_is_ignored() {
        let r = runs(&[(1, Some("r1"))]);
        let c = Current {
            status: Failed,
            attempt: 1,
            runs: &r,
        };
        assert_eq!(plan(&c, Some("r1"), RunningAgent), Plan::Ignore);
        assert_eq!(
            plan(&c, Some("r2"), RunningAgent),
            Plan::New {
                number: 2,
                close_previous: false
            }
        );
        // The gateway cannot reopen a task without a run.
        assert_eq!(plan(&c, None, Queued), Plan::Ignore);
        let r = runs(&[(1, Some("r1")), (2, Some("r2"))]);
        let c = Current {
            status: RunningAgent,
            attempt: 2,
            runs: &r,
        };
        assert_eq!(plan(&c, Some("r1"), Failed), Plan::Ignore);
        assert_eq!(
            plan(&c, Some("r2"), Failed),
            Plan::Same { adopt_run: false }
        );
        // A reset of the running attempt replaces it.
        assert_eq!(
            plan(&c, Some("r3"), DownloadingCode),
            Plan::New {
                number: 3,
                close_previous: true
            }
        );
    }
}
