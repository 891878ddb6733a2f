//! Prometheus metrics, `/healthz` and `/readyz` scraped from a running daemon.

use std::time::Duration;

use crate::support::{DaemonProc, DemoEnv};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_endpoints() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let port = free_port();
    env.edit_config(|t| {
        t.replace(
            "[daemon]",
            &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\""),
        )
    });
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&format!("{base}/healthz")).await, (200, "ok\n".into()));
    assert_eq!(
        get(&format!("{base}/readyz")).await,
        (200, "ready\n".into())
    );
    let (code, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    for needle in [
        "tokenwarden_token_expiry_timestamp_seconds{client=\"transatel\"}",
        "tokenwarden_token_seconds_until_expiry{client=\"talkdesk\"}",
        "tokenwarden_token_valid{client=\"creads-files\"} 1",
        "tokenwarden_refresh_attempts_total{client=\"transatel\",result=\"success\"} 1",
        "tokenwarden_refresh_duration_seconds_bucket{client=\"transatel\",le=\"0.5\"}",
        "tokenwarden_output_writes_total{client=\"transatel\",result=\"success\"} 2",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
    let left: f64 = text
        .lines()
        .find(|l| l.starts_with("tokenwarden_token_seconds_until_expiry{client=\"talkdesk\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(left > 590.0 && left <= 600.0, "{left}");
    // Tokens never appear in metrics.
    let token = std::fs::read_to_string(env.out("transatel.token")).unwrap();
    assert!(!text.contains(&token));
    assert_eq!(get(&format!("{base}/nope")).await.0, 404);

    // A reload with a broken config is counted; a good one too.
    env.edit_config(|t| t.replace("[defaults]", "[defaults]\nbogus = 1"));
    daemon
        .wait_log("reload refused", Duration::from_secs(10))
        .await;
    env.edit_config(|t| t.replace("\nbogus = 1", ""));
    daemon.wait_log("reloaded", Duration::from_secs(10)).await;
    let (_, text) = get(&format!("{base}/metrics")).await;
    assert!(
        text.contains("tokenwarden_config_reloads_total{result=\"failure\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tokenwarden_config_reloads_total{result=\"success\"} 1"),
        "{text}"
    );

    // gRPC calls, by method and code: GetToken answered inline, one refused by the service,
    // ListClients.
    let socket = env.demo.socket.to_str().unwrap();
    for args in [
        &["get", "transatel", "-s", socket][..],
        &["get", "transatel", "-s", socket],
        &["get", "nope", "-s", socket],
        &["status", "-s", socket],
    ] {
        crate::support::run(args).await;
    }
    let (_, text) = get(&format!("{base}/metrics")).await;
    let count = |method: &str, code: &str| -> f64 {
        let series =
            format!("tokenwarden_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("TokenService/GetToken", "OK"), 2.0, "{text}");
    assert_eq!(count("TokenService/GetToken", "NOT_FOUND"), 1.0, "{text}");
    assert_eq!(count("TokenService/ListClients", "OK"), 1.0, "{text}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_names_the_clients_without_a_good_token() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let port = free_port();
    env.edit_config(|t| {
        t.replace(
            "[daemon]",
            &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\""),
        )
    });
    env.provider
        .set_fault(Some(tokenwarden::provider::Fault::ServerError));
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(ready.contains("0/5 clients valid"), "{ready}");
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    let (code, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(code, 503);
    assert!(
        body.contains("transatel") && body.contains("talkdesk"),
        "{body}"
    );
    let (_, text) = get(&format!("{base}/metrics")).await;
    assert!(
        text.contains(
            "tokenwarden_refresh_attempts_total{client=\"transatel\",result=\"failure\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("tokenwarden_token_valid{client=\"transatel\"} 0"),
        "{text}"
    );
    daemon.stop().await;
}
