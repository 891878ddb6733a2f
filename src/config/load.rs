//! The loader: TOML text → [`Config`], with every problem reported at once and located.
//!
//! How errors are collected: the document is parsed into spanned tables (`toml::de::DeTable`),
//! and each table (`[daemon]`, `[defaults]`, each `[clients.NAME]`, each output, each
//! assertion) is deserialized into its raw type on its own. When that fails on one key, the
//! error is recorded at that key, the key is removed and the table is tried again, until it
//! deserializes; a missing required key is recorded at the table header. The raw values then
//! go through the semantic checks of docs/configuration.md, each recorded at its key. Secrets are
//! read and keys parsed here, so a config that loads is one the daemon can run with.
//!
//! Relative paths: `include` globs and secret `file` paths are resolved against the directory
//! of the file they are written in (for the main file, its directory; for an included file,
//! that file's directory).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use zeroize::Zeroizing;

use super::check::{self, AuthKind, GrantKind, TimingKey};
use super::error::{ConfigError, ConfigErrors, LineIndex, suggestion};
use super::raw::{
    Id, RawAssertion, RawClient, RawDaemon, RawFleet, RawOutput, RawSecret, RawTiming,
};
use super::types::*;
use crate::keys::{SigningAlg, SigningKey};
use crate::safepath::{self, Trust};
use crate::secret::SecretSource;

/// Reads the config at `path` with its included files, secrets and keys.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_reusing(path, None)
}

/// What a reload may take from the running config instead of building it again.
#[derive(Clone, Copy, Debug)]
pub struct Reuse<'a> {
    /// The running config.
    pub previous: &'a Config,
    /// The files that changed since it was loaded (the file watcher's report). A client that
    /// reads a secret or key from one of them is built again.
    pub changed: &'a [PathBuf],
}

/// Like [`load`], but a client whose TOML table (with its file, that file's mode and the
/// `[defaults]` it inherits) is the same as when `reuse.previous` was loaded, whose secret
/// files are not among `reuse.changed`, and whose build gave no warning, is taken from
/// `reuse.previous` as it is (the same `Arc`) instead of being checked and built again: a
/// reload of 10,000 clients where one changed costs the TOML parse and a digest of each
/// table, not 10,000 client builds (issue 6: reload within 100 ms).
pub fn load_reusing(path: &Path, reuse: Option<Reuse<'_>>) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => load_text(text, path, reuse),
        Err(e) => Err(ConfigErrors {
            errors: vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read the config file: {e}"),
            }],
        }),
    }
}

/// Like [`load`], with the main file's text given; includes and relative secret paths are
/// still resolved against `path`'s directory, and `path`'s mode is checked for the inline
/// secret warning when the file exists.
pub fn load_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    load_text(text.to_owned(), path, None)
}

fn load_text(text: String, path: &Path, reuse: Option<Reuse<'_>>) -> Result<Config, ConfigErrors> {
    let mut loader = Loader {
        reuse,
        sources: std::collections::HashMap::new(),
        files: Vec::new(),
        errors: Vec::new(),
        warnings: Vec::new(),
        clients_seen: std::collections::HashMap::new(),
        outputs_seen: std::collections::HashMap::new(),
        chown: crate::outputs::ChownRights::of_this_process(),
        safe: safepath::Checker::new(Trust::of_this_process()),
        fleet_local: std::collections::BTreeSet::new(),
    };
    let config = loader.main(text, path);
    loader.finish(config)
}

/// A position in one of the files read: index into `Loader::files`, byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Loc {
    file: usize,
    offset: usize,
}

struct SourceFile {
    path: PathBuf,
    /// Zeroed when dropped: it may hold inline secrets.
    text: Rc<Zeroizing<String>>,
    lines: LineIndex,
    /// Permission bits, when the file could be stat'ed.
    mode: Option<u32>,
}

struct Loader<'r> {
    /// The running config, on a reload.
    reuse: Option<Reuse<'r>>,
    /// What each client was built from (see [`load_reusing`]); only clients built without a
    /// warning are listed.
    sources: std::collections::HashMap<String, SourceDigest>,
    files: Vec<SourceFile>,
    errors: Vec<(Loc, String)>,
    warnings: Vec<String>,
    /// Where each client was defined, to report a second definition.
    clients_seen: std::collections::HashMap<String, Loc>,
    /// Where each output path was used, and by which client.
    outputs_seen: std::collections::HashMap<PathBuf, (Loc, String)>,
    /// What owners and groups this process could give outputs, for the CAP_CHOWN warning.
    chown: crate::outputs::ChownRights,
    /// The paths judged so far, trusting root and the daemon's user (see [`daemon_user`]).
    safe: safepath::Checker,
    /// Clients written with `fleet = false`.
    fleet_local: std::collections::BTreeSet<String>,
}

/// The timing of `[defaults]` with where each key was set, so that a bad combination is
/// reported at a key the operator wrote.
#[derive(Clone, Debug, Default)]
struct TimingSrc {
    timing: Timing,
    locs: BTreeMap<&'static str, Loc>,
}

// === impl Loader: files and errors ===

impl Loader<'_> {
    fn add_file(&mut self, path: &Path, text: String) -> usize {
        let mode = std::fs::metadata(path).ok().map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o7777
        });
        self.files.push(SourceFile {
            path: path.to_path_buf(),
            lines: LineIndex::new(&text),
            text: Rc::new(Zeroizing::new(text)),
            mode,
        });
        self.files.len() - 1
    }

    fn error(&mut self, loc: Loc, message: impl Into<String>) {
        self.errors.push((loc, message.into()));
    }

    fn at(file: usize, span: Range<usize>) -> Loc {
        Loc {
            file,
            offset: span.start,
        }
    }

    /// `FILE:LINE:COL`, for messages and warnings that point at another place.
    fn describe(&self, loc: Loc) -> String {
        match self.files.get(loc.file) {
            Some(f) => {
                let (line, col) = f.lines.position(&f.text, loc.offset);
                format!("{}:{line}:{col}", f.path.display())
            }
            None => String::from("?"),
        }
    }

    fn warn(&mut self, loc: Loc, message: impl std::fmt::Display) {
        let at = self.describe(loc);
        self.warnings.push(format!("{at}: {message}"));
    }

    fn finish(self, config: Option<Config>) -> Result<Config, ConfigErrors> {
        let mut errors = self.errors;
        errors.sort_by_key(|e| e.0);
        errors.dedup();
        match config {
            Some(mut c) if errors.is_empty() => {
                c.warnings = self.warnings;
                Ok(c)
            }
            _ => {
                let files = &self.files;
                let errors = errors
                    .into_iter()
                    .map(|(loc, message)| {
                        let f = &files[loc.file];
                        let (line, column) = f.lines.position(&f.text, loc.offset);
                        ConfigError {
                            file: f.path.clone(),
                            line,
                            column,
                            message,
                        }
                    })
                    .collect();
                Err(ConfigErrors { errors })
            }
        }
    }

    /// Parses one file; parse errors are recorded (the first of each line: the parser's
    /// recovery tends to repeat itself) and give `None`.
    fn parse<'i>(&mut self, file: usize, text: &'i str) -> Option<DeTable<'i>> {
        let (doc, errors) = DeTable::parse_recoverable(text);
        if errors.is_empty() {
            return Some(doc.into_inner());
        }
        let mut lines_seen = Vec::new();
        for e in errors {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let f = &self.files[file];
            let (line, _) = f.lines.position(&f.text, offset);
            if !lines_seen.contains(&line) {
                lines_seen.push(line);
                self.error(
                    Loc { file, offset },
                    format!("TOML syntax: {}", e.message()),
                );
            }
        }
        None
    }

    /// Deserializes one table into its raw type, recording every error: on an error at one
    /// key, the key is dropped and the table tried again.
    fn table<T: DeserializeOwned>(
        &mut self,
        file: usize,
        what: &str,
        value: Spanned<DeValue<'_>>,
    ) -> Option<T> {
        let span = value.span();
        let DeValue::Table(mut table) = value.into_inner() else {
            self.error(Self::at(file, span), format!("{what} must be a table"));
            return None;
        };
        loop {
            let whole = Spanned::new(span.clone(), DeValue::Table(table.clone()));
            let err = match T::deserialize(ValueDeserializer::from(whole)) {
                Ok(t) => return Some(t),
                Err(e) => e,
            };
            let at = err.span().unwrap_or(span.clone());
            let key = find_key(&table, at.start);
            let message =
                rewrite_serde_message(err.message(), what, key.as_ref().map(|k| k.0.as_str()));
            match key {
                Some((name, key_span)) => {
                    let offset = if err.message().starts_with("unknown field") {
                        key_span.start
                    } else {
                        at.start
                    };
                    self.error(Loc { file, offset }, message);
                    table.remove(name.as_str());
                }
                None => {
                    self.error(Self::at(file, at), message);
                    return None;
                }
            }
        }
    }
}

/// The top-level key of `table` whose key or value holds byte `offset`.
fn find_key(table: &DeTable<'_>, offset: usize) -> Option<(String, Range<usize>)> {
    table
        .iter()
        .find(|(k, v)| k.span().contains(&offset) || value_contains(v, offset))
        .map(|(k, _)| (k.get_ref().to_string(), k.span()))
}

fn value_contains(v: &Spanned<DeValue<'_>>, offset: usize) -> bool {
    if v.span().contains(&offset) {
        return true;
    }
    match v.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .any(|(k, v)| k.span().contains(&offset) || value_contains(v, offset)),
        DeValue::Array(a) => a.iter().any(|v| value_contains(v, offset)),
        _ => false,
    }
}

/// serde's messages, reworded for a config file: keys instead of fields, with suggestions.
fn rewrite_serde_message(message: &str, what: &str, key: Option<&str>) -> String {
    let backticked = |s: &str| -> Vec<String> {
        s.split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, p)| p.to_string())
            .collect()
    };
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        if let Some((unknown, expected)) = names.split_first() {
            let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
            return format!(
                "unknown key \"{unknown}\" in {what}{}",
                suggestion(unknown, &expected)
            );
        }
    }
    if let Some(rest) = message.strip_prefix("missing field ")
        && let Some(name) = backticked(rest).first()
    {
        return format!("missing key \"{name}\" in {what}");
    }
    let message = without_values(message);
    match key {
        Some(k) => format!("{k}: {message}"),
        None => format!("{what}: {message}"),
    }
}

/// serde's "invalid type" and "invalid value" messages quote the value found (``integer
/// `314159265` ``, `string "…"`); where a secret belongs, that value is the secret, whatever its
/// type. Only its kind is kept.
fn without_values(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let (found, expected) = match rest.find(", expected ") {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let kind = found
                .split(['`', '"'])
                .next()
                .unwrap_or_default()
                .trim_end();
            return format!("{prefix}{kind}{expected}");
        }
    }
    message.to_string()
}

// === impl Loader: the files ===

const TOP_KEYS: [&str; 4] = ["daemon", "defaults", "clients", "fleet"];

impl Loader<'_> {
    fn main(&mut self, text: String, path: &Path) -> Option<Config> {
        let file = self.add_file(path, text);
        let text = Rc::clone(&self.files[file].text);
        let mut root = self.parse(file, &text)?;
        let dir = parent_dir(path);

        for (k, _) in root.iter() {
            let name = k.get_ref().as_ref();
            if !TOP_KEYS.contains(&name) {
                self.error(
                    Self::at(file, k.span()),
                    format!("unknown table \"{name}\"{}", suggestion(name, &TOP_KEYS)),
                );
            }
        }

        let (daemon, include) = match root.remove("daemon") {
            Some(v) => match self.table::<RawDaemon>(file, "[daemon]", v) {
                Some(raw) => self.daemon(file, raw),
                None => (None, Vec::new()),
            },
            None => (Some(DaemonConfig::default()), Vec::new()),
        };
        // After [daemon]: the daemon's user may come from state_dir (see `daemon_user`).
        if let Err(e) = self.safe.file(path) {
            self.error(
                Loc { file, offset: 0 },
                format!(
                    "{e}; whoever can write the config can run commands as the daemon (on_change)"
                ),
            );
        }
        let defaults = match root.remove("defaults") {
            Some(v) => {
                let raw = self
                    .table::<RawTiming>(file, "[defaults]", v)
                    .unwrap_or_default();
                let t = merge_timing(file, &TimingSrc::default(), raw);
                self.check_timing(&t, None);
                t
            }
            None => TimingSrc::default(),
        };

        let fleet = root
            .remove("fleet")
            .and_then(|v| self.table::<RawFleet>(file, "[fleet]", v))
            .and_then(|raw| self.fleet(file, &dir, raw));

        let mut clients = BTreeMap::new();
        if let Some(v) = root.remove("clients") {
            self.clients(file, &dir, v, &defaults, &mut clients);
        }

        let mut files = vec![path.to_path_buf()];
        for pattern in &include {
            self.include(pattern, &dir, &defaults, &mut files, &mut clients);
        }

        Some(Config {
            path: path.to_path_buf(),
            daemon: daemon?,
            clients,
            files,
            warnings: Vec::new(),
            sources: std::mem::take(&mut self.sources),
            fleet,
            fleet_local: std::mem::take(&mut self.fleet_local),
        })
    }

    /// One `include` glob: every file it matches, in name order.
    fn include(
        &mut self,
        pattern: &(String, Loc),
        dir: &Path,
        defaults: &TimingSrc,
        files: &mut Vec<PathBuf>,
        clients: &mut BTreeMap<String, std::sync::Arc<ClientConfig>>,
    ) {
        let (pattern, loc) = pattern;
        let full = if Path::new(pattern).is_absolute() {
            PathBuf::from(pattern)
        } else {
            dir.join(pattern)
        };
        let paths = match glob::glob(&full.to_string_lossy()) {
            Ok(paths) => paths,
            Err(e) => {
                self.error(*loc, format!("include: invalid glob \"{pattern}\": {e}"));
                return;
            }
        };
        for entry in paths {
            let path = match entry {
                Ok(p) => p,
                Err(e) => {
                    self.error(*loc, format!("include \"{pattern}\": {e}"));
                    continue;
                }
            };
            if files.contains(&path) || !path.is_file() {
                continue;
            }
            if let Err(e) = self.safe.file(&path) {
                self.error(
                    *loc,
                    format!(
                        "included file {}: {e}; whoever can write it can run commands as the \
                         daemon (on_change)",
                        path.display()
                    ),
                );
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    self.error(
                        *loc,
                        format!("cannot read included file {}: {e}", path.display()),
                    );
                    continue;
                }
            };
            files.push(path.clone());
            let file = self.add_file(&path, text);
            let text = Rc::clone(&self.files[file].text);
            let Some(mut root) = self.parse(file, &text) else {
                continue;
            };
            let clients_value = root.remove("clients");
            for (k, _) in root.iter() {
                self.error(
                    Self::at(file, k.span()),
                    format!(
                        "included files may only contain [clients.*] tables, not \"{}\"",
                        k.get_ref()
                    ),
                );
            }
            if let Some(v) = clients_value {
                self.clients(file, &parent_dir(&path), v, defaults, clients);
            }
        }
    }

    /// The `clients` table of one file.
    fn clients(
        &mut self,
        file: usize,
        dir: &Path,
        value: Spanned<DeValue<'_>>,
        defaults: &TimingSrc,
        out: &mut BTreeMap<String, std::sync::Arc<ClientConfig>>,
    ) {
        let span = value.span();
        let DeValue::Table(table) = value.into_inner() else {
            self.error(
                Self::at(file, span),
                "clients must be a table of [clients.NAME] tables",
            );
            return;
        };
        // What every client of this file inherits: the file (relative paths), its mode (the
        // inline-secret warning) and the [defaults].
        let context = {
            let f = &self.files[file];
            format!("{}\0{:?}\0{:?}", f.path.display(), f.mode, defaults.timing)
        };
        for (key, value) in table {
            let name = key.get_ref().to_string();
            let header = Self::at(file, value.span());
            self.ok_at(file, key.span(), check::check_client_name(&name));
            if let Some(first) = self.clients_seen.get(&name).copied() {
                let first = self.describe(first);
                self.error(
                    header,
                    format!("client \"{name}\" is defined twice; first at {first}"),
                );
                continue;
            }
            self.clients_seen.insert(name.clone(), header);
            let digest = SourceDigest::of(&context, &name, value.get_ref());
            if let Some(c) = self.reusable(&name, &digest, header) {
                self.sources.insert(name.clone(), digest);
                out.insert(name, c);
                continue;
            }
            let warnings = self.warnings.len();
            if let Some(c) = self.client(file, dir, &name, value, defaults) {
                if self.warnings.len() == warnings {
                    self.sources.insert(name.clone(), digest);
                }
                out.insert(name, std::sync::Arc::new(c));
            }
        }
    }
}

impl Loader<'_> {
    /// The running config's build of client `name`, when it may be used as it is (see
    /// [`load_reusing`]). Its output paths are registered as a new build's would be; if one
    /// is already taken, `None`: the client is built again, which reports the clash at its
    /// place.
    fn reusable(
        &mut self,
        name: &str,
        digest: &SourceDigest,
        header: Loc,
    ) -> Option<std::sync::Arc<ClientConfig>> {
        let reuse = self.reuse?;
        if reuse.previous.sources.get(name) != Some(digest) {
            return None;
        }
        let previous = reuse.previous.clients.get(name)?;
        if previous
            .secret_paths()
            .iter()
            .any(|p| reuse.changed.contains(p))
        {
            return None;
        }
        if previous
            .outputs
            .iter()
            .any(|o| self.outputs_seen.contains_key(&o.path))
        {
            return None;
        }
        for o in &previous.outputs {
            self.outputs_seen
                .insert(o.path.clone(), (header, name.to_owned()));
        }
        if reuse.previous.fleet_local.contains(name) {
            self.fleet_local.insert(name.to_owned());
        }
        Some(previous.clone())
    }
}

/// A digest of what one client was built from: its file's context and its TOML table
/// (keys and values, not their positions). SHA-256 cut to 128 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceDigest([u8; 16]);

impl SourceDigest {
    fn of(context: &str, name: &str, value: &DeValue<'_>) -> SourceDigest {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(context.as_bytes());
        ctx.update(b"\0");
        ctx.update(name.as_bytes());
        digest_value(&mut ctx, value);
        let mut out = [0u8; 16];
        out.copy_from_slice(&ctx.finish().as_ref()[..16]);
        SourceDigest(out)
    }
}

/// Feeds a TOML value to `ctx` unambiguously: a tag, then lengths before contents.
fn digest_value(ctx: &mut aws_lc_rs::digest::Context, value: &DeValue<'_>) {
    let text = |ctx: &mut aws_lc_rs::digest::Context, tag: u8, s: &str| {
        ctx.update(&[tag]);
        ctx.update(&(s.len() as u64).to_le_bytes());
        ctx.update(s.as_bytes());
    };
    match value {
        DeValue::String(s) => text(ctx, b's', s),
        DeValue::Integer(i) => {
            text(ctx, b'i', i.as_str());
            ctx.update(&i.radix().to_le_bytes());
        }
        DeValue::Float(f) => text(ctx, b'f', f.as_str()),
        DeValue::Boolean(b) => ctx.update(&[b'b', u8::from(*b)]),
        DeValue::Datetime(d) => text(ctx, b'd', &d.to_string()),
        DeValue::Array(items) => {
            ctx.update(b"a");
            ctx.update(&(items.len() as u64).to_le_bytes());
            for item in items {
                digest_value(ctx, item.get_ref());
            }
        }
        DeValue::Table(table) => {
            ctx.update(b"t");
            ctx.update(&(table.len() as u64).to_le_bytes());
            for (k, v) in table {
                text(ctx, b'k', k.get_ref());
                digest_value(ctx, v.get_ref());
            }
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

// === impl Loader: [daemon] and timing ===

impl Loader<'_> {
    /// `[daemon]`, and the include globs with their locations (read even when another
    /// `[daemon]` key is wrong, so their errors show too).
    fn daemon(
        &mut self,
        file: usize,
        raw: RawDaemon,
    ) -> (Option<DaemonConfig>, Vec<(String, Loc)>) {
        let before = self.errors.len();
        let mut d = DaemonConfig::default();
        let mut raw_socket_loc = None;
        if let Some(s) = raw.socket {
            raw_socket_loc = Some(Self::at(file, s.span()));
            d.socket = self.absolute(file, "socket", s);
        }
        if let Some(m) = raw.socket_mode {
            d.socket_mode = m.into_inner().0;
        }
        let mut state_dir_loc = None;
        if let Some(s) = raw.state_dir {
            let loc = Self::at(file, s.span());
            if let Some(p) = self.absolute(file, "state_dir", s) {
                d.state_dir = p;
                state_dir_loc = Some(loc);
            }
        }
        self.safe = safepath::Checker::new(Trust::for_user(daemon_user(&d.state_dir)));
        if let Some(loc) = state_dir_loc
            && let Err(e) = check_state_dir(&d.state_dir, &mut self.safe)
        {
            self.error(loc, format!("state_dir \"{}\": {e}", d.state_dir.display()));
        }
        if let (Some(socket), Some(raw)) = (&d.socket, &raw_socket_loc)
            && let Some(dir) = socket.parent()
            && let Err(e) = self.safe.dir(dir)
        {
            self.error(*raw, format!("socket \"{}\": {e}", socket.display()));
        }
        if let Some(m) = raw.metrics_listen {
            let addr = m.get_ref().parse().map_err(|_| {
                format!(
                    "metrics_listen \"{}\" is not a socket address such as \"127.0.0.1:9464\"",
                    m.get_ref()
                )
            });
            d.metrics_listen = self.ok_at(file, m.span(), addr).or(d.metrics_listen);
        }
        if let Some(f) = raw.log_format {
            let format = check::parse_log_format(f.get_ref());
            d.log_format = self.ok_at(file, f.span(), format).unwrap_or(d.log_format);
        }
        if let Some(l) = raw.log_level
            && self
                .ok_at(file, l.span(), check::check_log_level(l.get_ref()))
                .is_some()
        {
            d.log_level = l.into_inner();
        }
        if let Some(n) = raw.max_concurrent_refreshes {
            let v = usize::try_from(*n.get_ref())
                .ok()
                .filter(|v| *v >= 1)
                .ok_or("max_concurrent_refreshes must be at least 1");
            d.max_concurrent_refreshes = self
                .ok_at(file, n.span(), v)
                .unwrap_or(d.max_concurrent_refreshes);
        }
        if let Some(n) = raw.max_connections {
            let v = usize::try_from(*n.get_ref())
                .ok()
                .filter(|v| (1..=1_000_000).contains(v))
                .ok_or("max_connections must be between 1 and 1000000");
            d.max_connections = self.ok_at(file, n.span(), v).unwrap_or(d.max_connections);
        }
        self.daemon_http(file, &mut d, raw.http_socket, raw.http_listen, raw.audit);
        let include: Vec<(String, Loc)> = raw
            .include
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.get_ref().clone(), Self::at(file, s.span())))
            .collect();
        d.include = include.iter().map(|(s, _)| s.clone()).collect();
        ((self.errors.len() == before).then_some(d), include)
    }

    /// `http_socket` (an absolute path in a directory only root or the daemon's user can
    /// write, not the gRPC socket's), `http_listen` (a loopback address, not
    /// `metrics_listen`'s) and `audit` (docs/http.md).
    fn daemon_http(
        &mut self,
        file: usize,
        d: &mut DaemonConfig,
        socket: Option<Spanned<PathBuf>>,
        listen: Option<Spanned<String>>,
        audit: Option<bool>,
    ) {
        if let Some(s) = socket {
            let loc = Self::at(file, s.span());
            if let Some(path) = self.absolute(file, "http_socket", s) {
                if d.socket.as_ref() == Some(&path) {
                    self.error(
                        loc,
                        format!(
                            "http_socket \"{}\" is also daemon.socket: give the HTTP API a \
                             socket of its own (such as /run/tokenwarden/http.sock)",
                            path.display()
                        ),
                    );
                } else if let Some(dir) = path.parent()
                    && let Err(e) = self.safe.dir(dir)
                {
                    self.error(loc, format!("http_socket \"{}\": {e}", path.display()));
                } else {
                    d.http_socket = Some(path);
                }
            }
        }
        if let Some(l) = listen {
            let loc = Self::at(file, l.span());
            match crate::http::check_listen(l.get_ref(), d.metrics_listen) {
                Ok(addr) => d.http_listen = Some(addr),
                Err(e) => self.error(loc, e),
            }
        }
        if let Some(a) = audit {
            d.audit = a;
        }
    }

    fn absolute(&mut self, file: usize, key: &str, p: Spanned<PathBuf>) -> Option<PathBuf> {
        if p.get_ref().is_absolute() {
            Some(p.into_inner())
        } else {
            self.error(
                Self::at(file, p.span()),
                format!(
                    "{key} \"{}\" must be an absolute path",
                    p.get_ref().display()
                ),
            );
            None
        }
    }

    fn check_timing(&mut self, t: &TimingSrc, header: Option<Loc>) {
        for (key, message) in check::check_timing(&t.timing) {
            let (own, other) = match key {
                TimingKey::RefreshAt => ("refresh_at", "refresh_at"),
                TimingKey::Jitter => ("jitter", "refresh_at"),
                TimingKey::DefaultLifetime => ("default_lifetime", "default_lifetime"),
                TimingKey::RetryInitial => ("retry_initial", "retry_max"),
                TimingKey::Timeout => ("timeout", "timeout"),
            };
            if let Some(loc) = t
                .locs
                .get(own)
                .or_else(|| t.locs.get(other))
                .copied()
                .or(header)
            {
                self.error(loc, message);
            }
        }
    }
}

/// `base` with the keys of `raw` laid over it.
fn merge_timing(file: usize, base: &TimingSrc, raw: RawTiming) -> TimingSrc {
    let mut t = base.clone();
    let mut set_f = |key: &'static str, v: Option<Spanned<f64>>, dst: &mut f64| {
        if let Some(v) = v {
            t.locs.insert(key, Loader::at(file, v.span()));
            *dst = v.into_inner();
        }
    };
    let mut timing = t.timing.clone();
    set_f("refresh_at", raw.refresh_at, &mut timing.refresh_at);
    set_f("jitter", raw.jitter, &mut timing.jitter);
    let durations = [
        (
            "refresh_margin",
            raw.refresh_margin,
            &mut timing.refresh_margin,
        ),
        ("min_interval", raw.min_interval, &mut timing.min_interval),
        (
            "default_lifetime",
            raw.default_lifetime,
            &mut timing.default_lifetime,
        ),
        (
            "retry_initial",
            raw.retry_initial,
            &mut timing.retry_initial,
        ),
        ("retry_max", raw.retry_max, &mut timing.retry_max),
        ("timeout", raw.timeout, &mut timing.timeout),
    ];
    for (key, v, dst) in durations {
        if let Some(v) = v {
            t.locs.insert(key, Loader::at(file, v.span()));
            *dst = v.into_inner().0;
        }
    }
    t.timing = timing;
    t
}

// === impl Loader: [fleet] ===

impl Loader<'_> {
    /// `[fleet]` (docs/fleet.md). Whether etcd answers is a runtime matter, not checked here.
    fn fleet(&mut self, file: usize, dir: &Path, raw: RawFleet) -> Option<FleetConfig> {
        let before = self.errors.len();
        // Where errors about the table as a whole point.
        let here = Self::at(file, raw.prefix.span());
        let mut etcd = Vec::new();
        if raw.etcd.get_ref().is_empty() {
            self.error(
                Self::at(file, raw.etcd.span()),
                "etcd of [fleet] names no endpoint: list the cluster's client URLs".to_string(),
            );
        }
        for e in raw.etcd.into_inner() {
            let url = check::check_etcd_endpoint(e.get_ref());
            if let Some(u) = self.ok_at(file, e.span(), url) {
                etcd.push(u);
            }
        }
        let prefix = self.ok_at(
            file,
            raw.prefix.span(),
            check::check_fleet_prefix(raw.prefix.get_ref()),
        );
        let key_loc = Self::at(file, raw.key.span());
        let key = self.credential(file, dir, "[fleet]", "key", raw.key);
        if let Some(k) = &key
            && let Err(e) = crate::fleet::crypt::FleetKey::parse(&k.value)
        {
            self.error(key_loc, format!("key of [fleet]: {e}"));
        }
        let lease = match raw.lease {
            Some(l) => {
                let span = l.span();
                let d = l.into_inner().0;
                self.ok_at(file, span, check::check_fleet_lease(d))
            }
            None => Some(crate::fleet::DEFAULT_LEASE),
        };
        let host = match raw.host {
            Some(h) => {
                let checked = check::check_fleet_host(h.get_ref()).map(|()| h.get_ref().clone());
                self.ok_at(file, h.span(), checked)
            }
            None => match crate::fleet::hostname() {
                Ok(h) => Some(h),
                Err(e) => {
                    self.error(here, format!("[fleet]: {e}; set host = \"NAME\""));
                    None
                }
            },
        };
        let https = etcd.iter().any(|u| u.scheme() == "https");
        let ca_file = raw.ca_file.map(|p| {
            let span = p.span();
            let path = resolve(dir, p.into_inner());
            self.ok_at(file, span, crate::oauth::check_ca_file(&path));
            path
        });
        if https && ca_file.is_none() {
            self.error(
                here,
                "[fleet]: https:// endpoints need ca_file, the CA that signed etcd's certificate"
                    .to_string(),
            );
        }
        let cert = raw.cert.map(|p| resolve(dir, p.into_inner()));
        let cert_key_loc = raw.cert_key.as_ref().map(|k| Self::at(file, k.span()));
        let cert_key = raw
            .cert_key
            .and_then(|k| self.credential(file, dir, "[fleet]", "cert_key", k));
        if cert.is_some() != cert_key_loc.is_some() {
            self.error(
                cert_key_loc.unwrap_or(here),
                "[fleet]: cert and cert_key go together (mTLS to etcd)".to_string(),
            );
        }
        let user = raw.user.map(Spanned::into_inner);
        let password_loc = raw.password.as_ref().map(|k| Self::at(file, k.span()));
        let password = raw
            .password
            .and_then(|k| self.credential(file, dir, "[fleet]", "password", k));
        if user.is_some() != password_loc.is_some() {
            self.error(
                password_loc.unwrap_or(here),
                "[fleet]: user and password go together (etcd authentication)".to_string(),
            );
        }
        if self.errors.len() != before {
            return None;
        }
        Some(FleetConfig {
            etcd,
            prefix: prefix?,
            key: key?,
            lease: lease?,
            host: host?,
            ca_file,
            cert,
            cert_key,
            user,
            password,
        })
    }
}

// === impl Loader: one client ===

/// What a client's keys were resolved to, before they are assembled.
struct ClientParts {
    grant: GrantKind,
    auth: AuthKind,
}

impl Loader<'_> {
    fn client(
        &mut self,
        file: usize,
        dir: &Path,
        name: &str,
        value: Spanned<DeValue<'_>>,
        defaults: &TimingSrc,
    ) -> Option<ClientConfig> {
        let before = self.errors.len();
        let span = value.span();
        let header = Self::at(file, span.clone());
        let what = format!("[clients.{name}]");
        let DeValue::Table(mut table) = value.into_inner() else {
            self.error(header, format!("{what} must be a table"));
            return None;
        };
        let key_locs: BTreeMap<String, Loc> = table
            .iter()
            .map(|(k, _)| (k.get_ref().to_string(), Self::at(file, k.span())))
            .collect();
        let outputs_value = table.remove("outputs");
        let assertion_value = table.remove("assertion");

        let outputs = self.outputs(file, name, outputs_value);
        let assertion = assertion_value.map(|v| {
            let loc = Self::at(file, v.span());
            let raw = self.table::<RawAssertion>(file, &format!("[clients.{name}.assertion]"), v);
            (raw, loc)
        });

        let mut raw: RawClient =
            self.table(file, &what, Spanned::new(span, DeValue::Table(table)))?;

        let token_url = self.ok_at(
            file,
            raw.token_url.span(),
            check::check_token_url(raw.token_url.get_ref()),
        );
        let timing = merge_timing(file, defaults, raw.take_timing());
        self.check_timing(&timing, Some(header));

        let scope = raw
            .scope
            .take()
            .map(|s| s.into_inner().0)
            .unwrap_or_default();
        let extra_params = self.extra(file, raw.extra_params.take(), |k, _| {
            check::check_param_name(k)
        });
        let extra_headers = self.extra(file, raw.extra_headers.take(), |k, v| {
            check::check_header_name(k).and_then(|()| check::check_header_value(k, v))
        });
        if let Some(c) = &raw.rotate_cron {
            self.ok_at(file, c.span(), check::check_cron(c.get_ref()));
        }
        let ca_file = raw.ca_file.take().map(|p| {
            let span = p.span();
            let path = resolve(dir, p.into_inner());
            self.ok_at(file, span, crate::oauth::check_ca_file(&path));
            path
        });
        let proxy = match raw.proxy.take() {
            None => Some(ProxyConfig::Env),
            Some(p) if p.get_ref() == "none" => Some(ProxyConfig::None),
            Some(p) => {
                let loopback = token_url
                    .as_ref()
                    .is_some_and(|u| crate::oauth::is_loopback(u.host_str().unwrap_or_default()));
                if loopback {
                    self.warn(
                        Self::at(file, p.span()),
                        format!("proxy of client \"{name}\" is not used: its token_url is a loopback address, which is never proxied"),
                    );
                }
                self.ok_at(
                    file,
                    p.span(),
                    ProxyUrl::parse(p.get_ref())
                        .map(ProxyConfig::Url)
                        .map_err(|e| format!("proxy: {e}")),
                )
            }
        };
        let allow_uids = self.ids(file, raw.allow_users.take(), IdKind::User);
        let allow_gids = self.ids(file, raw.allow_groups.take(), IdKind::Group);

        let grant_kind = match &raw.grant_type {
            None => Some(GrantKind::ClientCredentials),
            Some(g) => self.ok_at(file, g.span(), check::parse_grant(g.get_ref())),
        };
        let auth_kind = match (&raw.client_auth, grant_kind) {
            (Some(a), _) => self.ok_at(file, a.span(), check::parse_client_auth(a.get_ref())),
            (None, Some(g)) => Some(AuthKind::default_for(g)),
            (None, None) => None,
        };
        let (grant, client_auth) = match (grant_kind, auth_kind) {
            (Some(grant), Some(auth)) => {
                let parts = ClientParts { grant, auth };
                self.check_keys(
                    &parts,
                    assertion.as_ref().map(|a| a.1),
                    &key_locs,
                    header,
                    &what,
                );
                let g = self.grant(file, dir, name, &parts, &mut raw, assertion);
                let a = self.client_auth(file, dir, name, &parts, &mut raw);
                (g, a)
            }
            _ => (None, None),
        };

        if self.errors.len() != before {
            return None;
        }
        if raw.fleet.is_some_and(|f| !f.into_inner()) {
            self.fleet_local.insert(name.to_owned());
        }
        Some(ClientConfig {
            name: name.to_owned(),
            token_url: token_url?,
            grant: grant?,
            client_auth: client_auth?,
            client_id: raw.client_id.map(Spanned::into_inner),
            scope,
            audience: raw.audience.map(Spanned::into_inner),
            resource: raw.resource.map(Spanned::into_inner),
            extra_params,
            extra_headers,
            ca_file,
            proxy: proxy?,
            rotate_cron: raw.rotate_cron.map(Spanned::into_inner),
            allow_uids,
            allow_gids,
            outputs: outputs?,
            timing: timing.timing,
        })
    }

    /// `r`'s value; its error is recorded at `span` of `file`.
    fn ok_at<T>(
        &mut self,
        file: usize,
        span: Range<usize>,
        r: Result<T, impl Into<String>>,
    ) -> Option<T> {
        r.map_err(|e| self.error(Self::at(file, span), e)).ok()
    }

    /// Keys the grant and the authentication method need, and keys they do not use.
    fn check_keys(
        &mut self,
        p: &ClientParts,
        assertion: Option<Loc>,
        key_locs: &BTreeMap<String, Loc>,
        header: Loc,
        what: &str,
    ) {
        let grant_says = format!("grant_type = \"{}\"", p.grant.name());
        let auth_says = format!("client_auth = \"{}\"", p.auth.name());
        let present =
            |k: &str| key_locs.contains_key(k) || (k == "assertion" && assertion.is_some());
        let (pw, rt, jb) = (
            p.grant == GrantKind::Password,
            p.grant == GrantKind::RefreshToken,
            p.grant == GrantKind::JwtBearer,
        );
        let (sec, pk, jwt) = (
            p.auth.uses_secret(),
            p.auth == AuthKind::PrivateKeyJwt,
            p.auth.is_jwt(),
        );
        let (a, g) = (auth_says.as_str(), grant_says.as_str());
        // (key, needed, used, which setting decides)
        let rules = [
            ("client_id", !(jb && p.auth == AuthKind::None), true, a),
            ("client_secret", sec, sec, a),
            ("private_key", pk, pk, a),
            ("key_id", false, pk, a),
            ("signing_alg", false, jwt, a),
            ("assertion_lifetime", false, jwt, a),
            ("username", pw, pw, g),
            ("password", pw, pw, g),
            ("refresh_token", rt, rt, g),
            ("assertion", jb, jb, g),
        ];
        for (key, needed, used, why) in rules {
            if needed && !present(key) {
                let shown = if key == "assertion" {
                    "a [clients.NAME.assertion] table".to_string()
                } else {
                    format!("\"{key}\"")
                };
                self.error(header, format!("{what} needs {shown} ({why})"));
            } else if !used && present(key) {
                let loc = if key == "assertion" {
                    assertion
                } else {
                    key_locs.get(key).copied()
                };
                if let Some(loc) = loc {
                    self.error(loc, format!("\"{key}\" is not used with {why}"));
                }
            }
        }
    }

    fn grant(
        &mut self,
        file: usize,
        dir: &Path,
        client: &str,
        p: &ClientParts,
        raw: &mut RawClient,
        assertion: Option<(Option<RawAssertion>, Loc)>,
    ) -> Option<Grant> {
        match p.grant {
            GrantKind::ClientCredentials => Some(Grant::ClientCredentials),
            GrantKind::Password => {
                let username = raw.username.take()?.into_inner();
                let password =
                    self.credential(file, dir, client, "password", raw.password.take()?)?;
                Some(Grant::Password { username, password })
            }
            GrantKind::RefreshToken => {
                let refresh_token = self.credential(
                    file,
                    dir,
                    client,
                    "refresh_token",
                    raw.refresh_token.take()?,
                )?;
                Some(Grant::RefreshToken { refresh_token })
            }
            GrantKind::JwtBearer => {
                let (raw, _) = assertion?;
                let a = raw?;
                let alg = match &a.signing_alg {
                    Some(s) => self.ok_at(file, s.span(), SigningAlg::from_str(s.get_ref()))?,
                    None => SigningAlg::HS256,
                };
                let lifetime = self.lifetime(file, a.lifetime.as_ref());
                let key_span = a.key.span();
                let cred = self.credential(file, dir, client, "assertion.key", a.key)?;
                let key = self.ok_at(
                    file,
                    key_span,
                    SigningKey::parse(alg, &cred.value).map_err(|e| format!("assertion.key: {e}")),
                )?;
                let claims = a
                    .claims
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                Some(Grant::JwtBearer {
                    assertion: Assertion {
                        key,
                        key_source: cred.source,
                        key_material: cred.value,
                        key_id: a.key_id.map(Spanned::into_inner),
                        lifetime: lifetime?,
                        claims,
                    },
                })
            }
        }
    }

    fn lifetime(
        &mut self,
        file: usize,
        raw: Option<&Spanned<super::raw::HumanDuration>>,
    ) -> Option<Duration> {
        match raw {
            None => Some(Duration::from_secs(300)),
            Some(l) => self.ok_at(
                file,
                l.span(),
                check::check_assertion_lifetime(l.get_ref().0).map(|()| l.get_ref().0),
            ),
        }
    }

    fn client_auth(
        &mut self,
        file: usize,
        dir: &Path,
        client: &str,
        p: &ClientParts,
        raw: &mut RawClient,
    ) -> Option<ClientAuth> {
        let lifetime = if p.auth.is_jwt() {
            self.lifetime(file, raw.assertion_lifetime.as_ref())
        } else {
            None
        };
        let alg = match &raw.signing_alg {
            Some(s) if p.auth.is_jwt() => {
                let alg = self.ok_at(file, s.span(), SigningAlg::from_str(s.get_ref()))?;
                let fits = alg.is_hmac() == (p.auth == AuthKind::SecretJwt);
                if !fits {
                    let msg = if alg.is_hmac() {
                        format!(
                            "signing_alg {alg} is an HMAC algorithm, but private_key_jwt signs with a private key (RS*, PS*, ES*, EdDSA); for a shared secret use client_auth = \"client_secret_jwt\""
                        )
                    } else {
                        format!(
                            "client_secret_jwt signs with the client secret: signing_alg must be HS256, HS384 or HS512, not {alg}"
                        )
                    };
                    self.error(Self::at(file, s.span()), msg);
                    return None;
                }
                Some(alg)
            }
            _ => None,
        };
        match p.auth {
            AuthKind::None => Some(ClientAuth::None),
            AuthKind::Basic | AuthKind::Post | AuthKind::SecretJwt => {
                let raw_secret = raw.client_secret.take()?;
                let span = raw_secret.span();
                let secret = self.credential(file, dir, client, "client_secret", raw_secret)?;
                Some(match p.auth {
                    AuthKind::Basic => ClientAuth::Basic { secret },
                    AuthKind::Post => ClientAuth::Post { secret },
                    _ => {
                        let alg = alg.unwrap_or(SigningAlg::HS256);
                        let key = self.ok_at(
                            file,
                            span,
                            SigningKey::parse(alg, &secret.value)
                                .map_err(|e| format!("client_secret: {e}")),
                        )?;
                        ClientAuth::SecretJwt {
                            secret,
                            key,
                            lifetime: lifetime?,
                        }
                    }
                })
            }
            AuthKind::PrivateKeyJwt => {
                let raw_key = raw.private_key.take()?;
                let span = raw_key.span();
                let cred = self.credential(file, dir, client, "private_key", raw_key)?;
                let parsed = match alg {
                    Some(alg) => SigningKey::parse(alg, &cred.value),
                    None => SigningKey::parse_infer(&cred.value),
                };
                let key =
                    self.ok_at(file, span, parsed.map_err(|e| format!("private_key: {e}")))?;
                Some(ClientAuth::PrivateKeyJwt {
                    key,
                    key_source: cred.source,
                    key_material: cred.value,
                    key_id: raw.key_id.take().map(Spanned::into_inner),
                    lifetime: lifetime?,
                })
            }
        }
    }

    /// Reads one secret; a relative `file` is taken from the directory of the config file
    /// the key is written in.
    fn credential(
        &mut self,
        file: usize,
        dir: &Path,
        client: &str,
        key: &str,
        raw: Spanned<RawSecret>,
    ) -> Option<Credential> {
        let loc = Self::at(file, raw.span());
        let source = match raw.into_inner() {
            RawSecret::File(p) => SecretSource::File(resolve(dir, p)),
            RawSecret::Env(n) => SecretSource::Env(n),
            RawSecret::Credential(n) => SecretSource::Credential(n),
            RawSecret::Inline(s) => {
                if self.files[file].mode.is_some_and(|m| m & 0o077 != 0) {
                    self.warn(
                        loc,
                        format!(
                            "{key} of client \"{client}\" is written inline in a file that group or others can read; \
                             move it to {{ file = PATH }} or {{ credential = NAME }}, or chmod 600 the config"
                        ),
                    );
                }
                SecretSource::Inline(s)
            }
        };
        // A secret file others can write is refused (whoever can write it controls the
        // credential); one any user can read gives a warning.
        if let Some(path) = source.path() {
            match self.safe.file(&path) {
                Err(e) => {
                    let e = format!(
                        "{key}: secret file: {e}; whoever can write it controls this credential"
                    );
                    self.error(loc, e);
                    return None;
                }
                Ok(Some(mode)) if mode & 0o004 != 0 => self.warn(
                    loc,
                    format!(
                        "{key}: secret file {} can be read by any user (mode {mode:04o}): chmod \
                         o-r it (0600, or 0640 with the daemon's group)",
                        path.display()
                    ),
                ),
                Ok(_) => {}
            }
        }
        let value = source
            .load()
            .map_err(|e| self.error(loc, format!("{key}: {e}")));
        Some(Credential {
            value: value.ok()?,
            source,
        })
    }

    fn extra(
        &mut self,
        file: usize,
        raw: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
        check: impl Fn(&str, &str) -> Result<(), String>,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, v) in raw.unwrap_or_default() {
            if self
                .ok_at(file, k.span(), check(k.get_ref(), v.get_ref()))
                .is_some()
            {
                out.insert(k.into_inner(), v.into_inner());
            }
        }
        out
    }

    fn ids(&mut self, file: usize, raw: Option<Vec<Spanned<Id>>>, kind: IdKind) -> Vec<u32> {
        let mut out = Vec::new();
        for id in raw.unwrap_or_default() {
            if let Some(n) = self.resolve_id(file, &id, kind) {
                out.push(n);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn resolve_id(&mut self, file: usize, id: &Spanned<Id>, kind: IdKind) -> Option<u32> {
        let result = match id.get_ref() {
            Id::Number(n) => Ok(*n),
            Id::Name(name) => resolve_name(name, kind),
        };
        self.ok_at(file, id.span(), result)
    }
}

/// The daemon's user, as the config is checked: this process's effective user, except that
/// root checking a config whose `state_dir` exists and belongs to another user (the packaged
/// `tokenwarden` user, say) checks it as that user would run it. The daemon itself refuses
/// to start on a state directory it does not own, so this never widens what a running daemon
/// trusts.
fn daemon_user(state_dir: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        return euid;
    }
    match std::fs::symlink_metadata(state_dir) {
        Ok(m) if m.is_dir() => m.uid(),
        _ => euid,
    }
}

/// `state_dir` as [`crate::state::StateDir::open`] will judge it, creating nothing: its
/// parents walked safely; if it exists, a directory (not a link) owned by the daemon's user
/// and not writable by group or others.
fn check_state_dir(path: &Path, safe: &mut safepath::Checker) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if let Some(parent) = path.parent() {
        safe.parent_dir(parent).map_err(|e| e.to_string())?;
    }
    let trust = safe.trust();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            Err("it is a symbolic link; give the real directory".into())
        }
        Ok(m) if !m.is_dir() => Err("it is not a directory".into()),
        Ok(m) if m.uid() != trust.user() || m.mode() & 0o022 != 0 => Err(format!(
            "it is owned by uid {} with mode {:04o}; it must be owned by the daemon's user \
             (uid {}) and not writable by group or others",
            m.uid(),
            m.mode() & 0o7777,
            trust.user()
        )),
        _ => Ok(()),
    }
}

/// What would stop the user running `check` from running the daemon with `config`, one line
/// per problem: the state directory or the socket's directory neither there and writable nor
/// creatable by this user. `check` prints them as warnings: the daemon is usually run by
/// another user than the operator checking its config (docs/cli.md#check).
pub fn access_warnings(config: &Config) -> Vec<String> {
    let uid = nix::unistd::getuid();
    let mut warnings = Vec::new();
    let state = &config.daemon.state_dir;
    if let Some(w) = not_writable(state, uid.as_raw()) {
        warnings.push(format!(
            "state_dir \"{}\": {w}; the daemon run as uid {uid} would stop at startup: run it \
             as the directory's owner, or create it owned by that user with mode 0700",
            state.display()
        ));
    }
    if let Some(socket) = &config.daemon.socket
        && let Some(dir) = socket.parent()
        && let Some(w) = not_writable(dir, uid.as_raw())
    {
        warnings.push(format!(
            "socket \"{}\": {w}; the daemon run as uid {uid} could not bind its socket: \
             create {} writable by the daemon's user (systemd: RuntimeDirectory=)",
            socket.display(),
            dir.display()
        ));
    }
    warnings
}

/// Why `uid` (this process's real user) could not create files in `dir`, if it could not:
/// an existing directory it cannot write, or a missing one whose nearest existing ancestor it
/// cannot write (so it could not be created).
fn not_writable(dir: &Path, uid: u32) -> Option<String> {
    use nix::unistd::{AccessFlags, access};
    let wx = AccessFlags::W_OK | AccessFlags::X_OK;
    if std::fs::symlink_metadata(dir).is_ok() {
        return access(dir, wx)
            .err()
            .map(|e| format!("{} is not writable by uid {uid} ({e})", dir.display()));
    }
    let mut up = dir.parent();
    while let Some(a) = up {
        if std::fs::symlink_metadata(a).is_ok() {
            return access(a, wx).err().map(|e| {
                format!(
                    "{} does not exist and uid {uid} cannot create it in {} ({e})",
                    dir.display(),
                    a.display()
                )
            });
        }
        up = a.parent();
    }
    None
}

fn resolve(dir: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { dir.join(p) }
}

#[derive(Clone, Copy)]
enum IdKind {
    User,
    Group,
}

/// A user or group name → its id, from the system's databases (NSS).
fn resolve_name(name: &str, kind: IdKind) -> Result<u32, String> {
    let found = match kind {
        IdKind::User => nix::unistd::User::from_name(name).map(|u| u.map(|u| u.uid.as_raw())),
        IdKind::Group => nix::unistd::Group::from_name(name).map(|g| g.map(|g| g.gid.as_raw())),
    };
    let what = match kind {
        IdKind::User => "user",
        IdKind::Group => "group",
    };
    match found {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(format!("unknown {what} \"{name}\"")),
        Err(e) => Err(format!("cannot look up {what} \"{name}\": {e}")),
    }
}

// === impl Loader: outputs ===

impl Loader<'_> {
    fn outputs(
        &mut self,
        file: usize,
        client: &str,
        value: Option<Spanned<DeValue<'_>>>,
    ) -> Option<Vec<OutputConfig>> {
        let Some(value) = value else {
            return Some(Vec::new());
        };
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            self.error(
                Self::at(file, span),
                format!(
                    "outputs of client \"{client}\" must be [[clients.{client}.outputs]] tables"
                ),
            );
            return None;
        };
        let what = format!("[[clients.{client}.outputs]]");
        // Exactly as many as there are: a client's config lives as long as the client, and a
        // grown Vec would keep room for four outputs (issue 6: memory per client).
        let mut out = Some(Vec::with_capacity(items.len()));
        for item in items {
            let header = Self::at(file, item.span());
            let built = self
                .table::<RawOutput>(file, &what, item)
                .and_then(|raw| self.output(file, client, header, raw));
            match (built, out.as_mut()) {
                (Some(o), Some(v)) => v.push(o),
                _ => out = None,
            }
        }
        out
    }

    fn output(
        &mut self,
        file: usize,
        client: &str,
        header: Loc,
        raw: RawOutput,
    ) -> Option<OutputConfig> {
        let before = self.errors.len();
        let path_loc = Self::at(file, raw.path.span());
        let path = raw.path.into_inner();
        if !path.is_absolute() {
            self.error(
                path_loc,
                format!("output path \"{}\" must be absolute", path.display()),
            );
        } else if let Some((loc, other)) = self.outputs_seen.get(&path).cloned() {
            let at = self.describe(loc);
            self.error(
                path_loc,
                format!(
                    "output path \"{}\" is already used by client \"{other}\" at {at}",
                    path.display()
                ),
            );
        } else {
            self.outputs_seen
                .insert(path.clone(), (path_loc, client.to_owned()));
            if let Some(dir) = path.parent()
                && let Err(e) = self.safe.dir(dir)
            {
                self.error(path_loc, format!("output path \"{}\": {e}", path.display()));
            }
        }
        let format = match &raw.format {
            Some(f) => self.ok_at(file, f.span(), check::parse_output_format(f.get_ref())),
            None => Some(OutputFormat::Token),
        };
        let env_prefix = match raw.env_prefix {
            Some(p) => {
                let r = check::check_env_prefix(p.get_ref()).map(|()| p.get_ref().clone());
                self.ok_at(file, p.span(), r)
            }
            None => Some(String::new()),
        };
        let owner = raw
            .owner
            .as_ref()
            .and_then(|o| self.resolve_id(file, o, IdKind::User));
        let group = raw
            .group
            .as_ref()
            .and_then(|g| self.resolve_id(file, g, IdKind::Group));
        if !self.chown.allow(owner, group) {
            self.warn(
                header,
                format!(
                    "owner/group of output {} cannot be applied: this process lacks CAP_CHOWN \
                     (add AmbientCapabilities=CAP_CHOWN to the unit, as the \
                     tokenwarden-chown.conf drop-in does)",
                    path.display()
                ),
            );
        }
        let on_change = match raw.on_change {
            Some(argv) if argv.get_ref().first().is_some_and(|p| p.is_empty()) => {
                self.error(
                    Self::at(file, argv.span()),
                    "on_change: the program name is empty",
                );
                Vec::new()
            }
            Some(argv) => argv.into_inner(),
            None => Vec::new(),
        };
        if self.errors.len() != before {
            return None;
        }
        Some(OutputConfig {
            path,
            format: format?,
            mode: raw.mode.map(|m| m.into_inner().0).unwrap_or(0o600),
            owner,
            group,
            on_change,
            env_prefix: env_prefix?,
        })
    }
}
