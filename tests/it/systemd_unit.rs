//! The shipped systemd unit: its contract lines, and its sandboxing as rated by
//! `systemd-analyze security --offline=yes` (1.5 or lower), when systemd-analyze is installed.

use std::path::Path;

fn unit() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/tokenwarden.service"),
    )
    .unwrap()
}

#[test]
fn the_unit_has_its_contract_lines() {
    let u = unit();
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/tokenwarden run -c /etc/tokenwarden/tokenwarden.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "WatchdogSec=",
        "User=tokenwarden",
        "StateDirectory=tokenwarden",
        "RuntimeDirectory=tokenwarden",
        // The docs say token files are left in place when the service stops.
        "RuntimeDirectoryPreserve=yes",
        "ConfigurationDirectory=tokenwarden",
        "#LoadCredential=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LimitNOFILE=8192",
    ] {
        assert!(u.lines().any(|l| l.starts_with(line)), "missing {line}");
    }
}

#[test]
fn systemd_analyze_rates_the_unit_ok() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let out = match std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.join("tokenwarden.service"))
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "SKIPPED: systemd-analyze not available ({e}); install systemd to run this check"
            );
            return;
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for tokenwarden.service"))
        .unwrap_or_else(|| panic!("no rating in:\n{text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line}"));
    println!("{line}");
    assert!(score <= 1.5, "{line}\n{text}");
}
