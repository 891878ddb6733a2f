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
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use zeroize::Zeroizing;

use super::check::{self, AuthKind, GrantKind, TimingKey};
use super::error::{ConfigError, ConfigErrors, LineIndex, suggestion};
use super::raw::{
    Id, RawAssertion, RawClient, RawDaemon, RawFleet, RawOutput, RawSubject, RawTiming,
    is_secret_value,
};
use super::types::*;
use crate::keys::{SigningAlg, SigningKey};
use crate::safepath::{self, Trust};
use crate::secret::SecretSource;
use serde::Deserialize as _;

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

/// Like [`load`], for a reload: the result is the very `Config` a full load gives (tests check
/// it), but when only `[clients.NAME]` tables changed, or secret files of some clients (as the
/// file watcher reports them in `reuse.changed`), only those clients are read and built again,
/// and every other client is taken from `reuse.previous` as it is (the same `Arc`). This is a
/// parse cache, not a change detector: what the reload does is decided by [`super::diff`]
/// alone, on this result. Reading 10,000 clients' tables and secret files again to find one
/// changed scope took ~200 ms of CPU (issue 12: a reload within 100 ms); this takes a read
/// and a digest of the text, and the one client's build. Anything else (`[daemon]` or
/// `[defaults]` edited, an included file added, a previous warning, an error) is a full load.
pub fn load_reusing(path: &Path, reuse: Option<Reuse<'_>>) -> Result<Config, ConfigErrors> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => Zeroizing::new(text),
        Err(e) => {
            return Err(ConfigErrors {
                errors: vec![ConfigError {
                    file: path.to_path_buf(),
                    line: 0,
                    column: 0,
                    message: format!("cannot read the config file: {e}"),
                }],
            });
        }
    };
    if let Some(reuse) = reuse
        && let Some(config) = Loader::new(Some(reuse.previous)).reload(&text, reuse)
    {
        return Ok(config);
    }
    load_text(text, path)
}

/// Like [`load`], with the main file's text given; includes and relative secret paths are
/// still resolved against `path`'s directory, and `path`'s mode is checked for the inline
/// secret warning when the file exists.
pub fn load_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    load_text(Zeroizing::new(text.to_owned()), path)
}

fn load_text(text: Zeroizing<String>, path: &Path) -> Result<Config, ConfigErrors> {
    let mut loader = Loader::new(None);
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

struct Loader {
    files: Vec<SourceFile>,
    /// The layout of each file read in full, in the order of `Config::files`.
    layouts: Vec<Option<Vec<Block>>>,
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

impl Loader {
    /// A loader trusting root and this process's user, or, on a reload, the running
    /// config's daemon user (see [`daemon_user`]).
    fn new(previous: Option<&Config>) -> Loader {
        let trust = match previous {
            Some(c) => Trust::for_user(daemon_user(&c.daemon.state_dir)),
            None => Trust::of_this_process(),
        };
        Loader {
            files: Vec::new(),
            layouts: Vec::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
            clients_seen: std::collections::HashMap::new(),
            outputs_seen: std::collections::HashMap::new(),
            chown: crate::outputs::ChownRights::of_this_process(),
            safe: safepath::Checker::new(trust),
            fleet_local: std::collections::BTreeSet::new(),
        }
    }

    fn add_file(&mut self, path: &Path, text: Zeroizing<String>) -> usize {
        self.files.push(SourceFile {
            path: path.to_path_buf(),
            lines: LineIndex::new(&text),
            text: Rc::new(text),
            mode: file_mode(path),
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

impl Loader {
    fn main(&mut self, text: Zeroizing<String>, path: &Path) -> Option<Config> {
        let file = self.add_file(path, text);
        let text = Rc::clone(&self.files[file].text);
        let mut root = self.parse(file, &text)?;
        self.layouts
            .push(blocks(&text, &root, 0, self.files[file].mode));
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
        self.check_chains(&clients);

        Some(Config {
            path: path.to_path_buf(),
            daemon: daemon?,
            clients,
            files,
            warnings: Vec::new(),
            layout: Layout {
                files: std::mem::take(&mut self.layouts),
                defaults: defaults.timing,
            },
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
        clients: &mut BTreeMap<String, Arc<ClientConfig>>,
    ) {
        let (pattern, loc) = pattern;
        let full = dir.join(pattern);
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
            let file = self.add_file(&path, Zeroizing::new(text));
            let text = Rc::clone(&self.files[file].text);
            let Some(mut root) = self.parse(file, &text) else {
                continue;
            };
            self.layouts
                .push(blocks(&text, &root, 0, self.files[file].mode));
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
        out: &mut BTreeMap<String, Arc<ClientConfig>>,
    ) {
        let span = value.span();
        let DeValue::Table(table) = value.into_inner() else {
            self.error(
                Self::at(file, span),
                "clients must be a table of [clients.NAME] tables",
            );
            return;
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
            if let Some(c) = self.client(file, dir, &name, value, defaults) {
                out.insert(name, Arc::new(c));
            }
        }
    }
}

// === the reload's parse cache ===

/// Where each file's tables lie, whose they are, and a digest of each one's text: what a reload
/// needs to read again only the clients whose text or secret files changed (see
/// [`load_reusing`]). A cache: configs that load the same are equal whatever their layouts.
#[derive(Clone, Default)]
pub struct Layout {
    /// One per file of `Config::files`, in that order; `None` where it cannot be trusted.
    files: Vec<Option<Vec<Block>>>,
    /// The `[defaults]` every client was built with.
    defaults: Timing,
}

impl PartialEq for Layout {
    fn eq(&self, _: &Layout) -> bool {
        true
    }
}

// The digests are of text that may hold inline secrets: none is shown.
impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Layout({} files)", self.files.len())
    }
}

/// A file's lines from the start of a table header's line to the next one's (the first block
/// from the start of the file).
#[derive(Clone)]
struct Block {
    start: usize,
    end: usize,
    /// SHA-256 of the block's bytes, cut to 128 bits.
    digest: [u8; 16],
    /// The client whose table this is; `None` for `[daemon]`, `[defaults]` and `[clients]`.
    owner: Option<Arc<str>>,
    /// Permission bits of the file when read (the inline-secret warning), on its first block.
    mode: Option<u32>,
}

fn digest(bytes: &[u8]) -> [u8; 16] {
    let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&sha.as_ref()[..16]);
    out
}

/// `text` (at `base` in its file) cut into blocks at the lines of its table headers. A table
/// defined by a header is the only value whose span starts with `[`: an implicit table's span
/// is its key's, an inline one's starts with `{`, and arrays are only looked into for tables.
/// `None` if a header does not begin its line.
fn blocks(text: &str, root: &DeTable<'_>, base: usize, mode: Option<u32>) -> Option<Vec<Block>> {
    type Cuts = Vec<(usize, Option<Arc<str>>)>;
    fn walk(text: &[u8], v: &Spanned<DeValue<'_>>, owner: &Option<Arc<str>>, out: &mut Cuts) {
        let children: Vec<&Spanned<DeValue<'_>>> = match v.get_ref() {
            DeValue::Table(t) => t.values().collect(),
            DeValue::Array(items) => items.iter().collect(),
            _ => return,
        };
        if text.get(v.span().start) == Some(&b'[') && matches!(v.get_ref(), DeValue::Table(_)) {
            out.push((v.span().start, owner.clone()));
        }
        for c in children {
            walk(text, c, owner, out);
        }
    }
    let bytes = text.as_bytes();
    let mut cuts = Cuts::new();
    for (key, value) in root {
        match value.get_ref() {
            DeValue::Table(clients) if key.get_ref() == "clients" => {
                if bytes.get(value.span().start) == Some(&b'[') {
                    cuts.push((value.span().start, None));
                }
                for (name, client) in clients {
                    let owner = Some(Arc::from(name.get_ref().as_ref()));
                    walk(bytes, client, &owner, &mut cuts);
                }
            }
            _ => walk(bytes, value, &None, &mut cuts),
        }
    }
    cuts.sort_by_key(|c| c.0);
    for cut in cuts.iter_mut() {
        cut.0 -= bytes[..cut.0]
            .iter()
            .rev()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        if cut.0 > 0 && bytes[cut.0 - 1] != b'\n' {
            return None;
        }
    }
    match cuts.first_mut() {
        Some(first) => first.0 = 0,
        None => cuts.push((0, None)),
    }
    let ends = cuts.iter().skip(1).map(|c| c.0).chain([bytes.len()]);
    let out = cuts
        .iter()
        .zip(ends)
        .filter(|((s, _), e)| s < e || bytes.is_empty());
    Some(
        out.map(|((s, owner), e)| Block {
            start: base + s,
            end: base + e,
            digest: digest(&bytes[*s..e]),
            owner: owner.clone(),
            mode,
        })
        .collect(),
    )
}

/// The blocks `i..j` of `old` that differ in `text`, found by comparing their digests from the
/// front and from the back, and the range of `text` that replaces them.
fn changed(old: &[Block], text: &[u8]) -> (usize, usize, Range<usize>) {
    let delta = text.len() as isize - old.last().map_or(0, |b| b.end) as isize;
    let at = |k: usize, shift: isize| {
        (old[k].start as isize + shift) as usize..(old[k].end as isize + shift) as usize
    };
    let same = |r: Range<usize>, k: usize| text.get(r).is_some_and(|t| digest(t) == old[k].digest);
    let mut i = 0;
    while i < old.len() && same(at(i, 0), i) {
        i += 1;
    }
    let mut front = if i == 0 { 0 } else { old[i - 1].end };
    let mut j = old.len();
    while j > i && at(j - 1, delta).start >= front && same(at(j - 1, delta), j - 1) {
        j -= 1;
    }
    // With the rest of the tables of the clients it touches (`[[clients.NAME.outputs]]`).
    let ours = |k: usize, i: usize, j: usize| {
        old[k].owner.is_some() && old[i..j].iter().any(|b| b.owner == old[k].owner)
    };
    while i > 0 && ours(i - 1, i, j) {
        i -= 1;
        front = old[i].start;
    }
    while j < old.len() && ours(j, i, j) {
        j += 1;
    }
    let back = if j == old.len() {
        text.len()
    } else {
        at(j, delta).start
    };
    (i, j, front..back)
}

impl Loader {
    /// The reload of [`load_reusing`], or `None` where it needs a full load.
    fn reload(&mut self, main_text: &Zeroizing<String>, reuse: Reuse<'_>) -> Option<Config> {
        let previous = reuse.previous;
        let layout = &previous.layout;
        if !previous.warnings.is_empty() || self.included(previous)? != previous.files {
            return None;
        }
        // What a full load would judge again on the file system (the [daemon] text is the same).
        let d = &previous.daemon;
        check_state_dir(&d.state_dir, &mut self.safe).ok()?;
        for socket in [&d.socket, &d.http_socket].into_iter().flatten() {
            self.safe.dir(socket.parent()?).ok()?;
        }
        // Clients reading a secret file that changed are built again.
        let mut stale = std::collections::HashSet::new();
        if reuse.changed.iter().any(|p| !previous.files.contains(p)) {
            for (name, c) in &previous.clients {
                if c.secret_paths().iter().any(|p| reuse.changed.contains(p)) {
                    stale.insert(name.as_str());
                }
            }
        }
        let defaults = TimingSrc {
            timing: layout.defaults.clone(),
            locs: BTreeMap::new(),
        };
        let mut built = BTreeMap::new();
        let mut dropped = std::collections::HashSet::new();
        let mut layouts = Vec::with_capacity(layout.files.len());
        for (path, old) in previous.files.iter().zip(&layout.files) {
            let old = old.as_ref()?;
            self.safe.file(path).ok()?;
            if file_mode(path) != old.first()?.mode {
                return None;
            }
            let is_stale = |b: &Block| b.owner.as_deref().is_some_and(|o| stale.contains(o));
            let read;
            let text: &str = if path == &previous.path {
                main_text
            } else if reuse.changed.contains(path) || old.iter().any(is_stale) {
                read = Zeroizing::new(std::fs::read_to_string(path).ok()?);
                &read
            } else {
                layouts.push(Some(old.clone()));
                continue;
            };
            // Read alone: the changed text, and each run of stale clients' unchanged tables.
            let (i, j, region) = changed(old, text.as_bytes());
            let delta = text.len() as isize - old.last().map_or(0, |b| b.end) as isize;
            let shift = |k: usize, at: usize| {
                if k < i {
                    at
                } else {
                    (at as isize + delta) as usize
                }
            };
            let read_again = |k: usize| (i..j).contains(&k) || is_stale(&old[k]);
            let mut runs = vec![region.clone()];
            for (k, b) in old.iter().enumerate().filter(|(k, _)| read_again(*k)) {
                dropped.insert(b.owner.clone()?);
                match runs.last_mut() {
                    _ if (i..j).contains(&k) => {}
                    Some(r) if k > 0 && read_again(k - 1) && k != j => r.end = shift(k, b.end),
                    _ => runs.push(shift(k, b.start)..shift(k, b.end)),
                }
            }
            // A client read again must be read whole.
            let elsewhere = |(k, b): (usize, &Block)| {
                !read_again(k) && b.owner.as_ref().is_some_and(|o| dropped.contains(o))
            };
            if old.iter().enumerate().any(elsewhere) {
                return None;
            }
            let mut new_blocks = Vec::new();
            for (n, run) in runs.into_iter().enumerate() {
                let blocks = self.region(path, text, run, old[0].mode, &defaults, &mut built)?;
                if n == 0 {
                    new_blocks = blocks.into_iter().filter(|b| b.start < b.end).collect();
                }
            }
            let shifted = old[j..].iter().map(|b| Block {
                start: shift(j, b.start),
                end: shift(j, b.end),
                ..b.clone()
            });
            let blocks: Vec<Block> = old[..i]
                .iter()
                .cloned()
                .chain(new_blocks)
                .chain(shifted)
                .collect();
            layouts.push(Some(blocks));
        }
        // A stale client defined outside a block of its own (dotted keys) was not read again.
        if !self.errors.is_empty()
            || !self.warnings.is_empty()
            || !stale.iter().all(|n| dropped.contains(*n))
        {
            return None;
        }
        let mut clients = previous.clients.clone();
        for name in &dropped {
            clients.remove(&**name);
        }
        // A name or an output another client has: the full load reports it at its place.
        let outputs: std::collections::HashSet<&Path> = built
            .values()
            .flat_map(|c: &Arc<ClientConfig>| c.outputs.iter().map(|o| o.path.as_path()))
            .collect();
        let taken = |c: &Arc<ClientConfig>| c.outputs.iter().any(|o| outputs.contains(&*o.path));
        if built.keys().any(|n| clients.contains_key(n))
            || (!outputs.is_empty() && clients.values().any(taken))
        {
            return None;
        }
        clients.extend(built);
        let mut fleet_local = previous.fleet_local.clone();
        fleet_local.retain(|n| !dropped.iter().any(|d| **d == **n));
        fleet_local.append(&mut self.fleet_local);
        // Chains reach across clients: one broken by this edit is reported by the full load,
        // at its place.
        if !chain_problems(&clients).is_empty() {
            return None;
        }
        Some(Config {
            path: previous.path.clone(),
            daemon: previous.daemon.clone(),
            clients,
            files: previous.files.clone(),
            warnings: Vec::new(),
            fleet: previous.fleet.clone(),
            fleet_local,
            layout: Layout {
                files: layouts,
                defaults: layout.defaults.clone(),
            },
        })
    }

    /// Builds the clients of `text[range]` read alone, and returns its blocks; `None` unless it
    /// holds only `[clients.NAME]` tables (and their subtables), each defined by a header. As
    /// the text before `range` is that of the running config, which parsed, the range starts
    /// on a line of its own outside any value; as a header follows it (or the end), what it
    /// holds cannot reach beyond it.
    fn region(
        &mut self,
        path: &Path,
        text: &str,
        range: Range<usize>,
        mode: Option<u32>,
        defaults: &TimingSrc,
        out: &mut BTreeMap<String, Arc<ClientConfig>>,
    ) -> Option<Vec<Block>> {
        let bytes = text.as_bytes();
        let on_line = |at: usize| at == 0 || at == bytes.len() || bytes.get(at - 1) == Some(&b'\n');
        if !on_line(range.start) || !on_line(range.end) {
            return None;
        }
        let part = Zeroizing::new(text.get(range.clone())?.to_owned());
        let file = self.add_file(path, part);
        let part = Rc::clone(&self.files[file].text);
        let mut root = self.parse(file, &part)?;
        let blocks = blocks(&part, &root, range.start, mode)?;
        let clients = root.remove("clients");
        let by_header =
            |v: &Spanned<DeValue<'_>>| part.as_bytes().get(v.span().start) == Some(&b'[');
        match clients {
            _ if !root.is_empty() => return None,
            Some(v) => {
                let DeValue::Table(t) = v.get_ref() else {
                    return None;
                };
                let headed = |c: &Spanned<DeValue<'_>>| {
                    matches!(c.get_ref(), DeValue::Table(_)) && by_header(c)
                };
                if by_header(&v) || !t.values().all(headed) {
                    return None;
                }
                self.clients(file, &parent_dir(path), v, defaults, out);
            }
            None => {}
        }
        Some(blocks)
    }

    /// The main file and the files its `include` globs match now, as a full load reads them.
    fn included(&self, previous: &Config) -> Option<Vec<PathBuf>> {
        let mut files = vec![previous.path.clone()];
        for full in previous.include_globs() {
            for path in glob::glob(&full.to_string_lossy()).ok()? {
                let path = path.ok()?;
                if !files.contains(&path) && path.is_file() {
                    files.push(path);
                }
            }
        }
        Some(files)
    }
}

fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// The directory holding `path` (`.` for a bare name): where a config's relative paths start.
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

// === impl Loader: [daemon] and timing ===

impl Loader {
    /// `[daemon]`, and the include globs with their locations (read even when another
    /// `[daemon]` key is wrong, so their errors show too).
    fn daemon(
        &mut self,
        file: usize,
        raw: RawDaemon,
    ) -> (Option<DaemonConfig>, Vec<(String, Loc)>) {
        let before = self.errors.len();
        let mut d = DaemonConfig::default();
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
        // Judged with the daemon's user of this state_dir.
        d.socket = raw.socket.and_then(|s| self.socket_path(file, "socket", s));
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
        let count = |n: &Spanned<i64>, most: usize| {
            usize::try_from(*n.get_ref())
                .ok()
                .filter(|v| (1..=most).contains(v))
        };
        if let Some(n) = raw.max_concurrent_refreshes {
            let v = count(&n, usize::MAX).ok_or("max_concurrent_refreshes must be at least 1");
            d.max_concurrent_refreshes = self
                .ok_at(file, n.span(), v)
                .unwrap_or(d.max_concurrent_refreshes);
        }
        if let Some(n) = raw.max_connections {
            let v = count(&n, 1_000_000).ok_or("max_connections must be between 1 and 1000000");
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
            match self.socket_path(file, "http_socket", s) {
                Some(path) if d.socket.as_ref() == Some(&path) => self.error(
                    loc,
                    format!(
                        "http_socket \"{}\" is also daemon.socket: give the HTTP API a socket \
                         of its own (such as /run/tokenwarden/http.sock)",
                        path.display()
                    ),
                ),
                path => d.http_socket = path,
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

    /// A socket's path: absolute, in a directory only root or the daemon's user can write.
    fn socket_path(&mut self, file: usize, key: &str, s: Spanned<PathBuf>) -> Option<PathBuf> {
        let loc = Self::at(file, s.span());
        let path = self.absolute(file, key, s)?;
        if let Some(dir) = path.parent()
            && let Err(e) = self.safe.dir(dir)
        {
            self.error(loc, format!("{key} \"{}\": {e}", path.display()));
            return None;
        }
        Some(path)
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
    let TimingSrc {
        mut timing,
        mut locs,
    } = base.clone();
    // Each key is named as its field in `RawTiming` and `Timing`.
    macro_rules! lay_over {
        ($($key:ident),*) => {$(
            if let Some(v) = raw.$key {
                locs.insert(stringify!($key), Loader::at(file, v.span()));
                timing.$key = v.into_inner().into();
            }
        )*};
    }
    lay_over!(refresh_at, jitter, refresh_margin, min_interval);
    lay_over!(default_lifetime, retry_initial, retry_max, timeout);
    TimingSrc { timing, locs }
}

// === impl Loader: [fleet] ===

impl Loader {
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
        let ca_file = self.ca_file(file, dir, raw.ca_file);
        if https && ca_file.is_none() {
            self.error(
                here,
                "[fleet]: https:// endpoints need ca_file, the CA that signed etcd's certificate"
                    .to_string(),
            );
        }
        let cert = raw.cert.map(|p| dir.join(p.into_inner()));
        let user = raw.user.map(Spanned::into_inner);
        // Each secret goes together with the key before it.
        let [cert_key, password] = [
            (
                "cert",
                cert.is_some(),
                "cert_key",
                raw.cert_key,
                "mTLS to etcd",
            ),
            (
                "user",
                user.is_some(),
                "password",
                raw.password,
                "etcd authentication",
            ),
        ]
        .map(|(partner, partner_set, key, secret, why)| {
            let loc = secret.as_ref().map(|k| Self::at(file, k.span()));
            let secret = secret.and_then(|k| self.credential(file, dir, "[fleet]", key, k));
            if partner_set != loc.is_some() {
                let msg = format!("[fleet]: {partner} and {key} go together ({why})");
                self.error(loc.unwrap_or(here), msg);
            }
            secret
        });
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

/// `[clients.NAME.assertion]`: how to sign one, or a ready-made one (any secret source).
enum RawAssertionValue {
    Signed(Option<RawAssertion>),
    Ready(Option<Spanned<SecretSource>>),
}

impl Loader {
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
            // `assertion = { file = PATH }` (or any secret source): a ready-made assertion.
            if is_secret_value(v.get_ref()) {
                let span = v.span();
                let raw = SecretSource::deserialize(ValueDeserializer::from(v))
                    .map_err(|e| self.error(loc, format!("assertion: {}", e.message())))
                    .ok()
                    .map(|r| Spanned::new(span, r));
                return (RawAssertionValue::Ready(raw), loc);
            }
            let raw = self.table::<RawAssertion>(file, &format!("[clients.{name}.assertion]"), v);
            (RawAssertionValue::Signed(raw), loc)
        });

        let mut raw: RawClient =
            self.table(file, &what, Spanned::new(span, DeValue::Table(table)))?;

        let token_url = match (&raw.token_url, &raw.issuer) {
            (Some(t), None) => self.ok_at(file, t.span(), check::check_token_url(t.get_ref())),
            (None, Some(i)) => self.ok_at(file, i.span(), check::check_issuer(i.get_ref())),
            (Some(_), Some(i)) => {
                self.error(
                    Self::at(file, i.span()),
                    format!("{what} has both \"token_url\" and \"issuer\": give one (issuer discovers the token endpoint, RFC 8414)"),
                );
                None
            }
            (None, None) => {
                self.error(
                    header,
                    format!("missing key \"token_url\" in {what} (or \"issuer\", to discover it)"),
                );
                // As serde's own missing key did: nothing more is checked in this client.
                return None;
            }
        };
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
        let ca_file = self.ca_file(file, dir, raw.ca_file.take());
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
        let tls_client = self.tls_client(file, dir, name, &mut raw);

        if self.errors.len() != before {
            return None;
        }
        if raw.fleet.is_some_and(|f| !f.into_inner()) {
            self.fleet_local.insert(name.to_owned());
        }
        Some(ClientConfig {
            name: name.to_owned(),
            token_url: token_url?,
            issuer: raw.issuer.map(Spanned::into_inner),
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
            tls_client: tls_client?,
        })
    }

    /// `tls_client_cert` and `tls_client_key` (RFC 8705): both or neither; the key must be the
    /// certificate's; an expired certificate is an error, one expiring within 7 days a warning.
    /// `Some(None)`: no certificate; `None`: an error was recorded.
    fn tls_client(
        &mut self,
        file: usize,
        dir: &Path,
        client: &str,
        raw: &mut RawClient,
    ) -> Option<Option<std::sync::Arc<crate::oauth::ClientCert>>> {
        let (cert, key) = match (raw.tls_client_cert.take(), raw.tls_client_key.take()) {
            (None, None) => return Some(None),
            (Some(c), Some(k)) => (c, k),
            (Some(c), None) => {
                let msg = "tls_client_cert is given without tls_client_key: give both (the certificate chain and its private key)";
                self.error(Self::at(file, c.span()), msg);
                return None;
            }
            (None, Some(k)) => {
                let msg = "tls_client_key is given without tls_client_cert: give both (the certificate chain and its private key)";
                self.error(Self::at(file, k.span()), msg);
                return None;
            }
        };
        let (cert_loc, key_span) = (Self::at(file, cert.span()), key.span());
        let cert = self.credential(file, dir, client, "tls_client_cert", cert);
        let key = self.credential(file, dir, client, "tls_client_key", key)?;
        let pair = crate::oauth::ClientCert::new(cert?, key)
            .and_then(|p| crate::oauth::check_client_cert(&p).map(|()| p))
            .map_err(|e| format!("client \"{client}\": {e}"));
        let pair = self.ok_at(file, key_span, pair)?;
        match pair.expiry_check(std::time::SystemTime::now()) {
            Ok(None) => {}
            Ok(Some(w)) => self.warn(cert_loc, format!("client \"{client}\": {w}")),
            Err(e) => {
                self.error(cert_loc, format!("client \"{client}\": {e}"));
                return None;
            }
        }
        Some(Some(std::sync::Arc::new(pair)))
    }

    /// `ca_file`, taken from `dir` when relative, checked (it must hold a CA certificate).
    fn ca_file(&mut self, file: usize, dir: &Path, p: Option<Spanned<PathBuf>>) -> Option<PathBuf> {
        let p = p?;
        let path = dir.join(p.get_ref());
        self.ok_at(file, p.span(), crate::oauth::check_ca_file(&path));
        Some(path)
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
        let (ca, te) = (
            p.auth == AuthKind::ClientAssertion,
            p.grant == GrantKind::TokenExchange,
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
            ("tls_client_cert", p.auth.is_mtls(), true, a),
            ("client_assertion", ca, ca, a),
            ("subject_token", te, te, g),
            ("subject_token_type", false, te, g),
            ("actor_token", false, te, g),
            ("actor_token_type", false, te, g),
            ("requested_token_type", false, te, g),
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
        assertion: Option<(RawAssertionValue, Loc)>,
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
            GrantKind::TokenExchange => self.token_exchange(file, dir, client, raw),
            GrantKind::JwtBearer => {
                let a = match assertion? {
                    (RawAssertionValue::Signed(raw), _) => raw?,
                    (RawAssertionValue::Ready(raw), _) => {
                        let source =
                            self.ready_token(file, dir, client, "assertion", raw?, true)?;
                        return Some(Grant::AssertionFile { source });
                    }
                };
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
            AuthKind::TlsClientAuth => Some(ClientAuth::TlsClientAuth),
            AuthKind::SelfSignedTlsClientAuth => Some(ClientAuth::SelfSignedTlsClientAuth),
            AuthKind::ClientAssertion => {
                let raw = raw.client_assertion.take()?;
                let source = self.ready_token(file, dir, client, "client_assertion", raw, true)?;
                Some(ClientAuth::ClientAssertion { source })
            }
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
        raw: Spanned<SecretSource>,
    ) -> Option<Credential> {
        let loc = Self::at(file, raw.span());
        // A certificate chain is public: read like a secret, but no warning about who can read it.
        let public = key == "tls_client_cert";
        let mut source = raw.into_inner();
        match &mut source {
            // `join` keeps an absolute path as it is.
            SecretSource::File(p) => *p = dir.join(&*p),
            SecretSource::Env(_) | SecretSource::Credential(_) => {}
            SecretSource::Inline(_) => {
                if !public && self.files[file].mode.is_some_and(|m| m & 0o077 != 0) {
                    self.warn(
                        loc,
                        format!(
                            "{key} of client \"{client}\" is written inline in a file that group or others can read; \
                             move it to {{ file = PATH }} or {{ credential = NAME }}, or chmod 600 the config"
                        ),
                    );
                }
            }
        }
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
                Ok(Some(mode)) if !public && mode & 0o004 != 0 => self.warn(
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
/// per problem: the state directory or a socket's directory (gRPC, HTTP) neither there and
/// writable nor creatable by this user. `check` prints them as warnings: the daemon is usually run by
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
    let sockets = [
        ("socket", &config.daemon.socket),
        ("http_socket", &config.daemon.http_socket),
    ];
    for (key, socket) in sockets {
        if let Some(socket) = socket
            && let Some(dir) = socket.parent()
            && let Some(w) = not_writable(dir, uid.as_raw())
        {
            warnings.push(format!(
                "{key} \"{}\": {w}; the daemon run as uid {uid} could not bind its socket: \
                 create {} writable by the daemon's user (systemd: RuntimeDirectory=)",
                socket.display(),
                dir.display()
            ));
        }
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

// === impl Loader: ready-made tokens and token exchange (RFC 7521 §4.2, RFC 8693) ===

impl Loader {
    /// A ready-made token read at each request (an assertion, a subject or actor token). It is
    /// read now too, so that `check` finds a missing or unreadable one; a `jwt` one must hold a
    /// JWT (RFC 7519 §7.2: three base64url parts, JSON header and claims), and an expired one is
    /// a warning here (the daemon refuses to send it).
    fn ready_token(
        &mut self,
        file: usize,
        dir: &Path,
        client: &str,
        key: &str,
        raw: Spanned<SecretSource>,
        jwt: bool,
    ) -> Option<SecretSource> {
        let loc = Self::at(file, raw.span());
        let cred = self.credential(file, dir, client, key, raw)?;
        if jwt {
            match crate::oauth::assertion_file::inspect(&cred.value) {
                Err(e) => {
                    self.error(loc, format!("{key}: {} {e}", cred.source));
                    return None;
                }
                Ok(info) => {
                    if let Some(m) =
                        info.expired_message(key, &cred.source, std::time::SystemTime::now())
                    {
                        self.warn(loc, m);
                    }
                }
            }
        }
        Some(cred.source)
    }

    /// `grant_type = "token_exchange"` (RFC 8693 §2.1).
    fn token_exchange(
        &mut self,
        file: usize,
        dir: &Path,
        client: &str,
        raw: &mut RawClient,
    ) -> Option<Grant> {
        let types = [
            raw.subject_token_type.take(),
            raw.actor_token_type.take(),
            raw.requested_token_type.take(),
        ];
        let [subject_type, actor_type, requested] = types.map(|t| {
            t.and_then(|t| {
                let span = t.span();
                let t = t.into_inner();
                self.ok_at(file, span, check_token_type(&t).map(|()| t))
            })
        });
        let raw_subject = raw.subject_token.take()?;
        let span = raw_subject.span();
        let subject = match raw_subject.into_inner() {
            RawSubject::Client(name) => Subject::Client(name),
            RawSubject::Secret(secret) => {
                let is_jwt = subject_type.as_deref().is_none_or(|t| t == TOKEN_TYPE_JWT);
                let source = self.ready_token(
                    file,
                    dir,
                    client,
                    "subject_token",
                    Spanned::new(span, secret),
                    is_jwt,
                )?;
                Subject::Source(source)
            }
        };
        let subject_token_type = subject_type.unwrap_or_else(|| {
            match subject {
                Subject::Client(_) => TOKEN_TYPE_ACCESS_TOKEN,
                Subject::Source(_) => TOKEN_TYPE_JWT,
            }
            .to_string()
        });
        let actor = match (raw.actor_token.take(), actor_type) {
            (None, None) => None,
            (Some(token), Some(t)) => {
                let is_jwt = t == TOKEN_TYPE_JWT;
                let source = self.ready_token(file, dir, client, "actor_token", token, is_jwt)?;
                Some((source, t))
            }
            (Some(token), None) => {
                self.error(
                    Self::at(file, token.span()),
                    "actor_token needs actor_token_type (RFC 8693 §2.1)",
                );
                return None;
            }
            (None, Some(_)) => {
                let loc = self.clients_seen.get(client).copied();
                if let Some(loc) = loc {
                    self.error(
                        loc,
                        format!("[clients.{client}]: actor_token_type is set without actor_token"),
                    );
                }
                return None;
            }
        };
        Some(Grant::TokenExchange(Box::new(TokenExchange {
            subject,
            subject_token_type,
            actor,
            requested_token_type: requested,
        })))
    }

    /// Chained clients (`subject_token = { client = "NAME" }`): the upstream must be a client
    /// of this config, and no chain may loop back on itself. Each problem is reported at the
    /// client it was found on.
    fn check_chains(&mut self, clients: &BTreeMap<String, std::sync::Arc<ClientConfig>>) {
        for (name, message) in chain_problems(clients) {
            if let Some(loc) = self.clients_seen.get(name).copied() {
                self.error(loc, message);
            }
        }
    }
}

/// What is wrong with the chains of `clients` (pure): (client, message) for each upstream
/// missing, and once for each cycle.
fn chain_problems(clients: &BTreeMap<String, std::sync::Arc<ClientConfig>>) -> Vec<(&str, String)> {
    let upstream = |name: &str| clients.get(name).and_then(|c| c.grant.upstream());
    let mut reported: std::collections::BTreeSet<String> = Default::default();
    let mut problems = Vec::new();
    for (name, c) in clients {
        let Some(up) = c.grant.upstream() else {
            continue;
        };
        if !clients.contains_key(up) {
            problems.push((
                name.as_str(),
                format!(
                    "[clients.{name}]: subject_token names client \"{up}\", which is not in the config; add it back or change subject_token"
                ),
            ));
            continue;
        }
        // One upstream per client: follow the chain until it ends or comes back.
        let mut path = vec![name.as_str()];
        let mut next = Some(up);
        while let Some(n) = next {
            if let Some(i) = path.iter().position(|p| *p == n) {
                let cycle = &path[i..];
                let mut key: Vec<&str> = cycle.to_vec();
                key.sort_unstable();
                if cycle.contains(&name.as_str()) && reported.insert(key.join(" ")) {
                    let shown = cycle.iter().chain([&n]).copied().collect::<Vec<_>>();
                    problems.push((
                        name.as_str(),
                        format!(
                            "token exchange clients form a cycle: {}; each needs the other's token first",
                            shown.join(" -> ")
                        ),
                    ));
                }
                break;
            }
            path.push(n);
            next = upstream(n);
        }
    }
    problems
}

/// A token type identifier (RFC 8693 §3): an absolute URI, such as
/// `urn:ietf:params:oauth:token-type:jwt`.
fn check_token_type(t: &str) -> Result<(), String> {
    let scheme = t.split_once(':').map(|(s, _)| s).unwrap_or("");
    let scheme_ok = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "token type {t:?} is not a URI; write it like \"{TOKEN_TYPE_JWT}\" (RFC 8693 §3)"
        ));
    }
    Ok(())
}

// === impl Loader: outputs ===

impl Loader {
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
