//! The `tokenwarden` command: parses the command line, runs the command, maps the outcome to
//! an exit code (0 success, 1 runtime failure, 2 bad usage or bad config; SPEC §2).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use tokenwarden::client::{self, Format};
use tokenwarden::config::{self, DEFAULT_CONFIG_PATH, LogFormat};
use tokenwarden::oauth::Human;
use tokenwarden::{app, demo, logging};

#[derive(Parser)]
#[command(
    name = "tokenwarden",
    version,
    about = "Keeps OAuth 2.0 access tokens fresh on Linux hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Config file.
    #[arg(short, long, env = "TOKENWARDEN_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

/// Where the daemon's socket is (SPEC §2).
#[derive(clap::Args, Clone)]
struct SocketArg {
    /// The daemon's socket (default: the config's `daemon.socket`, else $TOKENWARDEN_SOCKET,
    /// else /run/tokenwarden/tokenwarden.sock).
    #[arg(short, long)]
    socket: Option<PathBuf>,
    /// Config file whose `daemon.socket` is the default socket (read only if it exists).
    #[arg(short, long, env = "TOKENWARDEN_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

impl SocketArg {
    fn path(&self) -> PathBuf {
        let env = std::env::var("TOKENWARDEN_SOCKET").ok();
        client::resolve_socket(
            self.socket.as_deref(),
            client::socket_from_config(&self.config),
            env.as_deref(),
        )
    }
}

/// `--format` of `get`.
#[derive(clap::ValueEnum, Clone, Copy)]
enum FormatArg {
    /// The access token.
    Token,
    /// A JSON object with the token, its type, times, scope and generation.
    Json,
    /// `Authorization: Bearer …`.
    Header,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (what systemd starts).
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the config, its secrets and keys; exit 0, or 2 with one line per problem.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Fetch each client's token once (or reuse a stored valid one), write its outputs, exit.
    Once {
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
        #[command(flatten)]
        socket: SocketArg,
        /// What to print.
        #[arg(long, value_enum, default_value = "token")]
        format: FormatArg,
        /// Get a new token first if the current one expires sooner than this (e.g. `5m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        min_valid: Option<std::time::Duration>,
    },
    /// Show every client the daemon serves: state, expiry, next refresh, failures, last error.
    Status {
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
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Run against a built-in token endpoint on loopback, in a fresh temporary directory.
    Demo {
        /// Directory to work in (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Token lifetime the demo provider grants.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        lifetime: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config.config),
        Command::Check { config } => check(&config.config),
        Command::Once {
            config,
            log_level,
            clients,
        } => once(&config.config, &log_level, &clients),
        Command::Get {
            client,
            socket,
            format,
            min_valid,
        } => {
            let format = match format {
                FormatArg::Token => Format::Token,
                FormatArg::Json => Format::Json,
                FormatArg::Header => Format::Header,
            };
            let socket = socket.path();
            call(async {
                let t = client::get(&socket, &client, min_valid).await?;
                print!("{}", client::format_token(&t, format));
                Ok(())
            })
        }
        Command::Status { socket, json } => {
            let socket = socket.path();
            call(async {
                let clients = client::list(&socket).await?;
                if json {
                    println!("{:#}", client::status_json(&clients));
                } else {
                    print!("{}", client::status_table(&clients, SystemTime::now()));
                }
                Ok(())
            })
        }
        Command::Refresh { client, socket } => {
            let socket = socket.path();
            call(async {
                let t = client::refresh(&socket, &client).await?;
                println!("{}", client::describe_token(&t, SystemTime::now()));
                Ok(())
            })
        }
        Command::Demo { dir, lifetime } => {
            if let Err(e) = logging::init(LogFormat::Text, "warn") {
                eprintln!("tokenwarden: {e}");
            }
            match runtime().and_then(|rt| rt.block_on(demo::run(dir, lifetime))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tokenwarden demo: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Runs a client command: its error on one line, exit 1 (SPEC §2).
fn call(f: impl std::future::Future<Output = Result<(), client::ClientError>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokenwarden: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenwarden: {e}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn load(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    match config::load(path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            Ok(c)
        }
        Err(errors) => {
            for e in &errors.errors {
                eprintln!("{e}");
            }
            Err(ExitCode::from(2))
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.errors {
                eprintln!("{e}");
            }
            return ExitCode::from(2);
        }
    };
    let log = match logging::init(config.daemon.log_format, &config.daemon.log_level) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("tokenwarden: {e}");
            return ExitCode::from(2);
        }
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    match runtime().and_then(|rt| {
        rt.block_on(tokenwarden::daemon::run(config, Some(log)))
            .map_err(|e| e.to_string())
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("tokenwarden: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let names: Vec<&str> = config.clients.keys().map(String::as_str).collect();
    let outputs: usize = config.clients.values().map(|c| c.outputs.len()).sum();
    println!(
        "{}: OK, {} client{} ({}), {} output{}, {} file{} read",
        path.display(),
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        },
        outputs,
        if outputs == 1 { "" } else { "s" },
        config.files.len(),
        if config.files.len() == 1 { "" } else { "s" },
    );
    ExitCode::SUCCESS
}

fn once(path: &std::path::Path, log_level: &str, only: &[String]) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = logging::init(config.daemon.log_format, log_level) {
        eprintln!("tokenwarden: {e}");
        return ExitCode::from(2);
    }
    let results = match runtime().and_then(|rt| rt.block_on(app::once(&config, only))) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokenwarden: {e}");
            return if only.iter().any(|n| !config.clients.contains_key(n)) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            };
        }
    };
    let width = results.iter().map(|r| r.client.len()).max().unwrap_or(0);
    let mut failed = false;
    for r in &results {
        match &r.outcome {
            Ok(o) => {
                let left = o
                    .token
                    .remaining(SystemTime::now())
                    .map(|d| Human(d).to_string())
                    .unwrap_or_else(|| "0s".into());
                println!(
                    "{:width$}  {}  token {}  expires {} (in {})",
                    r.client,
                    if o.reused { "reused" } else { "new   " },
                    o.token.fingerprint(),
                    tokenwarden::token::rfc3339(o.token.expires_at),
                    left,
                );
                for e in &o.output_errors {
                    failed = true;
                    eprintln!("{}: output failed: {e}", r.client);
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("{}: {e}", r.client);
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
