//! A worker's capacity and lifecycle.
//!
//! - Agent slots: a worker runs at most `worker_max_agents` agents (Temporal slots on the
//!   agents' own task queue); another task waits for the slot in Temporal, its fetch and
//!   stage not held up, and the metrics show the slots used and free.
//! - Graceful drain: a worker told to stop (SIGTERM) takes no new work and lets the agent
//!   it runs finish, reporting its progress, then exits; the task is published by another
//!   worker without the agent running again. An agent still running when
//!   `drain_timeout_secs` is over is cancelled with a retryable error and runs again on
//!   another worker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{Mode, Proc, Stack, demo_script, processes_mentioning};

/// Waits for the process to exit by itself; its exit status.
fn wait_exit(p: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not exit within {within:?}:\n{}",
            p.name,
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `text` without its terminal colours.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits until the model has been asked at least `n` times in all.
async fn asked(stack: &Stack, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.model.observed().requests < n {
        assert!(
            Instant::now() < deadline,
            "the agent never asked the model:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_at_most_worker_max_agents_and_the_next_task_waits_for_the_slot() {
    let mut script = demo_script();
    for t in &mut script.turns {
        t.delay_ms = 700;
    }
    let stack = Stack::start(Mode::Up, script, &[("PATCHFLOW_WORKER_MAX_AGENTS", "1")]).await;
    let first = stack.submit_demo().await;
    let second = stack.submit_demo().await;
    asked(&stack, 1).await;
    // One agent runs; the slot is taken.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = stack.scrape().await;
        if text.contains("patchflow_worker_slots{state=\"used\"} 1")
            && text.contains("patchflow_worker_slots{state=\"free\"} 0")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slots never showed one used:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in [&first, &second] {
        let r = stack.wait_terminal(id).await;
        assert_eq!(r["status"], "COMPLETED", "{r}");
        assert_eq!(stack.activity_attempts(id, "run_agent"), vec![1], "{id}");
    }
    // Never two agents at once: each model request came after the one before was answered.
    let seen = stack.model.observed();
    let mut spans: Vec<(Instant, Instant)> = seen
        .arrivals
        .iter()
        .copied()
        .zip(seen.answered_at.iter().copied())
        .collect();
    spans.sort();
    assert_eq!(spans.len(), 10, "two demo agents, five requests each");
    for w in spans.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "two agents ran at once on a one-slot worker"
        );
    }
    // Whichever task came second to the slot was fetched and staged while the other's agent
    // ran, then waited for the slot, and says so.
    let mut waited = 0;
    for id in [&first, &second] {
        let events = stack.events(id).await;
        if events.iter().any(|e| {
            e.message.starts_with("waited ") && e.message.contains("for a free agent slot")
        }) {
            waited += 1;
        }
    }
    assert_eq!(waited, 1, "exactly one task waited for the slot");
    let text = stack.scrape().await;
    assert!(
        text.contains("patchflow_task_step_seconds_count{step=\"agent_queue\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("patchflow_worker_slots{state=\"free\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_lets_its_agent_finish_and_one_past_the_drain_runs_again_elsewhere() {
    // Five model turns of a second each: the agent is mid-run when the signal comes.
    let mut script = demo_script();
    let turns = script.turns.len() as u64;
    for t in &mut script.turns {
        t.delay_ms = 1_000;
    }
    let mut stack = Stack::start(
        Mode::Split,
        script,
        &[("PATCHFLOW_DRAIN_TIMEOUT_SECS", "60")],
    )
    .await;

    // 1. Within the drain: the agent finishes on the stopping worker.
    let first = stack.submit_demo().await;
    asked(&stack, 1).await;
    let draining = stack.workers[0].pid();
    let t0 = Instant::now();
    kill(Pid::from_raw(stack.workers[0].pid()), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut stack.workers[0], Duration::from_secs(90));
    // The drain's timeline, for the record (`--no-capture`).
    eprintln!(
        "drain: SIGTERM at 0 s, the agent in its first turn; worker exited after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "{status}: {}",
        stack.workers[0].log_text()
    );
    let log = plain(&stack.workers[0].log_text());
    for line in [
        "worker draining: no new work is taken",
        "agents_running=1",
        "worker drained",
    ] {
        assert!(
            log.contains(line),
            "{line:?} missing from the worker's log:\n{log}"
        );
    }
    let seen = stack.model.observed();
    assert_eq!(
        seen.answered, turns,
        "the agent did not run to its end on the draining worker"
    );
    assert!(
        processes_mentioning(&first).is_empty(),
        "an agent of {first} outlived its worker"
    );
    // Nobody polls now: another worker publishes the task, and runs no agent again.
    stack.start_worker();
    let r = stack.wait_terminal(&first).await;
    assert_eq!(r["status"], "COMPLETED", "{r}");
    eprintln!(
        "drain: a new worker published it; COMPLETED {:.1} s after the SIGTERM",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(stack.activity_attempts(&first, "run_agent"), vec![1]);
    // The record names the worker that ran the agent.
    let worker = r["attempts"][0]["worker"].as_str().unwrap_or_default();
    assert!(
        worker.starts_with("patchflow@") && worker.ends_with(&format!(":{draining}")),
        "{r}"
    );
    assert_eq!(
        stack.model.observed().requests,
        turns,
        "the agent ran twice"
    );
    let (_, diff) = stack.get_text(&format!("/api/tasks/{first}/diff")).await;
    assert!(diff.contains("+    return a + b"), "{diff}");

    // 2. Past the drain: the agent is cancelled, and runs again on the next worker.
    for w in stack.workers.iter_mut() {
        w.terminate();
    }
    stack.workers.clear();
    let short = stack.spawn_patchflow_with(
        "worker-short-drain",
        &["worker"],
        &[("PATCHFLOW_DRAIN_TIMEOUT_SECS", "1")],
    );
    stack.workers.push(short);
    let second = stack.submit_demo().await;
    asked(&stack, turns + 1).await;
    let signalled = Instant::now();
    kill(Pid::from_raw(stack.workers[0].pid()), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut stack.workers[0], Duration::from_secs(60));
    assert!(
        status.success(),
        "{status}: {}",
        stack.workers[0].log_text()
    );
    let before_rerun = stack.model.observed().answered;
    assert!(
        before_rerun < 2 * turns,
        "the agent finished although the drain was over ({:?} after the signal)",
        signalled.elapsed()
    );
    assert!(
        processes_mentioning(&second).is_empty(),
        "the cancelled agent of {second} is still running"
    );
    let r = stack.record(&second).await;
    assert_ne!(
        r["status"], "FAILED",
        "a drained agent failed the task: {r}"
    );
    assert_ne!(
        r["status"], "CANCELLED",
        "a drained agent cancelled the task: {r}"
    );
    eprintln!(
        "drain past its 1 s limit: worker exited {:.1} s after the SIGTERM, the agent cancelled, the task {}",
        signalled.elapsed().as_secs_f64(),
        r["status"]
    );
    let n = stack.start_worker();
    let next = stack.workers[n].pid();
    let r = stack.wait_terminal(&second).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    eprintln!(
        "drain past its limit: the agent ran again on the next worker; COMPLETED {:.1} s after the SIGTERM",
        signalled.elapsed().as_secs_f64()
    );
    let worker = r["attempts"][0]["worker"].as_str().unwrap_or_default();
    assert!(
        worker.ends_with(&format!(":{next}")),
        "the agent's last worker is the one that finished it: {r}"
    );
    let attempts = stack.activity_attempts(&second, "run_agent");
    assert_eq!(
        attempts,
        vec![2],
        "the retried attempt is the one that completed: {attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_staged_on_the_worker_that_fetched_it() {
    let mut stack = Stack::start(Mode::Split, demo_script(), &[]).await;
    stack.start_worker();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(stack.submit_demo().await);
    }
    for id in &ids {
        let r = stack.wait_terminal(id).await;
        assert_eq!(r["status"], "COMPLETED", "{r}");
        let history = stack.history(id);
        let events = history["events"].as_array().unwrap();
        // activity type -> (scheduled event id, task queue)
        let scheduled = |activity: &str| {
            events
                .iter()
                .find(|e| {
                    e["activityTaskScheduledEventAttributes"]["activityType"]["name"] == activity
                })
                .map(|e| {
                    (
                        e["eventId"]
                            .as_str()
                            .map_or_else(|| e["eventId"].to_string(), str::to_string),
                        e["activityTaskScheduledEventAttributes"]["taskQueue"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .unwrap_or_else(|| panic!("{id}: no {activity}"))
        };
        let identity = |scheduled_id: &str| {
            events
                .iter()
                .find(|e| {
                    let a = &e["activityTaskStartedEventAttributes"];
                    a["scheduledEventId"]
                        .as_str()
                        .map_or_else(|| a["scheduledEventId"].to_string(), str::to_string)
                        == scheduled_id
                })
                .map(|e| {
                    e["activityTaskStartedEventAttributes"]["identity"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .unwrap_or_else(|| panic!("{id}: {scheduled_id} never started"))
        };
        let (fetch, _) = scheduled("fetch_code");
        let (stage, queue) = scheduled("stage_code");
        assert!(
            queue.starts_with("patchflow-host-patchflow@"),
            "{id}: stage_code on {queue}"
        );
        let (fetched_by, staged_by) = (identity(&fetch), identity(&stage));
        assert!(!fetched_by.is_empty());
        assert_eq!(
            fetched_by, staged_by,
            "{id}: fetched and staged by different workers"
        );
        assert!(
            queue.ends_with(fetched_by.trim_start_matches("patchflow@")),
            "{queue} {fetched_by}"
        );
        // The agent ran on the agents' own queue.
        let (_, agents) = scheduled("run_agent");
        assert_eq!(agents, "patchflow-agents", "{id}");
    }
    let logs = stack.logs();
    assert!(
        !logs.contains("fetched tree not on this worker"),
        "a task was fetched twice"
    );
}
