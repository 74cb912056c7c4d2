//! The gRPC API end to end: both kinds of submission, watching a task to its end, a watcher
//! that reconnects mid-stream, the result, and each error code with the HTTP API's words.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use patchflow_gateway::grpc::proto;
use proto::watch_task_response::Item;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{Grpc, Mode, Stack, demo_git_repo, demo_script, repo_root};

async fn client(stack: &Stack) -> Grpc {
    stack.grpc_client().await
}

fn options(description: &str) -> proto::TaskOptions {
    proto::TaskOptions {
        task_description: description.into(),
        ..proto::TaskOptions::default()
    }
}

fn demo_zip() -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut buf);
        for f in ["calc.py", "test_calc.py", "README.md"] {
            w.start_file(f, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(&std::fs::read(repo_root().join("examples/demo-repo").join(f)).unwrap())
                .unwrap();
        }
        w.finish().unwrap();
    }
    buf.into_inner()
}

fn upload(options: proto::TaskOptions, zip: &[u8], chunk: usize) -> Vec<proto::UploadTaskRequest> {
    use proto::upload_task_request::Part;
    let mut msgs = vec![proto::UploadTaskRequest {
        part: Some(Part::Options(options)),
    }];
    msgs.extend(zip.chunks(chunk).map(|c| proto::UploadTaskRequest {
        part: Some(Part::Chunk(c.to_vec())),
    }));
    msgs
}

/// Reads a watch stream: the events until `stop_after` of them (all if None), and the final
/// record if it came.
async fn read_watch(
    c: &mut Grpc,
    id: &str,
    after: i64,
    stop_after: Option<usize>,
) -> (Vec<proto::TaskEvent>, Option<proto::Task>) {
    let mut stream = c
        .watch_task(proto::WatchTaskRequest {
            task_id: id.into(),
            after_seq: after,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.item.unwrap() {
            Item::Event(e) => {
                events.push(e);
                if stop_after == Some(events.len()) {
                    return (events, None);
                }
            }
            Item::Final(t) => {
                assert!(
                    stream.message().await.unwrap().is_none(),
                    "the final record ends the stream"
                );
                return (events, Some(t));
            }
        }
    }
    (events, None)
}

fn statuses(events: &[proto::TaskEvent]) -> Vec<String> {
    events.iter().filter_map(|e| e.status.clone()).collect()
}

fn assert_status(s: &tonic::Status, code: Code, contains: &str) {
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(contains),
        "message {:?} lacks {contains:?}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_submits_git_and_zip_watches_to_the_end_and_gets_the_result() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let mut c = client(&stack).await;
    let repo = demo_git_repo(stack.dir.path());
    let git = c
        .submit_task(proto::SubmitTaskRequest {
            git_token: None,
            git_url: format!("file://{}", repo.display()),
            git_ref: Some("main".into()),
            options: Some(options("fix")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(git.created);
    assert_eq!(git.status, "QUEUED");
    // The ZIP in small chunks, so the server puts many messages together.
    let zipped = c
        .upload_task(futures::stream::iter(upload(
            options("fix"),
            &demo_zip(),
            512,
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(zipped.created);

    for (id, source) in [(&git.task_id, "@main"), (&zipped.task_id, "uploaded zip")] {
        let (events, last) = read_watch(&mut c, id, 0, None).await;
        let last = last.expect("the stream ends with the final record");
        assert_eq!(last.status, "COMPLETED", "{last:?}\n{}", stack.logs());
        assert!(last.source.contains(source), "{}", last.source);
        assert_eq!(
            statuses(&events),
            [
                "PENDING",
                "QUEUED",
                "DOWNLOADING_CODE",
                "STAGING_CODE",
                "RUNNING_AGENT",
                "UPLOADING_RESULTS",
                "COMPLETED"
            ]
        );
        assert!(
            events.iter().any(|e| e.kind == "agent"),
            "agent progress is streamed too"
        );
        // In order, each once: the same history the HTTP API holds.
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let stored: Vec<i64> = stack.events(id).await.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, stored);

        let result = c
            .get_result(proto::GetResultRequest {
                task_id: id.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(result.diff, super::e2e::EXPECTED_DIFF);
        assert!(!result.diff_truncated);
        assert!(result.transcript.lines().count() > 2);
        let summary = result.summary.unwrap();
        assert_eq!(summary.outcome, "finished");
        assert_eq!(summary.files_changed, ["calc.py"]);
    }

    let listed = c
        .list_tasks(proto::ListTasksRequest {
            status: "COMPLETED".into(),
            page_size: 1,
            ..proto::ListTasksRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 1);
    assert_eq!(listed.tasks[0].task_id, zipped.task_id, "newest first");
    let next = c
        .list_tasks(proto::ListTasksRequest {
            status: "COMPLETED".into(),
            page_size: 1,
            page_token: listed.next_page_token,
            ..proto::ListTasksRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.tasks[0].task_id, git.task_id);

    // The CLI: a directory submitted over gRPC (zipped, streamed in chunks), then watched.
    let demo = repo_root().join("examples/demo-repo");
    let out = stack.cli(&[
        "submit",
        "--grpc",
        demo.to_str().unwrap(),
        "-d",
        "fix",
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout.lines().next().unwrap().trim().to_string();
    assert!(stdout.contains(&format!("{id}  COMPLETED")), "{stdout}");
    let out = stack.cli(&["watch", &id, "--json"]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, events) = lines.split_last().unwrap();
    assert_eq!(last["final"]["status"], "COMPLETED");
    assert_eq!(events.len(), stack.events(&id).await.len());
    let out = stack.cli(&["watch", "tsk_00000000000000000000000000000000"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_resumes_after_the_last_event_exactly_once() {
    // A slow model, so the task is still running when the first watcher goes away.
    let mut script = demo_script();
    script.delay_ms = 400;
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let mut c = client(&stack).await;
    let repo = demo_git_repo(stack.dir.path());
    let id = c
        .submit_task(proto::SubmitTaskRequest {
            git_token: None,
            git_url: format!("file://{}", repo.display()),
            git_ref: None,
            options: Some(options("fix")),
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let (first, last) = read_watch(&mut c, &id, 0, Some(5)).await;
    assert!(last.is_none());
    let cut = first.last().unwrap().seq;
    let record = stack.record(&id).await;
    assert_ne!(record["status"], "COMPLETED", "cut mid-stream: {record}");
    // Reconnect (a new connection) after the last event seen.
    let mut c2 = client(&stack).await;
    let (rest, last) = read_watch(&mut c2, &id, cut, None).await;
    assert_eq!(last.unwrap().status, "COMPLETED");
    assert!(rest.iter().all(|e| e.seq > cut));
    let seen: Vec<i64> = first.iter().chain(&rest).map(|e| e.seq).collect();
    let stored: Vec<i64> = stack.events(&id).await.iter().map(|e| e.seq).collect();
    assert_eq!(seen, stored, "every event once, none missing");
    // Resuming after the very last event of an ended task answers just the final record.
    let (none, last) = read_watch(&mut c2, &id, *stored.last().unwrap(), None).await;
    assert!(none.is_empty());
    assert_eq!(last.unwrap().status, "COMPLETED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_have_their_codes_and_the_http_messages() {
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[
            ("PATCHFLOW_MAX_UPLOAD_BYTES", "65536"),
            // Two refused uploads (the limit is taken before their bytes are read), one
            // task, a blank description and a bad ref (refused by the service, after the
            // limit): the next submission is the sixth.
            ("PATCHFLOW_SUBMIT_RATE_CAPACITY", "5"),
            ("PATCHFLOW_SUBMIT_RATE_PER_SEC", "0.001"),
        ],
    )
    .await;
    let mut c = client(&stack).await;
    let unknown = "tsk_00000000000000000000000000000000";

    let e = c
        .get_task(proto::GetTaskRequest {
            task_id: unknown.into(),
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::NotFound, &format!("task {unknown} not found"));
    assert_eq!(e.metadata().get("x-patchflow-code").unwrap(), "not_found");
    let (_, http) = stack.get_json(&format!("/api/tasks/{unknown}")).await;
    assert_eq!(e.message(), http["message"], "the same words as HTTP");

    let e = c
        .get_task(proto::GetTaskRequest {
            task_id: "bad!id".into(),
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "is not a task id");
    let e = c
        .watch_task(proto::WatchTaskRequest {
            task_id: unknown.into(),
            after_seq: 0,
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::NotFound, "not found");
    let e = c
        .submit_task(proto::SubmitTaskRequest {
            git_token: None,
            git_url: " ".into(),
            git_ref: None,
            options: Some(options("fix")),
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "a source is required");

    // Too big: refused while streaming, before any task exists.
    let big = vec![7u8; 100 * 1024];
    let e = c
        .upload_task(futures::stream::iter(upload(
            options("fix"),
            &big,
            16 * 1024,
        )))
        .await
        .unwrap_err();
    assert_status(
        &e,
        Code::ResourceExhausted,
        "upload is larger than 65536 bytes",
    );
    let e = c
        .upload_task(futures::stream::iter(vec![proto::UploadTaskRequest {
            part: Some(proto::upload_task_request::Part::Chunk(vec![1, 2, 3])),
        }]))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "first message of an upload");
    let e = c
        .list_tasks(proto::ListTasksRequest {
            status: "RUNNING".into(),
            ..proto::ListTasksRequest::default()
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "unknown status `RUNNING`");
    assert!(
        c.list_tasks(proto::ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tasks
            .is_empty(),
        "nothing was stored"
    );

    // Cancel of an ended task.
    let repo = demo_git_repo(stack.dir.path());
    let id = c
        .submit_task(proto::SubmitTaskRequest {
            git_token: None,
            git_url: format!("file://{}", repo.display()),
            git_ref: None,
            options: Some(options("fix")),
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    stack.wait_terminal(&id).await;
    let e = c
        .cancel_task(proto::CancelTaskRequest {
            task_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_status(
        &e,
        Code::FailedPrecondition,
        &format!("task {id} is already COMPLETED"),
    );
    // from_failed_step of a task that completed has nothing to resume.
    let e = c
        .retry_task(proto::RetryTaskRequest {
            task_id: id.clone(),
            mode: proto::RetryMode::FromFailedStep as i32,
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "no step failed to retry from");
    // A blank description is bad input (and spends a submission).
    let e = c
        .submit_task(proto::SubmitTaskRequest {
            git_token: None,
            git_url: format!("file://{}", repo.display()),
            git_ref: None,
            options: Some(options("  ")),
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "task_description");
    let e = c
        .submit_task(proto::SubmitTaskRequest {
            git_token: None,
            git_url: format!("file://{}", repo.display()),
            git_ref: Some("--bad".into()),
            options: Some(options("fix")),
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "is not a valid branch");
    // A setup that is not the JSON object, or names a field there is not, is refused
    // before anything is stored.
    for (bad, why) in [
        ("pip install", "setup_json"),
        (r#"{"setup_script": "x", "as_root": true}"#, "as_root"),
    ] {
        let e = c
            .submit_task(proto::SubmitTaskRequest {
                git_token: None,
                git_url: format!("file://{}", repo.display()),
                git_ref: None,
                options: Some(proto::TaskOptions {
                    setup_json: Some(bad.into()),
                    ..options("fix")
                }),
            })
            .await
            .unwrap_err();
        assert_status(&e, Code::InvalidArgument, why);
    }
    // The sixth submission within the burst of five is rate limited.
    let e = c
        .submit_task(proto::SubmitTaskRequest {
            git_token: None,
            git_url: format!("file://{}", repo.display()),
            git_ref: None,
            options: Some(options("fix")),
        })
        .await
        .unwrap_err();
    assert_status(
        &e,
        Code::ResourceExhausted,
        "too many submissions for tenant default",
    );
    let record = stack.record(&id).await;
    assert_eq!(record["status"], "COMPLETED", "the task is intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection_answer_without_the_proto() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let channel = Channel::from_shared(stack.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "patchflow.v1.Tasks".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let e = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Reflection (what grpcurl asks first), in both versions tools use.
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_client};
    let mut reflection = server_reflection_client::ServerReflectionClient::new(channel.clone());
    let ask = |m: MessageRequest| {
        futures::stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        }])
    };
    let mut answers = reflection
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["patchflow.v1.Tasks", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    let mut answers = reflection
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "patchflow.v1.Tasks".into(),
        )))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a file descriptor")
    };
    let proto_file = String::from_utf8_lossy(&files.file_descriptor_proto[0]).to_string();
    assert!(proto_file.contains("patchflow/v1/tasks.proto") && proto_file.contains("WatchTask"));
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel,
        );
    let mut answers = alpha
        .server_reflection_info(futures::stream::iter(vec![
            tonic_reflection::pb::v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                        String::new(),
                    ),
                ),
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().is_some());
}
