//! `git_url` is a request the worker makes for a user: loopback and other private
//! addresses are refused in every spelling before a packet leaves (a listener there sees
//! nothing), unless the operator allows the host; credentials in a URL are refused at
//! submit and never stored or logged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use patchflow_core::TaskStatus;
use serde_json::json;

use crate::support::{Mode, Stack, demo_script};

/// A TCP listener on loopback that counts who connects (and hangs up on them).
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_git_hosts_are_refused_before_any_packet_and_credentials_never_stored() {
    let (blocked, blocked_seen) = counting_listener().await;
    let (allowed, allowed_seen) = counting_listener().await;
    let allow = format!("127.0.0.1:{allowed}");
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[
            ("PATCHFLOW_GIT_ALLOWED_PROTOCOLS", "https,http"),
            ("PATCHFLOW_GIT_ALLOWED_HOSTS", allow.as_str()),
        ],
    )
    .await;

    let spellings = [
        format!("http://127.0.0.1:{blocked}/r.git"),
        format!("http://localhost:{blocked}/r.git"),
        format!("http://2130706433:{blocked}/r.git"),
        format!("http://0x7f000001:{blocked}/r.git"),
        format!("http://127.1:{blocked}/r.git"),
        format!("http://0177.0.0.1:{blocked}/r.git"),
        format!("http://[::ffff:127.0.0.1]:{blocked}/r.git"),
        // The allowed entry names a port: the same host on another port is still refused.
        format!("http://127.0.0.1:{blocked}/via-allowed-host.git"),
    ];
    let mut ids = Vec::new();
    for url in &spellings {
        let (c, v) = stack
            .post_json(
                "/api/tasks",
                &json!({"git_url": url, "task_description": "fix"}),
            )
            .await;
        assert_eq!(c, 202, "{url}: {v}");
        ids.push(v["task_id"].as_str().unwrap().to_string());
    }
    // SSH is not among the allowed protocols.
    let (c, v) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": format!("ssh://git@127.0.0.1:{blocked}/r.git"), "task_description": "fix"}),
        )
        .await;
    assert_eq!(c, 202, "{v}");
    let ssh = v["task_id"].as_str().unwrap().to_string();

    for (url, id) in spellings.iter().zip(&ids) {
        let r = stack.wait_terminal(id).await;
        assert_eq!(r["status"], "FAILED", "{url}");
        let msg = r["message"].as_str().unwrap();
        assert!(
            msg.contains("not a public address") && msg.contains("git_allowed_hosts"),
            "{url}: {msg}"
        );
        // Bad input: one attempt, no retry, and the agent never ran.
        assert_eq!(stack.activity_attempts(id, "fetch_code"), [1], "{url}");
        use TaskStatus::*;
        assert_eq!(
            stack.statuses(id).await,
            [Pending, Queued, DownloadingCode, Failed]
        );
    }
    let r = stack.wait_terminal(&ssh).await;
    assert_eq!(r["status"], "FAILED");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("ssh") && msg.contains("git_allowed_protocols"),
        "{msg}"
    );
    assert_eq!(
        blocked_seen.load(Ordering::SeqCst),
        0,
        "a refused host was contacted"
    );
    assert_eq!(stack.model.observed().requests, 0);

    // The control: the host the operator allowed is reached (it is no git server, so the
    // fetch then fails for that reason, not for the address).
    let (c, v) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": format!("http://127.0.0.1:{allowed}/r.git"), "task_description": "fix"}),
        )
        .await;
    assert_eq!(c, 202, "{v}");
    let r = stack.wait_terminal(v["task_id"].as_str().unwrap()).await;
    assert_eq!(r["status"], "FAILED");
    let msg = r["message"].as_str().unwrap();
    assert!(!msg.contains("not a public address"), "{msg}");
    assert!(allowed_seen.load(Ordering::SeqCst) >= 1);

    // Credentials in the URL: a 400 at submit, and the secret is nowhere afterwards.
    for url in [
        "https://user:hunter2@github.com/o/r.git",
        "https://hunter2@github.com/o/r.git",
    ] {
        let (c, v) = stack
            .post_json(
                "/api/tasks",
                &json!({"git_url": url, "task_description": "fix"}),
            )
            .await;
        assert_eq!(c, 400, "{url}: {v}");
        let text = v.to_string();
        assert!(
            text.contains("git_url") && text.contains("credentials"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
    let (_, list) = stack.get_json("/api/tasks").await;
    assert!(!list.to_string().contains("hunter2"));
    assert_eq!(list["tasks"].as_array().unwrap().len(), spellings.len() + 2);
    assert!(!stack.logs().contains("hunter2"));
}

/// A loopback HTTP listener that keeps the head of every request git sends and answers 404.
async fn recording_listener() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = vec![0u8; 16 * 1024];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            keep.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).to_string());
            let _ = conn
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
    });
    (port, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_token_reaches_only_the_git_server_and_is_stored_sealed() {
    use base64::Engine as _;
    const TOKEN: &str = "ghp_isolationTestToken9d3c";
    let (port, heads) = recording_listener().await;
    let allow = format!("127.0.0.1:{port}");
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[
            ("PATCHFLOW_GIT_ALLOWED_PROTOCOLS", "https,http"),
            ("PATCHFLOW_GIT_ALLOWED_HOSTS", allow.as_str()),
        ],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/private.git");
    let (c, v) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": url, "task_description": "fix", "git_token": TOKEN}),
        )
        .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "FAILED", "{r}");

    // git sent it, as Basic auth, to the repository's host.
    let expected = format!(
        "authorization: basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{TOKEN}"))
    )
    .to_lowercase();
    let seen = heads.lock().unwrap().clone();
    assert!(!seen.is_empty(), "git never asked the server");
    assert!(
        seen.iter().all(|h| h.to_lowercase().contains(&expected)),
        "{seen:?}"
    );
    // Nowhere else in plain text: the record, the database file, the workflow history, the logs.
    assert!(!r.to_string().contains(TOKEN), "{r}");
    for entry in std::fs::read_dir(&stack.data_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("patchflow.db") || name.ends_with(".db") {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
                "{name} holds the token"
            );
        }
    }
    let history = crate::support::history_text(&stack.history(&id));
    assert!(
        history.contains("git_token"),
        "the sealed token is not in the workflow input"
    );
    assert!(
        !history.contains(TOKEN),
        "the workflow history holds the token"
    );
    assert!(!stack.logs().contains(TOKEN), "the logs hold the token");

    // gRPC takes the token too, and treats it alike.
    const GRPC_TOKEN: &str = "glpat-grpcDoorToken51f0";
    let submitted = stack
        .grpc_client()
        .await
        .submit_task(patchflow_gateway::grpc::proto::SubmitTaskRequest {
            git_url: url.clone(),
            git_token: Some(GRPC_TOKEN.into()),
            options: Some(patchflow_gateway::grpc::proto::TaskOptions {
                task_description: "fix".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = stack.wait_terminal(&submitted.task_id).await;
    assert!(!r.to_string().contains(GRPC_TOKEN), "{r}");
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("x-access-token:{GRPC_TOKEN}"))
        .to_lowercase();
    assert!(
        heads
            .lock()
            .unwrap()
            .iter()
            .any(|h| h.to_lowercase().contains(&basic)),
        "git did not send the gRPC submission's token"
    );
    let history = crate::support::history_text(&stack.history(&submitted.task_id));
    assert!(!history.contains(GRPC_TOKEN) && !stack.logs().contains(GRPC_TOKEN));

    // A token is sent over HTTP(S) only, and a token with a ZIP is refused.
    let (c, v) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": "https://x.example/r.git", "task_description": "fix", "git_token": "two words"}),
        )
        .await;
    assert_eq!(c, 400, "{v}");
    assert!(
        v.to_string().contains("git_token: must be printable"),
        "{v}"
    );
}
