//! The web page: in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! driven over WebDriver) against the real stack, and without JavaScript (plain HTTP
//! requests, as a browser with scripting off sends them), where every page must still be
//! complete and hostile text must come out escaped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::support::{Mode, Proc, Stack, bin, demo_git_repo, demo_script, free_port};

/// A chromedriver on a free port, with its own browser profile; gone when dropped.
struct Chromedriver {
    _proc: Proc,
    url: String,
    profile: PathBuf,
}

fn on_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: scripts/test installs it (apt-get install chromium chromium-driver)")
        })
}

impl Chromedriver {
    fn start(dir: &Path) -> Chromedriver {
        let driver = on_path("chromedriver");
        let port = free_port();
        let mut cmd = Command::new(driver);
        cmd.arg(format!("--port={port}"));
        let proc = Proc::spawn("chromedriver", cmd, dir.join("chromedriver.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not start: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Chromedriver {
            _proc: proc,
            url: format!("http://127.0.0.1:{port}"),
            profile: dir.join("chromium-profile"),
        }
    }

    async fn client(&self) -> Client {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": on_path("chromium"),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1000", "--hide-scrollbars", "--force-device-scale-factor=1",
                    format!("--user-data-dir={}", self.profile.display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("cannot open a chromium session")
    }
}

/// Where test artifacts go besides the test's temporary directory: under the target dir,
/// so they outlive the test (`$CARGO_TARGET_DIR/patchflow-artifacts`).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin().parent().unwrap().parent().unwrap().to_path_buf());
    let dir = target.join("patchflow-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A screenshot of the whole page (the window grown to the page's height), kept twice.
async fn screenshot(c: &Client, stack: &Stack, width: u32, name: &str) -> PathBuf {
    let height = c
        .execute("return document.documentElement.scrollHeight", vec![])
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(1000) as u32;
    c.set_window_size(width, height.clamp(600, 8000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(stack.dir.path().join(name), &png).unwrap();
    let kept = artifacts_dir().join(name);
    std::fs::write(&kept, &png).unwrap();
    kept
}

/// The rendered text of the first match, read in one step: the script swaps sections of
/// the page as the task moves, so an element found a moment earlier may be gone.
async fn text_of(c: &Client, css: &str) -> String {
    c.execute(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null",
        vec![json!(css)],
    )
    .await
    .unwrap()
    .as_str()
    .unwrap_or_else(|| panic!("nothing matches `{css}`"))
    .to_string()
}

async fn status_on_page(c: &Client) -> String {
    c.execute(
        "return document.querySelector('#head .badge').dataset.status",
        vec![],
    )
    .await
    .unwrap()
    .as_str()
    .unwrap()
    .to_string()
}

/// Waits for `css` to match, with the page's state and the stack's logs on a timeout.
/// Signs the browser in through the sign-in form: a bad token first (refused, with the
/// reason), then the stack's admin token.
async fn sign_in(c: &Client, stack: &Stack) {
    c.goto(&format!("{}/", stack.base)).await.unwrap();
    wait_for(c, stack, "#token", 10).await;
    assert_eq!(c.title().await.unwrap(), "Sign in · patchflow");
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys("pf_not-a-real-token-but-long-enough-to-look-like-one")
        .await
        .unwrap();
    c.find(Locator::Id("signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, stack, "#signin-error", 10).await;
    assert!(text_of(c, "#signin-error").await.contains("unknown token"));
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(&stack.token)
        .await
        .unwrap();
    c.find(Locator::Id("signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, stack, "#whoami", 10).await;
    assert!(text_of(c, "#whoami").await.contains("admin"));
}

async fn wait_for(c: &Client, stack: &Stack, css: &str, secs: u64) {
    if c.wait()
        .at_most(Duration::from_secs(secs))
        .every(Duration::from_millis(100))
        .for_element(Locator::Css(css))
        .await
        .is_err()
    {
        // What the page shows and whether its script is following the task, then the logs.
        let seen = c
            .execute(
                "const t = (s) => document.querySelector(s)?.innerText ?? '(none)';
                 return `url: ${location.href}\nlive: ${!document.querySelector('.live-dot')?.hidden}\n`
                   + `head: ${t('#head')}\ntimeline: ${t('#timeline')}\nevents: ${t('#events')}`",
                vec![],
            )
            .await
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|e| format!("(cannot read the page: {e})"));
        panic!(
            "`{css}` never appeared; the page shows:\n{seen}\n{}",
            stack.logs()
        );
    }
}

/// Whether the page overflows sideways (unreadable on a phone).
async fn overflows_sideways(c: &Client) -> bool {
    c.execute(
        "return document.documentElement.scrollWidth > window.innerWidth + 1",
        vec![],
    )
    .await
    .unwrap()
    .as_bool()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_a_task_is_submitted_followed_live_and_retried() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let driver = Chromedriver::start(stack.dir.path());
    let c = driver.client().await;

    // Signed out, the page sends the browser to the sign-in form; the admin token signs in.
    sign_in(&c, &stack).await;
    let repo = demo_git_repo(stack.dir.path());
    c.find(Locator::Id("git_url"))
        .await
        .unwrap()
        .send_keys(&format!("file://{}", repo.display()))
        .await
        .unwrap();
    c.find(Locator::Id("task_description"))
        .await
        .unwrap()
        .send_keys("Fix add() in calc.py: it subtracts.")
        .await
        .unwrap();
    c.find(Locator::Id("submit-task"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The form's redirect lands on the new task's page.
    wait_for(&c, &stack, "#task[data-task]", 30).await;
    let url = c.current_url().await.unwrap();
    let id = url.path().strip_prefix("/tasks/").unwrap().to_string();
    assert!(id.starts_with("tsk_"), "{url}");
    // A mark on this document: if the page reloaded, the mark would be gone.
    c.execute("window.__notReloaded = true", vec![])
        .await
        .unwrap();
    let first_seen = status_on_page(&c).await;
    assert!(
        !matches!(first_seen.as_str(), "COMPLETED" | "FAILED" | "CANCELLED"),
        "the task had ended before the page could watch it ({first_seen})"
    );

    wait_for(&c, &stack, "#head .badge[data-status=\"COMPLETED\"]", 120).await;
    let same_document = c
        .execute("return window.__notReloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(
        same_document,
        json!(true),
        "the page reloaded to show the end"
    );
    // Live agent events arrived over the stream, and the timeline shows every status.
    let events = text_of(&c, "#events").await;
    assert!(events.contains("edit_file_content"), "{events}");
    let timeline = text_of(&c, "#timeline").await;
    for s in ["QUEUED", "DOWNLOADING_CODE", "RUNNING_AGENT", "COMPLETED"] {
        assert!(
            timeline.contains(s),
            "{s} missing from the timeline: {timeline}"
        );
    }
    // The diff, with its file header, as the API has it.
    wait_for(&c, &stack, "#diff .file", 10).await;
    assert_eq!(text_of(&c, "#diff .fname").await, "calc.py");
    let added = text_of(&c, "#diff tr.add .c").await;
    assert_eq!(added, "+    return a + b");
    let transcript = c
        .find_all(Locator::Css("#transcript .t-tool details"))
        .await
        .unwrap();
    assert_eq!(transcript.len(), 5, "one folded entry per tool call");
    assert!(text_of(&c, "#summary").await.contains("Fixed add()"));
    let link = c
        .find(Locator::Id("workflow-link"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert!(link.ends_with(&format!("/workflows/{id}")), "{link}");

    let shot = screenshot(&c, &stack, 1280, "task-page.png").await;
    eprintln!("screenshot: {}", shot.display());
    c.set_window_size(390, 844).await.unwrap();
    assert!(
        !overflows_sideways(&c).await,
        "the task page overflows a phone's width"
    );
    screenshot(&c, &stack, 390, "task-page-phone.png").await;
    c.set_window_size(1280, 1000).await.unwrap();

    // Retry from the start: a second attempt of the same task, followed on the same page.
    c.find(Locator::Id("retry"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&c, &stack, "#head #attempt", 30).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while text_of(&c, "#attempt").await != "2" {
        assert!(Instant::now() < deadline, "attempt 2 never showed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(&c, &stack, "#head .badge[data-status=\"COMPLETED\"]", 120).await;
    let flash = c
        .execute("return document.getElementById('flash').hidden", vec![])
        .await
        .unwrap();
    assert_eq!(flash, json!(true), "{}", text_of(&c, "#flash").await);
    let record = stack.record(&id).await;
    assert_eq!(record["attempt"], 2, "{record}");
    let timeline = text_of(&c, "#timeline").await.to_lowercase();
    assert!(timeline.contains("attempt 2"), "{timeline}");
    screenshot(&c, &stack, 1280, "task-page-retried.png").await;

    // The list shows the task, and a task submitted elsewhere appears and finishes there
    // without a reload; typing in the search hides what does not match.
    c.goto(&format!("{}/", stack.base)).await.unwrap();
    wait_for(&c, &stack, &format!("a[href=\"/tasks/{id}\"]"), 10).await;
    c.execute("window.__notReloaded = true", vec![])
        .await
        .unwrap();
    let other = stack.submit_demo().await;
    wait_for(
        &c,
        &stack,
        &format!("a[href=\"/tasks/{other}\"] .badge[data-status=\"COMPLETED\"]"),
        120,
    )
    .await;
    let same_document = c
        .execute("return window.__notReloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(same_document, json!(true), "the list reloaded");
    c.set_window_size(390, 844).await.unwrap();
    assert!(
        !overflows_sideways(&c).await,
        "the list overflows a phone's width"
    );
    screenshot(&c, &stack, 390, "task-list-phone.png").await;
    c.find(Locator::Id("search"))
        .await
        .unwrap()
        .send_keys("no such task anywhere")
        .await
        .unwrap();
    let hidden = c
        .execute(
            "return [...document.querySelectorAll('li[data-search]')].map((li) => li.hidden)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hidden, json!([true, true]), "search did not hide the rows");
    c.close().await.unwrap();
}

/// A form post as a browser with scripting off sends it: every field, empty ones too, and
/// an empty file part when no ZIP was chosen.
fn browser_form(git_url: &str, description: &str, csrf: &str) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .text("csrf", csrf.to_string())
        .text("git_url", git_url.to_string())
        .text("git_ref", "")
        .part(
            "zip_file",
            reqwest::multipart::Part::bytes(Vec::new())
                .file_name("")
                .mime_str("application/octet-stream")
                .unwrap(),
        )
        .text("task_description", description.to_string())
        .text("model", "")
        .text("target_file", "")
        .text("max_steps", "")
        .text("max_tokens", "")
        .text("wall_seconds", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_javascript_pages_render_on_the_server_and_escape_hostile_text() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    // A new connection per request: the refusals below answer before reading the body and
    // the server then closes the connection, which a pooled client may already have picked
    // for its next request (a client-side race, not the server's answer).
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    // Signed out: pages send the browser to the sign-in form, form posts are refused; a
    // bad token does not sign in, the admin token does, with a cookie scripts cannot read.
    let r = plain.get(format!("{}/", stack.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/signin");
    let r = plain
        .post(format!(
            "{}/tasks/tsk_00000000000000000000000000000000/cancel",
            stack.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let signin = |token: String| {
        let plain = plain.clone();
        let url = format!("{}/signin", stack.base);
        async move {
            plain
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={token}"))
                .send()
                .await
                .unwrap()
        }
    };
    let r = signin("pf_wrongwrongwrongwrongwrongwrongwrongwrongwrong".into()).await;
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = signin(stack.token.clone()).await;
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let csrf = patchflow_gateway::auth::csrf_of(&stack.token);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::COOKIE, session.parse().unwrap());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .default_headers(headers)
        .build()
        .unwrap();
    let hostile = "Fix add() <script>alert(\"pwned\")</script> & <img src=x onerror=alert(1)>";
    let repo = demo_git_repo(stack.dir.path());

    // The plain form post answers with a redirect to the new task's page.
    let r = http
        .post(format!("{}/tasks", stack.base))
        .header("origin", &stack.base)
        .multipart(browser_form(
            &format!("file://{}", repo.display()),
            hostile,
            &csrf,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303, "{}", r.text().await.unwrap());
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let id = location.strip_prefix("/tasks/").unwrap().to_string();
    stack.wait_terminal(&id).await;

    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).send().await.unwrap();
            let status = r.status().as_u16();
            let csp = r
                .headers()
                .get("content-security-policy")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (status, csp, r.text().await.unwrap())
        }
    };
    let escaped = "Fix add() &lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;";

    let (status, csp, list) = get(format!("{}/", stack.base)).await;
    assert_eq!(status, 200);
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(
        list.contains(&format!("<a href=\"/tasks/{id}\">")),
        "{list}"
    );
    assert!(list.contains("data-status=\"COMPLETED\""), "{list}");
    assert!(list.contains(escaped), "{list}");
    assert!(
        !list.contains("<script>alert") && !list.contains("<img src=x"),
        "{list}"
    );

    let (status, _, page) = get(format!("{}{location}", stack.base)).await;
    assert_eq!(status, 200);
    assert!(page.contains(escaped), "{page}");
    assert!(
        !page.contains("<script>alert") && !page.contains("<img src=x"),
        "{page}"
    );
    assert!(page.contains("<span class=\"badge ok\" data-status=\"COMPLETED\">COMPLETED</span>"));
    assert!(
        page.contains("<span class=\"fname\">calc.py</span>"),
        "{page}"
    );
    assert!(
        page.contains("<td class=\"c\">+    return a + b</td>"),
        "{page}"
    );
    assert!(page.contains("<b>edit_file_content</b>"), "{page}");
    assert!(page.contains("<b>DOWNLOADING_CODE</b>"), "{page}");
    assert!(page.contains("id=\"workflow-link\""), "{page}");
    assert!(
        page.contains(&format!("action=\"/tasks/{id}/retry\"")),
        "{page}"
    );
    let (_, _, split) = get(format!("{}{location}?view=split", stack.base)).await;
    assert!(
        split.contains("<td class=\"c del\">    return a - b</td><td class=\"ln add\">6</td><td class=\"c add\">    return a + b</td>"),
        "{split}"
    );

    // Search and filter work on the server too.
    let (_, _, found) = get(format!("{}/?q=PWNED", stack.base)).await;
    assert!(found.contains(&format!("/tasks/{id}")));
    let (_, _, none) = get(format!("{}/?q=nothing-like-this", stack.base)).await;
    assert!(!none.contains(&format!("/tasks/{id}")) && none.contains("No tasks"));
    let (_, _, failed) = get(format!("{}/?status=FAILED", stack.base)).await;
    assert!(!failed.contains(&format!("/tasks/{id}")));
    let (status, _, bad) = get(format!("{}/?status=DONE", stack.base)).await;
    assert_eq!(status, 400);
    assert!(bad.contains("DONE"), "{bad}");
    // The admin narrows the list to a tenant.
    let (_, _, mine) = get(format!("{}/?tenant=default", stack.base)).await;
    assert!(mine.contains(&format!("/tasks/{id}")) && mine.contains("id=\"tenant-filter\""));
    let (_, _, theirs) = get(format!("{}/?tenant=elsewhere", stack.base)).await;
    assert!(!theirs.contains(&format!("/tasks/{id}")));
    // A member of another tenant cannot widen its view with the same parameter.
    let (c, v) = stack
        .post_json(
            "/api/tokens",
            &serde_json::json!({"tenant": "elsewhere", "role": "member"}),
        )
        .await;
    assert_eq!(c, 201, "{v}");
    let r = signin(v["token"].as_str().unwrap().to_string()).await;
    let outsider = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    for path in ["/?tenant=default".to_string(), format!("/tasks/{id}")] {
        let r = plain
            .get(format!("{}{path}", stack.base))
            .header(reqwest::header::COOKIE, &outsider)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert!(!body.contains(&format!("/tasks/{id}\"")), "{path}: {body}");
        assert!(!body.contains("id=\"tenant-filter\""), "{path}");
        assert!(status == 200 || status == 404, "{path}: {status}");
    }

    // Refusals come back as pages that say why, and store nothing.
    let r = http
        .post(format!("{}/tasks", stack.base))
        .multipart(browser_form("", "<b>keep me</b>", &csrf))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("a source is required"), "{body}");
    assert!(
        body.contains(">&lt;b&gt;keep me&lt;/b&gt;</textarea>"),
        "the form lost its text: {body}"
    );
    let r = http
        .post(format!("{}/tasks", stack.base))
        .header("origin", "http://evil.example")
        .multipart(browser_form(
            &format!("file://{}", repo.display()),
            "x",
            &csrf,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("may only be sent from patchflow")
    );
    let r = http
        .post(format!("{}/tasks/{id}/retry", stack.base))
        .header("sec-fetch-site", "cross-site")
        .body("mode=from_start")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // A form without the session's CSRF token is refused, even from our own origin.
    let r = http
        .post(format!("{}/tasks/{id}/cancel", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = http
        .post(format!("{}/tasks", stack.base))
        .multipart(browser_form(
            &format!("file://{}", repo.display()),
            "x",
            "0123456789abcdef0123456789abcdef",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = http
        .post(format!("{}/tasks/{id}/cancel", stack.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    assert!(r.text().await.unwrap().contains("is already COMPLETED"));
    // The API takes the session cookie too (the page's script uses it): reads as they
    // are, writes only with the session's X-CSRF-Token.
    let r = http
        .get(format!("{}/api/tasks/{id}", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for sent in [None, Some("0123456789abcdef0123456789abcdef")] {
        let mut req = http.post(format!("{}/api/tasks/{id}/cancel", stack.base));
        if let Some(t) = sent {
            req = req.header("x-csrf-token", t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "with {sent:?}");
    }
    let r = http
        .post(format!("{}/api/tasks/{id}/cancel", stack.base))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    // Signing out needs the CSRF token as well (no other site logs a visitor out).
    let r = http
        .post(format!("{}/signout", stack.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let (status, _, body) = get(format!("{}/tasks/bad!id", stack.base)).await;
    assert_eq!(status, 400);
    assert!(body.contains("is not a task id"), "{body}");
    let (status, _, body) = get(format!(
        "{}/tasks/tsk_00000000000000000000000000000000",
        stack.base
    ))
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("not found"), "{body}");
    let (_, all) = stack.get_json("/api/tasks").await;
    assert_eq!(all["tasks"].as_array().unwrap().len(), 1, "{all}");

    // Retry without JavaScript: the form's own encoding, refusals as pages, then a redirect.
    let retry = |mode: &'static str| {
        let http = http.clone();
        let csrf = csrf.clone();
        let url = format!("{}/tasks/{id}/retry", stack.base);
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("mode={mode}&csrf={csrf}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, body) = retry("from_failed_step").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("no step failed to retry from"), "{body}");
    let (status, body) = retry("sideways").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown retry mode"), "{body}");
    assert_eq!(stack.record(&id).await["attempt"], 1);
    let (status, body) = retry("from_start").await;
    assert_eq!(status, 303, "{body}");
    let record = stack.wait_terminal(&id).await;
    assert_eq!(record["attempt"], 2, "{record}");

    // A ZIP through the same form (no git URL): the task runs on the uploaded code.
    let mut zip = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut zip);
        for f in ["calc.py", "test_calc.py", "README.md"] {
            w.start_file(f, zip::write::SimpleFileOptions::default())
                .unwrap();
            std::io::Write::write_all(&mut w, &std::fs::read(repo.join(f)).unwrap()).unwrap();
        }
        w.finish().unwrap();
    }
    let form = reqwest::multipart::Form::new()
        .text("csrf", csrf.clone())
        .text("git_url", "")
        .text("git_ref", "")
        .part(
            "zip_file",
            reqwest::multipart::Part::bytes(zip.into_inner())
                .file_name("code.zip")
                .mime_str("application/zip")
                .unwrap(),
        )
        .text("task_description", "fix from a zip")
        .text("max_steps", "12");
    let r = http
        .post(format!("{}/tasks", stack.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303, "{}", r.text().await.unwrap());
    let zipped = r.headers()["location"].to_str().unwrap().to_string();
    let zipped = zipped.strip_prefix("/tasks/").unwrap().to_string();
    let record = stack.wait_terminal(&zipped).await;
    assert_eq!(record["status"], "COMPLETED", "{record}");
    assert_eq!(record["limits"]["max_steps"], 12, "{record}");
    let (_, _, zpage) = get(format!("{}/tasks/{zipped}", stack.base)).await;
    assert!(zpage.contains("<dd>uploaded zip</dd>"), "{zpage}");
    assert!(
        zpage.contains("<td class=\"c\">+    return a + b</td>"),
        "{zpage}"
    );

    // The form takes ZIPs as large as the API does (past axum's 2 MB default): this one is
    // refused for what it is, not for its size.
    let form = reqwest::multipart::Form::new()
        .text("csrf", csrf.clone())
        .text("git_url", "")
        .part(
            "zip_file",
            reqwest::multipart::Part::bytes(vec![0u8; 3 * 1024 * 1024]).file_name("big.zip"),
        )
        .text("task_description", "too big?");
    let r = http
        .post(format!("{}/tasks", stack.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("zip_file:"), "{body}");

    // Page weight (bytes on the wire, uncompressed), for the README.
    let (_, _, css) = get(format!("{}/assets/app.css", stack.base)).await;
    let (_, _, js) = get(format!("{}/assets/app.js", stack.base)).await;
    std::fs::write(artifacts_dir().join("task-list.html"), &list).unwrap();
    std::fs::write(artifacts_dir().join("task-page.html"), &page).unwrap();
    eprintln!(
        "page weight: list {} B, task page {} B, app.css {} B, app.js {} B",
        list.len(),
        page.len(),
        css.len(),
        js.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_cancel_stops_a_running_task_and_the_page_follows() {
    let mut script = demo_script();
    // The model thinks for two minutes on its first turn: the task is running when we look.
    script.turns[0].delay_ms = 120_000;
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let driver = Chromedriver::start(stack.dir.path());
    let c = driver.client().await;
    let id = stack.submit_demo().await;
    sign_in(&c, &stack).await;
    c.goto(&format!("{}/tasks/{id}", stack.base)).await.unwrap();
    c.execute("window.__notReloaded = true", vec![])
        .await
        .unwrap();
    wait_for(
        &c,
        &stack,
        "#head .badge[data-status=\"RUNNING_AGENT\"]",
        60,
    )
    .await;
    // Retry is refused while the task runs: the page offers Cancel instead.
    assert!(c.find(Locator::Id("retry")).await.is_err());
    c.find(Locator::Id("cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&c, &stack, "#head .badge[data-status=\"CANCELLED\"]", 60).await;
    let same_document = c
        .execute("return window.__notReloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(same_document, json!(true), "the page reloaded");
    // Once it has ended, the page offers Retry, both ways (a step failed to resume from).
    let modes = c
        .execute(
            "return [...document.querySelectorAll('#head select[name=mode] option')].map((o) => o.value)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(modes, json!(["from_start", "from_failed_step"]));
    assert_eq!(stack.record(&id).await["status"], "CANCELLED");
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_candidates_are_compared_selected_and_a_follow_up_is_sent() {
    let mut script = demo_script();
    // Each candidate marks its fix with its number (the request's seed).
    script.turns[2].tool_calls[0].arguments["new_text"] =
        json!("return a + b  # candidate {{seed}}");
    script.turns.extend(
        serde_json::from_value::<Vec<patchflow_scripted_model::Turn>>(json!([
            {"tool_calls": [{"name": "edit_file_content", "arguments":
                {"file_path": "calc.py", "old_text": "return a * b", "new_text": "return b * a"}}]},
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "Swapped the factors."}}]}
        ]))
        .unwrap(),
    );
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let repo = demo_git_repo(stack.dir.path());
    let (c, v) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix",
                    "candidates": 2}),
        )
        .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    assert_eq!(stack.wait_terminal(&id).await["status"], "COMPLETED");

    let driver = Chromedriver::start(stack.dir.path());
    let c = driver.client().await;
    sign_in(&c, &stack).await;
    c.goto(&format!("{}/tasks/{id}", stack.base)).await.unwrap();
    c.execute("window.__notReloaded = true", vec![])
        .await
        .unwrap();
    // Side by side, each with its own diff; no follow-up until one is selected.
    wait_for(&c, &stack, "#candidate-1 .diff", 20).await;
    assert!(text_of(&c, "#candidate-1").await.contains("# candidate 1"));
    assert!(text_of(&c, "#candidate-2").await.contains("# candidate 2"));
    let side_by_side = c
        .execute(
            "const a = document.querySelector('#candidate-1').getBoundingClientRect(),
                   b = document.querySelector('#candidate-2').getBoundingClientRect();
             return Math.abs(a.top - b.top) < 2 && b.left > a.right - 1",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(side_by_side, json!(true));
    assert!(c.find(Locator::Id("message-box")).await.is_err());
    screenshot(&c, &stack, 1400, "candidates.png").await;

    c.find(Locator::Id("select-2"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&c, &stack, "#candidate-2.selected", 20).await;
    assert_eq!(stack.record(&id).await["selected"], 2);
    wait_for(&c, &stack, "#message-box", 20).await;
    assert!(text_of(&c, "#diff").await.contains("# candidate 2"));

    // The follow-up box: the turn runs and the page follows it to its end.
    c.find(Locator::Id("message-box"))
        .await
        .unwrap()
        .send_keys("Swap the factors <script>alert(1)</script>")
        .await
        .unwrap();
    c.find(Locator::Id("send-message"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &c,
        &stack,
        ".turn[data-turn=\"2\"] .badge[data-status=\"COMPLETED\"]",
        60,
    )
    .await;
    wait_for(&c, &stack, "#head .badge[data-status=\"COMPLETED\"]", 30).await;
    let conversation = text_of(&c, "#conversation").await;
    assert!(
        conversation.contains("Swap the factors <script>alert(1)</script>"),
        "{conversation}"
    );
    assert!(text_of(&c, "#diff").await.contains("return b * a"));
    let same_document = c
        .execute("return window.__notReloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(same_document, json!(true), "the page reloaded");
    // Selection is final once the conversation went on.
    assert!(c.find(Locator::Id("select-1")).await.is_err());
    let r = stack.record(&id).await;
    assert_eq!(r["turns"].as_array().unwrap().len(), 2, "{r}");
    c.close().await.unwrap();
}
