//! The `tokenwarden` command: parses the command line, runs the command, maps the outcome to
//! an exit code (0 success, 1 runtime failure, 2 bad usage or bad config;
//! docs/cli.md#config-exit-codes-and-errors).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::FromArgMatches;

use tokenwarden::cli::{self, Cli, Command};
use tokenwarden::client;
use tokenwarden::config::{self, LogFormat};
use tokenwarden::oauth::Human;
use tokenwarden::{app, demo, logging};

fn main() -> ExitCode {
    // Before any thread starts: nothing the daemon inherited from its parent may reach an
    // `on_change` command.
    if let Err(e) = tokenwarden::sys::close_inherited_on_exec() {
        return failed(
            1,
            format!("cannot mark inherited descriptors close-on-exec: {e}"),
        );
    }
    let matches = cli::command()
        .subcommand(
            // Writes the manual and completions for the .deb (scripts/package.sh); not a
            // user's command, so not in --help nor in what it generates.
            clap::Command::new("generate-assets").hide(true).arg(
                clap::arg!(<DIR> "Directory to write into")
                    .value_parser(clap::value_parser!(PathBuf)),
            ),
        )
        .subcommand(
            // What the shell completions run to complete a client name: the words of the
            // command line being completed (for its -c and -s). Not a user's command.
            clap::Command::new(cli::COMPLETE_CLIENTS).hide(true).arg(
                clap::Arg::new("WORDS")
                    .num_args(0..)
                    .trailing_var_arg(true)
                    .allow_hyphen_values(true),
            ),
        )
        .get_matches();
    match matches.subcommand() {
        Some(("generate-assets", m)) => return generate_assets(m.get_one::<PathBuf>("DIR")),
        Some((cli::COMPLETE_CLIENTS, m)) => {
            let words: Vec<String> = m
                .get_many::<String>("WORDS")
                .map(|w| w.cloned().collect())
                .unwrap_or_default();
            let (socket, config) = cli::completion_context(&words);
            let names = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(client::complete_clients(&socket, &config)),
                Err(_) => client::clients_from_config(&config),
            };
            for n in names {
                println!("{n}");
            }
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
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
            let socket = socket.path();
            call(async {
                let t = client::get(&socket, &client, min_valid).await?;
                out(&client::format_token(&t, format)?)
            })
        }
        Command::Status { socket, json } => {
            let socket = socket.path();
            call(async {
                let clients = client::list(&socket).await?;
                if json {
                    out(&format!("{:#}\n", client::status_json(&clients)))
                } else if clients.is_empty() {
                    // Not an empty table: say whose view it is.
                    out(&format!(
                        "no client visible to uid {} (the daemon serves none, or none whose \
                         allow_users / allow_groups name this user)\n",
                        nix::unistd::geteuid()
                    ))
                } else {
                    out(&client::status_table(&clients, SystemTime::now()))
                }
            })
        }
        Command::Refresh { client, socket } => {
            let socket = socket.path();
            call(async {
                let t = client::refresh(&socket, &client).await?;
                out(&format!(
                    "{}\n",
                    client::describe_token(&t, SystemTime::now())
                ))
            })
        }
        Command::Init {
            style,
            name,
            output,
        } => init(style, &name, output.as_deref()),
        Command::Demo { dir, lifetime } => {
            // Warnings, and what the daemon does on a signal (reloading, stopping).
            let filter = "warn,tokenwarden::daemon=info,tokenwarden::reload=info";
            if let Err(e) = logging::init(LogFormat::Text, filter) {
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

/// `generate-assets DIR`: the manual pages and completions, one path per line.
fn generate_assets(dir: Option<&PathBuf>) -> ExitCode {
    let Some(dir) = dir else {
        return ExitCode::from(2);
    };
    match cli::write_assets(dir) {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => failed(
            1,
            format!("cannot write the assets to {}: {e}", dir.display()),
        ),
    }
}

/// Writes `text` to standard output. A reader that went away (`tokenwarden get api | head -c
/// 20`) ends the command quietly, as SIGPIPE ends a C tool; any other write error is one.
fn out(text: &str) -> Result<(), client::ClientError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(client::ClientError::Output(e)),
        _ => Ok(()),
    }
}

/// Runs a client command: its error on one line, exit 1 (docs/cli.md#get-status-refresh).
fn call(f: impl std::future::Future<Output = Result<(), client::ClientError>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return failed(1, format!("cannot start the async runtime: {e}")),
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(1, e),
    }
}

/// `tokenwarden: MESSAGE` on stderr, and exit `code`.
fn failed(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tokenwarden: {message}");
    ExitCode::from(code)
}

/// The most blocking threads the runtime may start (see [`runtime`]).
const BLOCKING_THREADS: usize = 16;

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // File writes with fsync (state, outputs) run on blocking threads. Thousands of clients
        // starting at once would otherwise grow the pool to its default of 512 threads, each
        // with its own stack and malloc arena (issue 6: RSS at 10,000 clients); 16 keep the
        // disk as busy as more would.
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// The config at `path`, or its errors printed and exit 2.
fn load(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|errors| {
        for e in &errors.errors {
            eprintln!("{e}");
        }
        ExitCode::from(2)
    })
}

/// [`load`], with the config's warnings printed (the daemon logs them instead).
fn load_warned(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    let config = load(path)?;
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    Ok(config)
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The parse's buffers, freed: given back before the start-up allocates its own.
    tokenwarden::sys::trim_heap();
    let log = match logging::init(config.daemon.log_format, &config.daemon.log_level) {
        Ok(h) => h,
        Err(e) => return failed(2, e),
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
            // Once: the logs already go to stderr, in the configured format; only when they
            // would drop an error (log_level "off") is it printed plainly.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{e}");
            } else {
                eprintln!("tokenwarden: {e}");
            }
            ExitCode::from(1)
        }
    }
}

/// `init`: the config on stdout, or in a new file with what to do next on stderr.
fn init(style: tokenwarden::init::Style, name: &str, output: Option<&std::path::Path>) -> ExitCode {
    use tokenwarden::init;
    let shown = output.map(|p| p.display().to_string());
    let text = match init::render(
        style,
        name,
        shown.as_deref().unwrap_or(init::default_path()),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tokenwarden init: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(path) = output else {
        print!("{text}");
        return ExitCode::SUCCESS;
    };
    match init::write_new(path, &text) {
        Ok(()) => {
            eprintln!(
                "wrote {}: fill in the lines marked CHANGE and the secret files it names, then \
                 `tokenwarden check -c {}`",
                path.display(),
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tokenwarden init: {e}");
            ExitCode::from(1)
        }
    }
}

/// How many client names `check` prints before "… and N more".
const NAMES_SHOWN: usize = 10;

/// `a, b, c`, or the first `shown` and how many more; `none` when empty.
fn name_list(names: &[&str], shown: usize) -> String {
    match names.len() {
        0 => "none".to_string(),
        n if n <= shown => names.join(", "),
        n => format!("{}, … and {} more", names[..shown].join(", "), n - shown),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match load_warned(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // After the config's own warnings: whether this user could run the daemon with it.
    for w in config::access_warnings(&config) {
        eprintln!("warning: {w}");
    }
    let names: Vec<&str> = config.clients.keys().map(String::as_str).collect();
    let outputs: usize = config.clients.values().map(|c| c.outputs.len()).sum();
    println!(
        "{}: OK, {} client{} ({}), {} output{}, {} file{} read",
        path.display(),
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        name_list(&names, NAMES_SHOWN),
        outputs,
        if outputs == 1 { "" } else { "s" },
        config.files.len(),
        if config.files.len() == 1 { "" } else { "s" },
    );
    if config.clients.values().any(|c| c.issuer.is_some()) {
        match runtime() {
            Ok(rt) => {
                let (lines, warnings) =
                    rt.block_on(tokenwarden::oauth::discovery::check_report(&config));
                for l in lines {
                    println!("{l}");
                }
                for w in warnings {
                    eprintln!("warning: {w}");
                }
            }
            Err(e) => eprintln!("warning: issuers not checked: {e}"),
        }
    }
    // RFC 8705 client certificates: whose, and until when (a warning under 7 days was given).
    let now = SystemTime::now();
    for (name, c) in &config.clients {
        if let Some(cert) = &c.tls_client {
            println!("  {name}: {}", cert.describe(now));
        }
    }
    // Ready-made assertions and subject tokens: when each expires (never its content).
    for line in tokenwarden::oauth::assertion_file::describe(&config, std::time::SystemTime::now())
    {
        println!("  {line}");
    }
    ExitCode::SUCCESS
}

fn once(path: &std::path::Path, log_level: &str, only: &[String]) -> ExitCode {
    let config = match load_warned(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = logging::init(config.daemon.log_format, log_level) {
        return failed(2, e);
    }
    let results = match runtime() {
        Ok(rt) => rt.block_on(app::once(&config, only)),
        Err(e) => return failed(1, e),
    };
    let results = match results {
        Ok(r) => r,
        Err(e @ app::OnceError::UnknownClient { .. }) => return failed(2, e),
        Err(e @ app::OnceError::State(_)) => return failed(1, e),
    };
    let width = results
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    let mut failed = false;
    let now = SystemTime::now();
    for (name, snap) in &results {
        match (snap.valid_token(now), &snap.last_error) {
            (Some(token), None) => println!(
                "{name:width$}  {}  token {}  expires {} (in {})",
                if snap.reused { "reused" } else { "new   " },
                token.fingerprint(),
                tokenwarden::token::rfc3339(token.expires_at),
                token
                    .remaining(now)
                    .map(|d| Human(d).to_string())
                    .unwrap_or_else(|| "0s".into()),
            ),
            (_, error) => {
                failed = true;
                eprintln!("{name}: {}", error.as_deref().unwrap_or("no token"));
            }
        }
        if let Some(e) = &snap.output_error {
            failed = true;
            eprintln!("{name}: output failed: {e}");
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::name_list;

    #[test]
    fn check_lists_a_few_names_then_counts() {
        assert_eq!(name_list(&[], 2), "none");
        assert_eq!(name_list(&["a", "b"], 2), "a, b");
        assert_eq!(name_list(&["a", "b", "c", "d"], 2), "a, b, … and 2 more");
    }
}
