//! What the .deb ships besides the binary: the manual pages and shell completions the binary's
//! hidden `generate-assets` writes from its CLI definition, and Cargo.toml's
//! `[package.metadata.deb]` naming only files that exist or are generated. The release .deb
//! itself is built by `scripts/package.sh` in `.ci/run`, not here.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{bin, read};

/// The commands: those of the command-line contract, then `init`.
const COMMANDS: [&str; 8] = [
    "run", "check", "once", "get", "status", "refresh", "init", "demo",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tokenwarden generate-assets DIR`; returns the files it says it wrote.
fn generate(dir: &Path) -> Vec<PathBuf> {
    let out = Command::new(bin())
        .arg("generate-assets")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate-assets: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<PathBuf> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    for p in &listed {
        assert!(p.is_file(), "{} listed but not written", p.display());
    }
    listed
}

#[test]
fn the_cli_definition_has_exactly_the_spec_commands() {
    let cmd = tokenwarden::cli::command();
    let names: Vec<&str> = cmd.get_subcommands().map(|s| s.get_name()).collect();
    assert_eq!(names, COMMANDS);
}

#[test]
fn the_manual_is_section_8_roff_covering_every_command() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path());

    let main = read(&dir.path().join("tokenwarden.8"));
    assert!(main.contains(".TH tokenwarden 8 "), "{main}");
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "COMMANDS",
        "FILES",
        "ENVIRONMENT",
        "SIGNALS",
        "\"EXIT STATUS\"",
        "\"SEE ALSO\"",
    ] {
        assert!(main.contains(&format!("\n.SH {section}\n")), "{section}");
    }
    // roff escapes '-' as '\-'.
    for c in COMMANDS {
        assert!(
            main.contains(&format!("tokenwarden\\-{c}(8)")),
            "{c} missing from tokenwarden.8"
        );
    }
    for needle in [
        "/etc/tokenwarden/tokenwarden.toml",
        "/var/lib/tokenwarden",
        "SIGHUP",
        "TOKENWARDEN_CONFIG",
    ] {
        assert!(main.contains(needle), "{needle}");
    }
    assert!(
        !main.contains("generate"),
        "the hidden command is documented"
    );

    for c in COMMANDS {
        let page = read(&dir.path().join(format!("tokenwarden-{c}.8")));
        assert!(
            page.contains(&format!(".TH tokenwarden-{c} 8 ")),
            "{c}: {page}"
        );
        assert!(
            page.contains(&format!("\\fBtokenwarden {c}\\fR")),
            "{c}: {page}"
        );
        assert!(page.contains("\n.SH \"EXIT STATUS\"\n"), "{c}");
    }
    let get = read(&dir.path().join("tokenwarden-get.8"));
    for flag in [
        "\\-\\-socket",
        "\\-\\-format",
        "\\-\\-min\\-valid",
        "header",
    ] {
        assert!(get.contains(flag), "{flag} missing from tokenwarden-get.8");
    }

    // man(1) renders it without complaint where it is installed.
    if let Ok(out) = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(dir.path().join("tokenwarden.8"))
        .env("MANWIDTH", "80")
        .output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("EXIT STATUS"), "{text}");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(warnings.trim().is_empty(), "man warns: {warnings}");
    }
}

#[test]
fn completions_offer_every_command_and_parse() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path());
    for (file, shell) in [
        ("tokenwarden.bash", "bash"),
        ("_tokenwarden", "zsh"),
        ("tokenwarden.fish", "fish"),
    ] {
        let path = dir.path().join(file);
        let text = read(&path);
        for c in COMMANDS {
            assert!(text.contains(c), "{c} missing from {file}");
        }
        assert!(
            !text.contains("generate"),
            "{file} offers the hidden command"
        );
        // Syntax check with the shell itself, where it is installed.
        if let Ok(out) = Command::new(shell).arg("-n").arg(&path).output() {
            assert!(
                out.status.success(),
                "{shell} -n {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // bash completes the commands, and get's --format values.
    let complete = |words: &str, cword: usize, cur: &str, prev: &str| -> String {
        let script = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _tokenwarden tokenwarden '{cur}' '{prev}'; echo \"${{COMPREPLY[@]}}\"",
            dir.path().join("tokenwarden.bash").display()
        );
        let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let top = complete("tokenwarden ''", 1, "", "tokenwarden");
    for c in COMMANDS {
        assert!(top.split_whitespace().any(|w| w == c), "{c}: {top}");
    }
    assert_eq!(
        complete("tokenwarden get --format ''", 3, "", "--format").trim(),
        "token json header k8s-exec"
    );
}

#[test]
fn the_hidden_generator_is_not_in_help() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("refresh"), "{help}");
    assert!(!help.contains("generate"), "{help}");
}

#[test]
fn every_deb_asset_exists_or_is_generated() {
    let generated = tempfile::tempdir().unwrap();
    let written = generate(generated.path());

    let manifest: toml::Table = read(&repo().join("Cargo.toml")).parse().unwrap();
    let deb = manifest["package"]["metadata"]["deb"].as_table().unwrap();
    let assets = deb["assets"].as_array().unwrap();
    let mut destinations = Vec::new();
    let mut covered = vec![false; written.len()];
    for asset in assets {
        let [src, dst, mode] = asset.as_array().unwrap().as_slice() else {
            panic!("asset is not [source, destination, mode]: {asset}");
        };
        let (src, dst, mode) = (
            src.as_str().unwrap(),
            dst.as_str().unwrap(),
            mode.as_str().unwrap(),
        );
        assert!(u32::from_str_radix(mode, 8).is_ok(), "{src}: mode {mode}");
        assert!(
            !dst.starts_with('/'),
            "{dst}: cargo-deb wants relative targets"
        );
        destinations.push(dst.to_string());

        if src == "target/release/tokenwarden" {
            continue; // the binary scripts/package.sh builds
        }
        let (root, pattern) = match src.strip_prefix("target/assets/") {
            Some(rest) => (generated.path(), rest),
            None => (repo(), src),
        };
        let matches: Vec<PathBuf> = glob::glob(&root.join(pattern).to_string_lossy())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(!matches.is_empty(), "{src} matches no file");
        for m in &matches {
            assert!(m.is_file(), "{}", m.display());
            if let Some(i) = written.iter().position(|w| w == m) {
                covered[i] = true;
            }
        }
    }
    for (path, covered) in written.iter().zip(covered) {
        assert!(covered, "{} is generated but not packaged", path.display());
    }

    // Where the README and the unit expect things.
    for dst in [
        "usr/bin/",
        "usr/lib/systemd/system/",
        "usr/lib/sysusers.d/tokenwarden.conf",
        "usr/lib/tmpfiles.d/tokenwarden.conf",
        "etc/tokenwarden/tokenwarden.toml",
        "usr/share/man/man8/",
    ] {
        assert!(
            destinations.iter().any(|d| d == dst),
            "nothing goes to {dst}"
        );
    }
    for conf in deb["conf-files"].as_array().unwrap() {
        let conf = conf.as_str().unwrap();
        assert!(
            destinations.iter().any(|d| format!("/{d}") == conf),
            "conf-file {conf} is not an asset"
        );
    }
    // The Debian changelog's newest entry is this version (cargo-deb ships it as
    // changelog.Debian.gz; a version bump must add an entry).
    let version = manifest["package"]["version"].as_str().unwrap();
    let changelog = read(&repo().join(deb["changelog"].as_str().unwrap()));
    assert!(
        changelog.starts_with(&format!("tokenwarden ({version}-")),
        "the changelog's first entry is not {version}: {}",
        changelog.lines().next().unwrap_or_default()
    );
    let scripts = repo().join(deb["maintainer-scripts"].as_str().unwrap());
    for s in ["postinst", "prerm", "postrm"] {
        assert!(scripts.join(s).is_file(), "{s}");
    }
}

#[test]
fn maintainer_scripts_parse() {
    for s in ["postinst", "prerm", "postrm"] {
        let path = repo().join("systemd/debian").join(s);
        let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{s}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(read(&path).starts_with("#!/bin/sh\n"), "{s}");
    }
}

/// Runs the postinst with `args` under systemd as far as it can tell (a private /run holding
/// /run/systemd/system, in a mount namespace of its own), with every command it calls replaced
/// by a stub that logs its arguments; `sysusers_fails` makes systemd-sysusers exit 1.
/// Returns its exit status, stderr and the stubs' log; `None` where no namespace can be had.
fn postinst(args: &[&str], sysusers_fails: bool) -> Option<(bool, String, Vec<String>)> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    let stubs = dir.path().join("bin");
    std::fs::create_dir(&stubs).unwrap();
    for (name, code) in [
        ("systemd-sysusers", if sysusers_fails { 1 } else { 0 }),
        ("systemd-tmpfiles", 0),
        ("systemctl", 0),
        ("deb-systemd-invoke", 0),
        ("getent", 2),
        ("chgrp", 0),
    ] {
        let stub = stubs.join(name);
        std::fs::write(
            &stub,
            format!(
                "#!/bin/sh\necho \"{name} $*\" >> '{}'\nexit {code}\n",
                log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = repo().join("systemd/debian/postinst");
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs tmpfs /run || exit 99; mkdir -p /run/systemd/system; \
             PATH=\"$STUBS:$PATH\" exec sh \"$@\"",
        )
        .arg("sh")
        .arg(&script)
        .args(args)
        .env("STUBS", &stubs)
        .output()
        .ok()?;
    if out.status.code() == Some(99) || (!out.status.success() && log.metadata().is_err()) {
        eprintln!(
            "SKIPPED: cannot give the postinst a private /run: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let calls = read(&log).lines().map(str::to_string).collect();
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        calls,
    ))
}

#[test]
fn postinst_restarts_on_upgrade_only_and_fails_without_its_user() {
    // First install: the user, the directories, a daemon-reload; nothing started.
    let Some((ok, err, calls)) = postinst(&["configure"], false) else {
        return;
    };
    assert!(ok, "{err}");
    let reload = |calls: &[String]| calls.iter().any(|c| c.ends_with(" daemon-reload"));
    let starts = |calls: &[String]| calls.iter().any(|c| c.contains("start"));
    assert_eq!(
        calls[..2],
        [
            "systemd-sysusers tokenwarden.conf",
            "systemd-tmpfiles --create tokenwarden.conf"
        ]
    );
    assert!(reload(&calls) && !starts(&calls), "{calls:?}");
    // Upgrade from 0.0.9: the same, then a running service is restarted.
    let (ok, err, calls) = postinst(&["configure", "0.0.9"], false).unwrap();
    assert!(ok, "{err}");
    assert_eq!(
        calls.last().map(String::as_str),
        Some("deb-systemd-invoke try-restart tokenwarden.service"),
        "{calls:?}"
    );
    assert!(reload(&calls), "{calls:?}");
    // The user cannot be created: the installation fails, saying why, before anything else.
    let (ok, err, calls) = postinst(&["configure", "0.0.9"], true).unwrap();
    assert!(!ok, "{calls:?}");
    assert!(err.contains("systemd-sysusers"), "{err}");
    assert_eq!(calls, ["systemd-sysusers tokenwarden.conf"]);
}
