//! Log hygiene and the generated admin key: keys, secrets and request bodies never reach the
//! logs, and a generated admin key lives only in its 0600 file.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::support::{APP_KEY, BinDaemon, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_admin_key_is_stored_0600_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Arc::new(Mutex::new(String::new()));
    let d = BinDaemon::start_opts(
        dir.path(),
        &[("RUST_LOG", "debug")],
        false,
        Some(logs.clone()),
    );
    let key_file = dir.path().join("admin.key");
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(key.len() >= 32, "a long random key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The key from the file is the admin key.
    let r = d
        .client
        .send(
            reqwest::Method::PUT,
            "/v1/accounts/gen",
            Some(&key),
            Some(json!({"plan": "free", "email": "secret-email@example.com"})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // Traffic with a marker in the body and a wrong key.
    let marker = "BODY-MARKER-7f3a9c";
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/accounts/gen/consume",
            Some(APP_KEY),
            Some(
                json!({"meter": "tokens", "quantity": 1, "idempotency_key": "k1",
                        "metadata": {"note": marker}}),
            ),
        )
        .await;
    assert_eq!(r.status, 200);
    let wrong = "wrong-key-SHOULD-NOT-BE-LOGGED";
    let r = d
        .client
        .send(reqwest::Method::GET, "/v1/accounts/gen", Some(wrong), None)
        .await;
    assert_eq!(r.status, 401);
    let status = tokio::task::spawn_blocking(move || d.sigterm(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success());
    // Logs are read on another thread: wait (bounded) for the final line.
    eventually(Duration::from_secs(5), || {
        let logs = logs.clone();
        async move { logs.lock().unwrap().contains("meterd stopped") }
    })
    .await;
    let text = logs.lock().unwrap().clone();
    assert!(
        text.contains(&key_file.display().to_string()),
        "the log names the key file:\n{text}"
    );
    for secret in [
        key.as_str(),
        APP_KEY,
        wrong,
        marker,
        "secret-email@example.com",
    ] {
        assert!(
            !text.contains(secret),
            "`{secret}` leaked into the logs:\n{text}"
        );
    }
}

#[test]
fn a_too_short_key_in_the_environment_is_refused() {
    let out = crate::support::output_within(
        std::process::Command::new(crate::support::meterd_bin())
            .args(["check-config", "--config"])
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
            .env("METERD_ADMIN_KEY", "short"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("METERD_ADMIN_KEY"), "{err}");
    assert!(
        !err.contains("short\n") && !err.contains("`short`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_secrets_signatures_and_payloads_never_reach_the_info_log() {
    use crate::support::signer::sign;
    let secret = "whsec_LOGTEST_never_in_logs_5d1e";
    let dir = tempfile::tempdir().unwrap();
    let logs = Arc::new(Mutex::new(String::new()));
    let d = BinDaemon::start_opts(
        dir.path(),
        &[("RUST_LOG", "info"), ("STRIPE_WEBHOOK_SECRET", secret)],
        true,
        Some(logs.clone()),
    );
    let r = d
        .client
        .put_account("acct_acme", json!({"plan": "free"}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let events = crate::support::stripe_events_dir();
    let mut signatures = Vec::new();
    for name in [
        "customer.subscription.created.json",
        "customer.updated.json",
        "invoice.paid.json",
        "payment_method.detached.json",
        "checkout.session.completed.payment_topup.json",
    ] {
        let body = std::fs::read(events.join(name)).unwrap();
        let now = meterd_actors::model::Clock::System.now_ms() / 1000;
        let sig = sign(&body, secret, now);
        let r = d
            .client
            .http
            .post(format!("{}/webhooks/stripe", d.client.base))
            .header("stripe-signature", &sig)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        // And a forged one.
        let forged = sign(&body, "whsec_wrong_secret_abcdef", now);
        let r = d
            .client
            .http
            .post(format!("{}/webhooks/stripe", d.client.base))
            .header("stripe-signature", &forged)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        signatures.push(sig);
        signatures.push(forged);
    }
    eventually(Duration::from_secs(10), || {
        let logs = logs.clone();
        async move { logs.lock().unwrap().matches("stripe event").count() >= 5 }
    })
    .await;
    let status = tokio::task::spawn_blocking(move || d.sigterm(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success());
    eventually(Duration::from_secs(5), || {
        let logs = logs.clone();
        async move { logs.lock().unwrap().contains("meterd stopped") }
    })
    .await;
    let text = logs.lock().unwrap().clone();
    assert!(text.contains("stripe webhook received"), "{text}");
    let mut leaks: Vec<String> = vec![
        secret.into(),
        "billing@acme-analytics.example".into(),
        "invoice.stripe.com".into(),
        "hosted_invoice_url".into(),
        "livemode".into(),
        "last4".into(),
        "Acme".into(),
    ];
    for s in &signatures {
        leaks.push(s.split("v1=").nth(1).unwrap().to_owned());
    }
    for s in leaks {
        assert!(!text.contains(&s), "`{s}` leaked into the logs:\n{text}");
    }
}

#[test]
fn strict_mode_refuses_to_start_without_a_webhook_secret() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = include_str!("../../config.toml");
    assert!(shipped.contains("strict = false"));
    let cfg = dir.path().join("strict.toml");
    std::fs::write(&cfg, shipped.replace("strict = false", "strict = true")).unwrap();
    // A start that is not refused would serve forever: bounded.
    let out = crate::support::output_within(
        std::process::Command::new(crate::support::meterd_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("METERD_ADMIN_KEY", crate::support::ADMIN_KEY)
            .env_remove("STRIPE_WEBHOOK_SECRET")
            .env_remove("STRIPE_SECRET_KEY"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("STRIPE_WEBHOOK_SECRET") && err.contains("strict"),
        "{err}"
    );
}
