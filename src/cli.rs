//! The command line (docs/cli.md) as one clap definition, and what is generated from it for the
//! .deb: the manual (section 8) and the bash, zsh and fish completions; plus the config's
//! manual page, `tokenwarden.toml(5)`, rendered from `docs/configuration.md` ([`config_page`]).
//!
//! The binary parses [`Cli`]; `scripts/package.sh` runs the binary's hidden
//! `generate-assets DIR` command, which calls [`write_assets`], so the manual and completions
//! always describe the commands and flags the shipped binary accepts.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::client;
use crate::config::{DEFAULT_CONFIG_PATH, DEFAULT_SOCKET_PATH, DEFAULT_STATE_DIR};

pub mod config_page;

/// The section of the manual tokenwarden's pages go in: system administration commands.
pub const MAN_SECTION: &str = "8";

/// The manual's name in the pages' headers.
const MANUAL: &str = "System Manager's Manual";

/// `tokenwarden`'s command line.
#[derive(Parser)]
#[command(
    name = "tokenwarden",
    version,
    about = "Keeps OAuth 2.0 access tokens fresh on Linux hosts",
    long_about = "Keeps OAuth 2.0 access tokens fresh on Linux hosts.\n\
        \n\
        For each client its config names, tokenwarden gets an access token from the provider's \
        token endpoint, refreshes it well ahead of expiry, writes it atomically to the files the \
        config lists and serves it over gRPC on a Unix socket. `run` is the daemon systemd \
        starts; `check` validates a config offline; `once` gets every token once and exits; \
        `get`, `status` and `refresh` ask the running daemon; `demo` runs everything against a \
        built-in token endpoint on loopback."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `-c CONFIG` of `run`, `check` and `once`.
#[derive(clap::Args, Clone)]
pub struct ConfigArg {
    /// Config file.
    #[arg(short, long, env = "TOKENWARDEN_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

/// Where the daemon's socket is.
#[derive(clap::Args, Clone)]
pub struct SocketArg {
    /// The daemon's socket (default: $TOKENWARDEN_SOCKET, else the config's `daemon.socket`,
    /// else /run/tokenwarden/tokenwarden.sock).
    #[arg(short, long)]
    pub socket: Option<PathBuf>,
    /// Config file whose `daemon.socket` is the default socket (read only if it exists; a
    /// syntax error elsewhere in it does not hide the socket).
    #[arg(short, long, env = "TOKENWARDEN_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

impl SocketArg {
    /// The socket to call: `-s`, else `$TOKENWARDEN_SOCKET`, else the config's
    /// `daemon.socket`, else the default; with a note for stderr when the config was read and
    /// has errors.
    pub fn resolve(&self) -> (PathBuf, Option<String>) {
        let env = std::env::var("TOKENWARDEN_SOCKET").ok();
        let mut note = None;
        let path = client::resolve_socket(self.socket.as_deref(), env.as_deref(), || {
            let found = client::socket_from_config(&self.config);
            note = found.note(&self.config);
            found.socket
        });
        (path, note)
    }

    /// [`SocketArg::resolve`], printing its note on stderr.
    pub fn path(&self) -> PathBuf {
        let (path, note) = self.resolve();
        if let Some(n) = note {
            eprintln!("tokenwarden: {n}");
        }
        path
    }
}

/// The hidden command the shell completions run to list client names.
pub const COMPLETE_CLIENTS: &str = "__complete-clients";

/// The socket and config a command line being completed names (`-s`, `--socket[=]`, `-c`,
/// `--config[=]`), each falling back as the command itself would.
pub fn completion_context(words: &[String]) -> (PathBuf, PathBuf) {
    let mut socket = None;
    let mut config = None;
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let (slot, inline) = match w.as_str() {
            "-s" | "--socket" => (&mut socket, None),
            "-c" | "--config" => (&mut config, None),
            w if w.starts_with("--socket=") => (&mut socket, Some(&w["--socket=".len()..])),
            w if w.starts_with("--config=") => (&mut config, Some(&w["--config=".len()..])),
            _ => continue,
        };
        let value = match inline {
            Some(v) => Some(v.to_string()),
            None => it.next().cloned(),
        };
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            *slot = Some(PathBuf::from(v));
        }
    }
    let config = config
        .or_else(|| std::env::var_os("TOKENWARDEN_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let arg = SocketArg {
        socket,
        config: config.clone(),
    };
    // No note on stderr: it would land in the middle of the user's command line.
    let (socket, _) = arg.resolve();
    (socket, config)
}

/// The commands (docs/cli.md).
#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (what systemd starts).
    Run {
        /// The config.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the config, its secrets and keys; exit 0, or 2 with one line per problem.
    Check {
        /// The config.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Fetch each client's token once (or reuse a stored valid one), write its outputs, exit.
    Once {
        /// The config.
        #[command(flatten)]
        config: ConfigArg,
        /// Log level for this run (a tracing filter such as `info` or `tokenwarden=debug`).
        #[arg(long, env = "TOKENWARDEN_LOG", default_value = "warn")]
        log_level: String,
        /// Only these clients (default: all).
        clients: Vec<String>,
    },
    /// Print a client's current token, from the running daemon.
    Get {
        /// The client (a `[clients.NAME]` of the config).
        client: String,
        /// The daemon's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// What to print.
        #[arg(long, value_enum, default_value = "token")]
        format: client::Format,
        /// Get a new token first if the current one expires sooner than this (e.g. `5m`).
        #[arg(long, value_parser = duration_arg)]
        min_valid: Option<std::time::Duration>,
    },
    /// Show every client the daemon serves: state, expiry, next refresh, failures, last error.
    Status {
        /// The daemon's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make the daemon get a new token for a client now.
    Refresh {
        /// The client.
        client: String,
        /// The daemon's socket.
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Print an annotated starting config for one client (fill in the lines marked CHANGE).
    Init {
        /// How the client gets its token.
        #[arg(long, value_enum, default_value = "client-credentials")]
        style: crate::init::Style,
        /// The client's name (its `[clients.NAME]` table, and its token file's name).
        #[arg(default_value = "example")]
        name: String,
        /// Write it to this new file (mode 0600) instead of standard output; an existing file
        /// is never replaced.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Run against a built-in token endpoint on loopback, in a fresh temporary directory.
    Demo {
        /// Directory to work in (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Token lifetime the demo provider grants (5s to 24h).
        #[arg(long, default_value = "20s", value_parser = demo_lifetime)]
        lifetime: std::time::Duration,
    },
}

/// A duration as the config writes them (`20s`, `5m`, `1h 30m`); a bare number gets the hint
/// to add its unit.
pub fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{t} has no unit: write {t}s (durations take a unit, as in the config: 20s, 5m, 1h)"
        ));
    }
    humantime::parse_duration(t).map_err(|e| format!("{e} (write e.g. 20s, 5m, 1h)"))
}

/// The shortest token lifetime `demo` accepts: its config refreshes a short token between a
/// quarter and half of its lifetime before expiry, retries from 1 s, and every token request
/// takes a few milliseconds; below a few seconds tokens expire between refreshes.
pub const DEMO_MIN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The longest: the demo shows rotation, and the provider's clock arithmetic stays far from
/// overflow.
pub const DEMO_MAX_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `demo --lifetime`: a duration from [`DEMO_MIN_LIFETIME`] to [`DEMO_MAX_LIFETIME`].
pub fn demo_lifetime(s: &str) -> Result<std::time::Duration, String> {
    let d = duration_arg(s)?;
    if d < DEMO_MIN_LIFETIME || d > DEMO_MAX_LIFETIME {
        return Err(format!(
            "{} is out of range: the demo's tokens live {}s to {}h",
            humantime::format_duration(d),
            DEMO_MIN_LIFETIME.as_secs(),
            DEMO_MAX_LIFETIME.as_secs() / 3600,
        ));
    }
    Ok(d)
}

/// The clap command of [`Cli`], as the manual and the completions describe it.
pub fn command() -> clap::Command {
    Cli::command()
}

/// The file names [`write_assets`] writes, the names `Cargo.toml`'s `[package.metadata.deb]`
/// expects under `target/assets/`: the main manual page, then the bash, zsh and fish
/// completions. (The manual pages of the subcommands, `tokenwarden-NAME.8`, and the config's,
/// [`config_page::FILE`], come on top.)
pub const ASSETS: [&str; 4] = [
    "tokenwarden.8",
    "tokenwarden.bash",
    "_tokenwarden",
    "tokenwarden.fish",
];

/// Writes the manual pages (`tokenwarden.8`, `tokenwarden-NAME.8` for each command and
/// `tokenwarden.toml.5`) and the bash, zsh and fish completions into `dir` (created if
/// missing); returns the files written.
pub fn write_assets(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> io::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes)?;
        written.push(path);
        Ok(())
    };

    let cmd = man_command();
    put(ASSETS[0], &man_page(&cmd)?)?;
    let subcommands: Vec<clap::Command> = cmd.get_subcommands().cloned().collect();
    for sub in subcommands {
        let page = subcommand_page(&sub)?;
        put(
            &format!("tokenwarden-{}.{MAN_SECTION}", sub.get_name()),
            &page,
        )?;
    }
    put(config_page::FILE, config_page::render().as_bytes())?;

    let mut cmd = command();
    for (shell, name) in [
        (Shell::Bash, ASSETS[1]),
        (Shell::Zsh, ASSETS[2]),
        (Shell::Fish, ASSETS[3]),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "tokenwarden", &mut buf);
        put(name, &with_client_names(shell, buf))?;
    }
    Ok(written)
}

/// The commands whose positional arguments are client names.
const CLIENT_COMMANDS: [&str; 3] = ["get", "refresh", "once"];

/// clap's completion script for `shell`, plus completion of client names after `get`,
/// `refresh` and `once`: from the running daemon, else from the config (`tokenwarden
/// __complete-clients WORDS…`, given the command line so its -c and -s count).
fn with_client_names(shell: Shell, generated: Vec<u8>) -> Vec<u8> {
    let mut text = String::from_utf8_lossy(&generated).into_owned();
    match shell {
        Shell::Bash => text.push_str(&format!(
            r#"
# Client names after get, refresh and once: from the daemon, else the config.
_tokenwarden_with_clients() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" sub="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            -*) ;;
            *) sub="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    case "$sub" in
        {subs})
            if [[ "$cur" != -* && "${{COMP_WORDS[COMP_CWORD-1]}}" != -* ]]; then
                local IFS=$'
'
                COMPREPLY=($(compgen -W "$(tokenwarden {hidden} "${{COMP_WORDS[@]}}" 2>/dev/null)" -- "$cur"))
                return 0
            fi
            ;;
    esac
    _tokenwarden "$@"
}}
complete -F _tokenwarden_with_clients -o bashdefault -o default tokenwarden
"#,
            subs = CLIENT_COMMANDS.join("|"),
            hidden = COMPLETE_CLIENTS,
        )),
        Shell::Zsh => {
            // Each client argument clap leaves to `_default` completes names instead.
            let mut out = String::new();
            for line in text.lines() {
                let is_client_arg = line.contains("':client -- ")
                    || line.contains("'::clients -- ")
                    || line.contains("'*::clients -- ");
                if is_client_arg && line.contains(":_default'") {
                    out.push_str(&line.replace(":_default'", ":_tokenwarden_clients'"));
                } else {
                    out.push_str(line);
                }
                out.push('\n');
            }
            let helper = format!(
                r#"(( $+functions[_tokenwarden_clients] )) ||
_tokenwarden_clients() {{
    local -a names
    names=(${{(f)"$(tokenwarden {hidden} ${{words[@]}} 2>/dev/null)"}})
    compadd -a names
}}

"#,
                hidden = COMPLETE_CLIENTS,
            );
            // Before the script's closing call of `_tokenwarden`: autoloaded from fpath, the
            // file runs as that function's first call, which must find the helper defined.
            const CLOSING: &str = "if [ \"$funcstack[1]\" = \"_tokenwarden\" ]";
            text = match out.find(CLOSING) {
                Some(at) => format!("{}{helper}{}", &out[..at], &out[at..]),
                None => out + "\n" + &helper,
            };
        }
        Shell::Fish => {
            let cond: Vec<String> = CLIENT_COMMANDS
                .iter()
                .map(|c| format!("__fish_tokenwarden_using_subcommand {c}"))
                .collect();
            text.push_str(&format!(
                "\n# Client names after get, refresh and once: from the daemon, else the config.\n\
                 complete -c tokenwarden -n \"{}\" -f -a \"(tokenwarden {} (commandline -opc))\"\n",
                cond.join("; or "),
                COMPLETE_CLIENTS,
            ));
        }
        _ => {}
    }
    text.into_bytes()
}

/// [`command`] built as the manual shows it: no `help` command (`--help` stays), and its
/// commands under COMMANDS.
fn man_command() -> clap::Command {
    let mut cmd = command()
        .disable_help_subcommand(true)
        .subcommand_help_heading("COMMANDS")
        .subcommand_value_name("command");
    cmd.build();
    cmd
}

/// `tokenwarden(8)`: clap's sections, then FILES, ENVIRONMENT, SIGNALS, EXIT STATUS and SEE
/// ALSO.
fn man_page(cmd: &clap::Command) -> io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone())
        .section(MAN_SECTION)
        .manual(MANUAL);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    man.render_subcommands_section(&mut out)?;
    out.write_all(extra_sections(cmd).render().as_bytes())?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// `tokenwarden-NAME(8)`: clap's page for one command, with EXIT STATUS and SEE ALSO.
fn subcommand_page(sub: &clap::Command) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(sub.clone())
        .section(MAN_SECTION)
        .source(format!("tokenwarden {}", env!("CARGO_PKG_VERSION")))
        .manual(MANUAL)
        .render(&mut out)?;
    let mut roff = Roff::new();
    exit_status(&mut roff);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([bold("tokenwarden"), roman(format!("({MAN_SECTION})"))]);
    out.write_all(roff.render().as_bytes())?;
    Ok(out)
}

/// The sections clap knows nothing about (docs/cli.md, docs/configuration.md, docs/operations.md).
fn extra_sections(cmd: &clap::Command) -> Roff {
    let mut r = Roff::new();
    let item = |r: &mut Roff, term: &str, text: &str| {
        r.control("TP", []);
        r.text([bold(term)]);
        r.text([roman(text)]);
    };

    r.control("SH", ["FILES"]);
    item(
        &mut r,
        DEFAULT_CONFIG_PATH,
        "The config (TOML), plus the files its include globs match. \
         Annotated examples: /usr/share/doc/tokenwarden/examples/.",
    );
    item(
        &mut r,
        DEFAULT_STATE_DIR,
        "state_dir: the last token and refresh token of each client (NAME.json, mode 0600), \
         locked with flock(2) on .lock. Mode 0700.",
    );
    item(
        &mut r,
        DEFAULT_SOCKET_PATH,
        "The gRPC socket get, status and refresh call (daemon.socket).",
    );
    item(
        &mut r,
        "/run/tokenwarden/",
        "Token files the outputs name, written atomically (temporary file, fsync, rename).",
    );
    item(
        &mut r,
        "/usr/lib/systemd/system/tokenwarden.service",
        "The sandboxed systemd unit (Type=notify). \
         /usr/share/doc/tokenwarden/examples/tokenwarden-chown.conf is the drop-in that grants \
         CAP_CHOWN to outputs with owner or group.",
    );

    r.control("SH", ["ENVIRONMENT"]);
    item(
        &mut r,
        "TOKENWARDEN_CONFIG",
        "The config when -c is not given.",
    );
    item(
        &mut r,
        "TOKENWARDEN_SOCKET",
        "The socket of get, status and refresh when -s is not given (before the config's \
         daemon.socket).",
    );
    item(&mut r, "TOKENWARDEN_LOG", "The log level of once.");
    item(
        &mut r,
        "CREDENTIALS_DIRECTORY",
        "Where { credential = NAME } secrets are read (set by systemd's LoadCredential=).",
    );
    item(
        &mut r,
        "NOTIFY_SOCKET",
        "Set by systemd: run sends READY=1, STATUS=, RELOADING=1, STOPPING=1 and WATCHDOG=1.",
    );
    item(
        &mut r,
        "JOURNAL_STREAM",
        "Set by systemd: logs get syslog priority prefixes and no timestamps.",
    );

    r.control("SH", ["SIGNALS"]);
    item(
        &mut r,
        "SIGHUP",
        "Reload the config (systemctl reload). A bad new config is logged and the running one \
         stays. A change to the config or a secret file reloads too.",
    );
    item(&mut r, "SIGUSR1", "Get a new token for every client now.");
    item(
        &mut r,
        "SIGTERM, SIGINT",
        "Stop: finish in-flight writes and exit 0 within 5 seconds.",
    );

    exit_status(&mut r);

    r.control("SH", ["SEE ALSO"]);
    let mut see_also = Vec::new();
    for sub in cmd.get_subcommands() {
        see_also.push(bold(format!("tokenwarden-{}", sub.get_name())));
        see_also.push(roman(format!("({MAN_SECTION}), ")));
    }
    see_also.extend([
        bold("tokenwarden.toml"),
        roman("(5), "),
        bold("systemd.exec"),
        roman("(5), "),
        bold("systemd-creds"),
        roman("(1), "),
        italic("/usr/share/doc/tokenwarden/README.md"),
    ]);
    r.text(see_also);
    r
}

/// EXIT STATUS (docs/cli.md#config-exit-codes-and-errors).
fn exit_status(r: &mut Roff) {
    r.control("SH", ["EXIT STATUS"]);
    for (code, text) in [
        ("0", "Success."),
        (
            "1",
            "A runtime failure: a token could not be had, or the daemon is not reachable.",
        ),
        (
            "2",
            "Bad usage or a bad config; one line per problem on standard error.",
        ),
    ] {
        r.control("TP", []);
        r.text([bold(code)]);
        r.text([roman(text)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit_and_demo_lifetimes_a_range() {
        let secs = std::time::Duration::from_secs;
        assert_eq!(duration_arg("5m"), Ok(secs(300)));
        let e = duration_arg("20").unwrap_err();
        assert!(e.contains("write 20s"), "{e}");
        assert!(duration_arg("soon").is_err());
        assert_eq!(demo_lifetime("20s"), Ok(secs(20)));
        assert_eq!(demo_lifetime("5s"), Ok(DEMO_MIN_LIFETIME));
        for bad in ["0s", "4s", "500ms", "2d", "20"] {
            assert!(demo_lifetime(bad).is_err(), "{bad}");
        }
        assert!(demo_lifetime("0s").unwrap_err().contains("5s to 24h"));
    }

    #[test]
    fn completion_reads_socket_and_config_from_the_words() {
        let w = |s: &str| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
        let (s, c) = completion_context(&w("tokenwarden get -s /a.sock -c /b.toml"));
        assert_eq!((s.to_str(), c.to_str()), (Some("/a.sock"), Some("/b.toml")));
        let (s, c) = completion_context(&w("tokenwarden refresh --socket=/a --config=/b x"));
        assert_eq!((s.to_str(), c.to_str()), (Some("/a"), Some("/b")));
        // A dangling -s names nothing.
        let (_, c) = completion_context(&w("tokenwarden get -c /b.toml -s"));
        assert_eq!(c.to_str(), Some("/b.toml"));
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        command().debug_assert();
    }

    /// The command lines of docs/cli.md parse as written there.
    #[test]
    fn spec_command_lines_parse() {
        let parse = |line: &str| Cli::try_parse_from(line.split_whitespace());
        for ok in [
            "tokenwarden run",
            "tokenwarden run -c /etc/x.toml",
            "tokenwarden check --config x.toml",
            "tokenwarden once -c x.toml a b",
            "tokenwarden get api -s /run/x.sock --format header --min-valid 5m",
            "tokenwarden status -s /run/x.sock --json",
            "tokenwarden refresh api -s /run/x.sock",
            "tokenwarden demo --dir /tmp/d --lifetime 30s",
            "tokenwarden init",
            "tokenwarden init --style private-key-jwt talkdesk -o /etc/x.toml",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "tokenwarden",
            "tokenwarden get",
            "tokenwarden get api --format yaml",
            "tokenwarden get api --min-valid 5",
            "tokenwarden generate-assets /tmp",
            "tokenwarden init --style saml",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let Ok(Cli {
            command: Command::Get {
                format, min_valid, ..
            },
        }) = parse("tokenwarden get api --format json --min-valid 90s")
        else {
            panic!("get did not parse as get");
        };
        assert_eq!(format, client::Format::Json);
        assert_eq!(min_valid, Some(std::time::Duration::from_secs(90)));
        let Ok(Cli {
            command: Command::Get { format, .. },
        }) = parse("tokenwarden get api --format k8s-exec")
        else {
            panic!("get --format k8s-exec did not parse");
        };
        assert_eq!(format, client::Format::K8sExec);
    }
}
