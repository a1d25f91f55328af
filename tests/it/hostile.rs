//! Hostile and careless clients (issue 11): stalled connections, the connection cap, slow
//! bodies, wrong keys from one peer, key rotation, and start-up refusals of unsafe keys and
//! permissions.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{ADMIN_KEY, APP_KEY, TestDaemon, secrets, test_config};

/// Reads until the peer closes (or `bound` passes: then `None`). Returns what was read.
async fn read_to_close(s: &mut TcpStream, bound: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn tight(c: &mut meterd::config::Config) {
    c.connections.header_read_timeout = Duration::from_secs(1);
    c.connections.idle_timeout = Duration::from_secs(2);
    c.body_read_timeout = Duration::from_secs(1);
}

#[tokio::test]
async fn hundreds_of_stalled_connections_are_closed_in_time_while_consumes_go_on() {
    let d = TestDaemon::start_with(|c| {
        tight(c);
        c.connections.max_connections = 1000;
    })
    .await;
    assert_eq!(
        d.client
            .put_account("s1", json!({"plan": "payg"}))
            .await
            .status,
        201
    );
    let opened = Instant::now();
    let mut silent = Vec::new();
    let mut half_head = Vec::new();
    let mut half_body = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        match i % 3 {
            0 => silent.push(s),
            1 => {
                s.write_all(b"POST /v1/accounts/s1/consume HTTP/1.1\r\nHost: x\r\nAuthor")
                    .await
                    .unwrap();
                half_head.push(s);
            }
            _ => {
                let head = format!(
                    "POST /v1/accounts/s1/consume HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {APP_KEY}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"meter\":"
                );
                s.write_all(head.as_bytes()).await.unwrap();
                half_body.push(s);
            }
        }
    }
    // Normal traffic is served meanwhile.
    for i in 0..20 {
        let r = d.client.consume("s1", 1, &format!("k{i}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // Every stalled connection is closed by its deadline (plus slack for a loaded machine);
    // a trickled body is answered 408 first.
    for mut s in silent.into_iter().chain(half_head) {
        let got = read_to_close(&mut s, Duration::from_secs(20)).await;
        assert!(got.is_some(), "a stalled connection stayed open");
    }
    for mut s in half_body {
        let got = read_to_close(&mut s, Duration::from_secs(20))
            .await
            .expect("a connection with a stalled body stayed open");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("request_timeout"), "{text}");
    }
    // Nothing was counted from the stalled requests.
    let acct = d.client.get_account("s1").await;
    assert_eq!(acct.body["meters"]["tokens"]["used"], 20, "{:?}", acct.body);
    assert!(opened.elapsed() < Duration::from_secs(60));
    d.stop().await;
}

#[tokio::test]
async fn over_the_connection_cap_idle_connections_make_room_and_busy_ones_make_others_wait() {
    let d = TestDaemon::start_with(|c| {
        c.connections.header_read_timeout = Duration::from_secs(3);
        c.connections.idle_timeout = Duration::from_secs(60);
        c.connections.max_connections = 4;
    })
    .await;
    // Silent connections fill the cap: a new client gets in at once, and they are closed.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(d.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fresh = crate::support::Client::new(d.addr);
    let status = tokio::time::timeout(Duration::from_secs(10), fresh.get_noauth("/healthz"))
        .await
        .expect("an idle connection made room");
    assert_eq!(status.0, 200);
    let mut closed = 0;
    for mut s in silent {
        if read_to_close(&mut s, Duration::from_secs(5))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert!(closed >= 1, "no idle connection was closed to make room");
    drop(fresh);

    // Connections in the middle of a request are not idle: a new one waits for them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut busy = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = tokio::spawn({
        let client = crate::support::Client::new(d.addr);
        async move { client.get_noauth("/healthz").await.0 }
    });
    // Not served while four requests are being received (their header timeout is 3 s).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "served past the connection cap");
    let status = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting connection was never served")
        .unwrap();
    assert_eq!(status, 200);
    for mut s in busy {
        assert!(
            read_to_close(&mut s, Duration::from_secs(10))
                .await
                .is_some()
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn wrong_keys_are_rate_limited_per_peer_for_every_key() {
    let d = TestDaemon::start_with(|c| {
        c.failed_auth.burst = 3;
        c.failed_auth.per_minute = 6;
    })
    .await;
    let get = |key: &'static str| {
        let client = d.client.clone();
        async move {
            client
                .send(reqwest::Method::GET, "/v1/accounts/x", Some(key), None)
                .await
        }
    };
    for _ in 0..3 {
        let r = get("wrong-key-0123456789abc").await;
        assert_eq!(r.status, 401, "{:?}", r.body);
    }
    let r = get("wrong-key-0123456789abc").await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.code(), "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    // The right key from the same peer waits too: answering it would tell a guesser.
    let r = get(APP_KEY).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    // Health checks need no key and are never limited.
    assert_eq!(d.client.get_noauth("/healthz").await.0, 200);
    d.stop().await;
}

#[tokio::test]
async fn several_keys_per_scope_all_work_during_a_rotation() {
    let mut s = secrets();
    s.app_keys = vec![APP_KEY.into(), "app-new-key-abcdef0123456".into()];
    s.admin_keys = vec![ADMIN_KEY.into(), "admin-new-key-abcdef01234".into()];
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_full(dir, |_| {}, meterd_actors::model::Clock::System, s).await;
    for (key, status) in [
        ("admin-new-key-abcdef01234", 201),
        (ADMIN_KEY, 200),
        ("app-new-key-abcdef0123456", 403),
        (APP_KEY, 403),
    ] {
        let r = d
            .client
            .send(
                reqwest::Method::PUT,
                "/v1/accounts/rot",
                Some(key),
                Some(json!({"plan": "free"})),
            )
            .await;
        assert_eq!(r.status, status, "{key}: {:?}", r.body);
    }
    for key in ["app-new-key-abcdef0123456", APP_KEY] {
        let r = d
            .client
            .send(reqwest::Method::GET, "/v1/accounts/rot", Some(key), None)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    d.stop().await;
}

/// Runs the daemon's start-up on `dir` and returns its error.
async fn start_error(dir: &std::path::Path, secrets: meterd::daemon::Secrets) -> String {
    let config = test_config(dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = meterd::daemon::run(config, secrets, listener, std::future::ready(()));
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(())) => panic!("the daemon started"),
        Err(_) => panic!("start-up neither failed nor returned"),
    }
}

#[tokio::test]
async fn an_app_key_equal_to_an_admin_key_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = secrets();
    s.app_keys = vec!["other-app-key-0123456789".into(), ADMIN_KEY.into()];
    let e = start_error(dir.path(), s).await;
    assert!(e.contains("also an admin key"), "{e}");
    assert!(!e.contains(ADMIN_KEY), "the key leaked into the error: {e}");
}

#[tokio::test]
async fn an_open_admin_key_file_or_data_dir_is_a_start_up_error_saying_how_to_fix_it() {
    // The generated admin.key, then widened.
    let dir = tempfile::tempdir().unwrap();
    let mut s = secrets();
    s.admin_keys.clear();
    let d =
        TestDaemon::start_full(dir, |_| {}, meterd_actors::model::Clock::System, s.clone()).await;
    let dir = d.stop().await;
    let key_file = dir.path().join("admin.key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = start_error(dir.path(), s.clone()).await;
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A data dir holding a store, open to others.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = start_error(dir.path(), s).await;
    assert!(e.contains("chmod 700"), "{e}");
    assert!(e.contains("755"), "{e}");
}

#[tokio::test]
async fn the_data_dir_is_created_0700_and_an_empty_open_one_is_narrowed() {
    let parent = tempfile::tempdir().unwrap();
    let fresh = parent.path().join("fresh");
    meterd::daemon::prepare_data_dir(&fresh).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // A fresh clone's `data/` (0755, nothing in it but .gitkeep) is narrowed, not refused.
    let cloned = parent.path().join("cloned");
    std::fs::create_dir(&cloned).unwrap();
    std::fs::write(cloned.join(".gitkeep"), b"").unwrap();
    std::fs::set_permissions(&cloned, std::fs::Permissions::from_mode(0o755)).unwrap();
    meterd::daemon::prepare_data_dir(&cloned).unwrap();
    let mode = std::fs::metadata(&cloned).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

/// Sends a request head to the daemon with no body bytes, and reads the answer.
async fn head_only(d: &TestDaemon, path: &str, extra: &str, content_length: u64) -> String {
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n{extra}\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The default body read timeout is 10 s: an answer well before it was given without
    // waiting for the body.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn a_webhook_that_can_never_verify_is_refused_before_its_body_is_read() {
    let d = TestDaemon::start().await;
    let now = meterd_actors::model::Clock::System.now_ms() / 1000;
    let text = head_only(&d, "/webhooks/stripe", "", 100_000).await;
    assert!(text.contains("signature_missing"), "{text}");
    let stale = crate::support::signer::sign(b"{}", crate::support::WEBHOOK_SECRET, now - 3600);
    let text = head_only(
        &d,
        "/webhooks/stripe",
        &format!("Stripe-Signature: {stale}\r\n"),
        100_000,
    )
    .await;
    assert!(text.contains("signature_stale"), "{text}");
    let fresh = crate::support::signer::sign(b"{}", crate::support::WEBHOOK_SECRET, now);
    let text = head_only(
        &d,
        "/webhooks/stripe",
        &format!("Stripe-Signature: {fresh}\r\n"),
        100 * 1024 * 1024,
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    d.stop().await;
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_errors_quote_it() {
    let d = TestDaemon::start().await;
    let r = d.client.get_account("nobody").await;
    assert_eq!(r.status, 404);
    let header = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(header.len(), 16, "{header}");
    assert_eq!(r.body["error"]["request_id"], header.as_str());
    // Another request, another id; a success carries one too.
    let ok = d.client.get_noauth("/healthz").await;
    assert_eq!(ok.0, 200);
    let again = d.client.get_account("nobody").await;
    assert_ne!(again.headers["x-request-id"], header.as_str());
    // A client's own id is kept (and a malformed one replaced).
    for (sent, kept) in [("app-req-42", true), ("bad id with spaces", false)] {
        let r = d
            .client
            .http
            .get(format!("{}/v1/accounts/nobody", d.client.base))
            .bearer_auth(APP_KEY)
            .header("X-Request-Id", sent)
            .send()
            .await
            .unwrap();
        let got = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(got == sent, kept, "{got}");
        assert_eq!(body["error"]["request_id"], got.as_str());
    }
    // Errors poem raises itself (unknown route) carry it too.
    let r = d
        .client
        .send(reqwest::Method::GET, "/v1/nowhere", Some(APP_KEY), None)
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body["error"]["request_id"],
        r.headers["x-request-id"].to_str().unwrap()
    );
    d.stop().await;
}
