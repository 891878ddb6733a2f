//! The documentation against the repository: every relative link (and `#anchor`) in its
//! Markdown resolves, every `docs/….md` the source, tests and examples name exists, every key
//! the config accepts (`src/config/raw.rs`) has its row in `docs/configuration.md` and nothing
//! else has one, the config's manual page (rendered from that page) names every key, the
//! README's first config passes `check`, and no tracked file cites the internal specification.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

use crate::support::{bin, read};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Directories never searched: build output, virtual environments, fuzzing work dirs.
fn skipped(dir: &Path) -> bool {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with('.')
        || name == "target"
        || name == "node_modules"
        || name == "__pycache__"
        || dir.ends_with("fuzz/corpus")
        || dir.ends_with("fuzz/artifacts")
}

/// Every file under `dir` whose name ends with one of `exts`, in name order.
fn files_under(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if !skipped(&path) {
                    stack.push(path);
                }
            } else if kind.is_file()
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| exts.iter().any(|e| n.ends_with(e)))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

// === reading Markdown ===

/// What the link check needs from one Markdown file.
#[derive(Debug, Default)]
struct Doc {
    /// Link and image destinations, with their line.
    links: Vec<(String, usize)>,
    /// Inline code that looks like a path in the repository (`docs/x.md`), with its line.
    code_paths: Vec<(String, usize)>,
    /// The anchors GitHub gives its headings.
    anchors: BTreeSet<String>,
}

/// GitHub's anchor for a heading's text (github-slugger): lower case; letters, digits, `-` and
/// `_` kept; each space a `-`; everything else dropped.
fn slug(text: &str) -> String {
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The top-level directories whose paths inline code may name.
const REPO_DIRS: [&str; 10] = [
    "docs/", "config/", "src/", "tests/", "scripts/", "systemd/", "proto/", "fuzz/", "benches/",
    ".ci/",
];

/// Whether inline code is a concrete path in the repository (no placeholder or glob).
fn is_repo_path(code: &str) -> bool {
    REPO_DIRS.iter().any(|d| code.starts_with(d))
        && !code.contains(|c: char| {
            c.is_whitespace() || "*?{}<>$…|".contains(c) || c.is_ascii_uppercase()
        })
}

fn parse_doc(text: &str) -> Doc {
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut doc = Doc::default();
    let mut heading: Option<String> = None;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let options = Options::ENABLE_TABLES | Options::ENABLE_FOOTNOTES;
    for (event, range) in Parser::new_ext(text, options).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => {
                if let Some(h) = heading.take() {
                    let base = slug(&h);
                    let n = seen.entry(base.clone()).or_insert(0);
                    let anchor = if *n == 0 {
                        base.clone()
                    } else {
                        format!("{base}-{n}")
                    };
                    *n += 1;
                    doc.anchors.insert(anchor);
                }
            }
            Event::Text(t) | Event::Code(t) if heading.is_some() => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::Code(code) if is_repo_path(&code) => {
                doc.code_paths
                    .push((code.to_string(), line_of(range.start)));
            }
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                doc.links.push((dest_url.to_string(), line_of(range.start)));
            }
            _ => {}
        }
    }
    doc
}

/// `%20`-style escapes decoded (link destinations may carry them).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` with `.` and `..` resolved lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Every broken link, anchor or named path of the Markdown `files` under `root`, one line each.
fn broken_links(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut docs: BTreeMap<PathBuf, Doc> = BTreeMap::new();
    let mut anchors_of = |path: &Path| -> Option<BTreeSet<String>> {
        let key = normalize(path);
        if !docs.contains_key(&key) {
            let text = std::fs::read_to_string(&key).ok()?;
            docs.insert(key.clone(), parse_doc(&text));
        }
        docs.get(&key).map(|d| d.anchors.clone())
    };
    let mut errors = Vec::new();
    for file in files {
        let text = read(file);
        let doc = parse_doc(&text);
        let shown = file
            .strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string();
        for (dest, line) in &doc.links {
            let has_scheme = dest.split_once(':').is_some_and(|(scheme, _)| {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
            });
            if has_scheme || dest.starts_with("//") {
                continue; // https:, mailto:, man: …: not files of the repository
            }
            let (path_part, fragment) = match dest.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (dest.as_str(), None),
            };
            let path_part = percent_decode(path_part);
            let target = if path_part.is_empty() {
                file.clone()
            } else if let Some(from_root) = path_part.strip_prefix('/') {
                root.join(from_root)
            } else {
                file.parent().unwrap_or(root).join(&path_part)
            };
            let target = normalize(&target);
            if !target.starts_with(normalize(root)) {
                errors.push(format!(
                    "{shown}:{line}: link {dest:?} leaves the repository"
                ));
                continue;
            }
            if !target.exists() {
                errors.push(format!(
                    "{shown}:{line}: link {dest:?}: {} does not exist",
                    target.strip_prefix(root).unwrap_or(&target).display()
                ));
                continue;
            }
            if let Some(fragment) = fragment
                && target.extension().is_some_and(|e| e == "md")
            {
                let fragment = percent_decode(fragment);
                let anchors = anchors_of(&target).unwrap_or_default();
                if !anchors.contains(&fragment) {
                    errors.push(format!(
                        "{shown}:{line}: link {dest:?}: no heading with anchor #{fragment} in {} (it has: {})",
                        target.strip_prefix(root).unwrap_or(&target).display(),
                        anchors.into_iter().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
        for (code, line) in &doc.code_paths {
            if !root.join(code).exists() {
                errors.push(format!(
                    "{shown}:{line}: `{code}` names a file of the repository that does not exist"
                ));
            }
        }
    }
    errors
}

/// Every `docs/NAME.md` or `docs/NAME.md#anchor` in `text`.
fn doc_references(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("docs/") {
        // Only a path starting at a word boundary: not `mydocs/`.
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        rest = &rest[i + 5..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-') {
            continue;
        }
        let word: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || "/._-#".contains(*c))
            .collect();
        let word = word.trim_end_matches(['.', '#']);
        let (path, anchor) = match word.split_once('#') {
            Some((p, a)) => (p, Some(a.to_string())),
            None => (word, None),
        };
        if path.ends_with(".md") {
            out.push((path.to_string(), anchor));
        }
    }
    out
}

// === the Markdown of the repository ===

#[test]
fn every_relative_link_and_anchor_in_the_markdown_resolves() {
    let files = files_under(repo(), &[".md"]);
    for must in ["README.md", "docs/configuration.md", "config/README.md"] {
        assert!(
            files.contains(&repo().join(must)),
            "{must} was not searched: {files:?}"
        );
    }
    let errors = broken_links(repo(), &files);
    assert!(
        errors.is_empty(),
        "{} broken reference(s) in the Markdown:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn the_link_check_finds_what_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(
        root.join("docs/a.md"),
        "# A page\n\n## Two words\n\n## `[clients.NAME]`\n\n## Two words\n",
    )
    .unwrap();
    std::fs::write(
        root.join("README.md"),
        "[ok](docs/a.md) [ok](docs/a.md#two-words) [ok](docs/a.md#two-words-1) \
         [ok](docs/a.md#clientsname) [ok](#top) [ok](https://example.com/x.md#nope) \
         [ok](/docs/a.md) ![ok](docs/a.md)\n\n\
         [gone](docs/config-reference.md) [gone anchor](docs/a.md#nope) \
         [gone here](#nowhere) [gone ref][r] `docs/missing.md` `docs/a.md` `docs/NAME.md`\n\n\
         # Top\n\n```\n[not a link](nowhere.md) `docs/in-code-block.md`\n```\n\n\
         [r]: docs/also-missing.md\n",
    )
    .unwrap();
    let errors = broken_links(root, &[root.join("README.md"), root.join("docs/a.md")]);
    let joined = errors.join("\n");
    for needle in [
        "docs/config-reference.md does not exist",
        "no heading with anchor #nope in docs/a.md",
        "no heading with anchor #nowhere in README.md",
        "docs/also-missing.md does not exist",
        "`docs/missing.md` names a file",
    ] {
        assert!(
            joined.contains(needle),
            "{needle:?} not reported:\n{joined}"
        );
    }
    assert_eq!(errors.len(), 5, "{joined}");
}

#[test]
fn slugs_are_githubs() {
    for (heading, anchor) in [
        ("Quick start", "quick-start"),
        ("`[daemon]`", "daemon"),
        (
            "`[defaults]` and per-client timing",
            "defaults-and-per-client-timing",
        ),
        ("`[[clients.NAME.outputs]]`", "clientsnameoutputs"),
        ("`get`, `status`, `refresh`", "get-status-refresh"),
        ("Scale: 10,000 clients", "scale-10000-clients"),
        (
            "The daemon (`tokenwarden run`)",
            "the-daemon-tokenwarden-run",
        ),
        ("max_connections", "max_connections"),
    ] {
        assert_eq!(slug(heading), anchor, "{heading}");
    }
}

#[test]
fn every_docs_page_the_source_names_exists() {
    let this_file = repo().join("tests/it/docs.rs");
    let mut files = Vec::new();
    for dir in [
        "src", "tests", "benches", "config", "systemd", "scripts", "proto", "fuzz", ".ci",
    ] {
        files.extend(files_under(
            &repo().join(dir),
            &[
                ".rs", ".toml", ".py", ".sh", ".proto", ".service", ".conf", "run",
            ],
        ));
    }
    files.retain(|f| *f != this_file);
    assert!(files.iter().any(|f| f.ends_with("src/config/raw.rs")));
    let mut errors = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for (path, anchor) in doc_references(&text) {
            let target = repo().join(&path);
            let shown = file.strip_prefix(repo()).unwrap_or(file).display();
            if !target.is_file() {
                errors.push(format!("{shown}: {path} does not exist"));
            } else if let Some(anchor) = anchor
                && !parse_doc(&read(&target)).anchors.contains(&anchor)
            {
                errors.push(format!("{shown}: {path} has no heading #{anchor}"));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // The scan itself: a reference is found with its anchor, a look-alike is not.
    assert_eq!(
        doc_references("see docs/operations.md#reload. and mydocs/x.md, docs/dir/"),
        [("docs/operations.md".to_string(), Some("reload".to_string()))]
    );
}

// === the config keys ===

/// Which section of `docs/configuration.md` documents each table of `src/config/raw.rs`: the
/// marker its `## ` heading contains.
const SECTIONS: [(&str, &str); 6] = [
    ("RawDaemon", "`[daemon]`"),
    ("RawFleet", "`[fleet]`"),
    ("RawTiming", "`[defaults]`"),
    ("RawClient", "`[clients.NAME]`"),
    ("RawAssertion", "`[clients.NAME.assertion]`"),
    ("RawOutput", "`[[clients.NAME.outputs]]`"),
];

/// The keys of every `Raw*` struct that serde reads: struct name → keys, in source order.
fn raw_tables(source: &str) -> BTreeMap<String, Vec<String>> {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        let name = line
            .strip_prefix("pub(crate) struct ")
            .or_else(|| line.strip_prefix("pub struct "))
            .or_else(|| line.strip_prefix("struct "))
            .and_then(|rest| rest.strip_suffix('{'))
            .map(str::trim)
            .filter(|n| n.starts_with("Raw"));
        let Some(name) = name else {
            i += 1;
            continue;
        };
        // The attributes and comments right above it.
        let derives_deserialize = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim())
            .take_while(|l| l.starts_with("#[") || l.starts_with("//"))
            .any(|l| l.starts_with("#[derive") && l.contains("Deserialize"));
        let mut keys = Vec::new();
        let mut rename: Option<String> = None;
        i += 1;
        while i < lines.len() && lines[i].trim() != "}" {
            let field = lines[i].trim();
            if let Some(attr) = field.strip_prefix("#[serde(")
                && let Some(value) = attr.split("rename = \"").nth(1)
            {
                rename = value.split('"').next().map(str::to_owned);
            }
            let declared = field
                .strip_prefix("pub(crate) ")
                .or_else(|| field.strip_prefix("pub "))
                .and_then(|f| f.split_once(':'))
                .map(|(n, _)| n.trim().to_string());
            if let Some(n) = declared {
                keys.push(rename.take().unwrap_or(n));
            }
            i += 1;
        }
        if derives_deserialize {
            out.insert(name.to_string(), keys);
        }
    }
    out
}

/// The `## ` section of `doc` whose heading contains `marker`: its text up to the next `## `.
fn section<'a>(doc: &'a str, marker: &str) -> &'a str {
    let starts: Vec<usize> = doc
        .match_indices("\n## ")
        .map(|(i, _)| i + 1)
        .chain(std::iter::once(doc.len()))
        .collect();
    let mut found = Vec::new();
    for pair in starts.windows(2) {
        let text = &doc[pair[0]..pair[1]];
        if text.lines().next().is_some_and(|h| h.contains(marker)) {
            found.push(text);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "docs/configuration.md needs exactly one `## ` heading containing {marker}"
    );
    found[0]
}

/// The keys a section's tables document: rows whose first cell is one `code` span.
fn documented_keys(section: &str) -> Vec<String> {
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once("` |"))
        .map(|(key, _)| key.to_string())
        .filter(|k| !k.contains('`'))
        .collect()
}

#[test]
fn every_config_key_is_documented_and_nothing_else() {
    let raw = read(&repo().join("src/config/raw.rs"));
    let tables = raw_tables(&raw);
    let doc = read(&repo().join("docs/configuration.md"));
    let known: BTreeSet<&str> = SECTIONS.iter().map(|(s, _)| *s).collect();
    for name in tables.keys() {
        assert!(
            known.contains(name.as_str()),
            "src/config/raw.rs has a new table, {name}: give it a `## ` section with a key table \
             in docs/configuration.md, and add it to SECTIONS in tests/it/docs.rs"
        );
    }
    let timing: BTreeSet<String> = tables["RawTiming"].iter().cloned().collect();
    assert!(
        timing.contains("refresh_at") && timing.contains("timeout"),
        "{timing:?}"
    );

    let mut errors = Vec::new();
    for (table, marker) in SECTIONS {
        let Some(keys) = tables.get(table) else {
            errors.push(format!(
                "src/config/raw.rs no longer has {table}: update SECTIONS"
            ));
            continue;
        };
        assert!(!keys.is_empty(), "no keys read from {table}");
        let documented = documented_keys(section(&doc, marker));
        // A client's own timing keys are documented once, under [defaults].
        let expected: Vec<&String> = keys
            .iter()
            .filter(|k| table != "RawClient" || !timing.contains(*k))
            .collect();
        for key in &expected {
            if !documented.contains(key) {
                errors.push(format!(
                    "{marker}: key `{key}` ({table} in src/config/raw.rs) has no row in docs/configuration.md"
                ));
            }
        }
        for key in &documented {
            if !expected.contains(&key) {
                errors.push(format!(
                    "{marker}: docs/configuration.md documents `{key}`, which {table} does not accept"
                ));
            }
        }
    }

    // The secret forms, and the top-level tables.
    let secrets = section(&doc, "Secrets");
    let secret_keys = raw
        .lines()
        .find(|l| l.starts_with("const SECRET_KEYS"))
        .expect("SECRET_KEYS in src/config/raw.rs");
    let forms: Vec<&str> = secret_keys.split('"').skip(1).step_by(2).collect();
    assert_eq!(forms, ["file", "env", "credential"]);
    for form in forms {
        if !secrets.contains(&format!("`{{ {form} = ")) {
            errors.push(format!(
                "Secrets: the form {{ {form} = … }} is not described"
            ));
        }
    }
    let load = read(&repo().join("src/config/load.rs"));
    let top = load
        .lines()
        .find(|l| l.starts_with("const TOP_KEYS"))
        .expect("TOP_KEYS in src/config/load.rs");
    for key in top.split('"').skip(1).step_by(2) {
        if !doc
            .lines()
            .any(|l| l.starts_with("## ") && l.contains(&format!("`[{key}")))
        {
            errors.push(format!("the table [{key}] has no `## ` section"));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Every key a TOML example uses that its table does not accept, as `where: key`.
fn unknown_example_keys(
    example: &toml::Table,
    tables: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    let accepts = |table: &str, key: &str| tables[table].iter().any(|k| k == key);
    let mut out = Vec::new();
    let check =
        |out: &mut Vec<String>, what: &str, table: &str, t: &toml::Table, extra: &[&str]| {
            for key in t.keys() {
                if !accepts(table, key) && !extra.contains(&key.as_str()) {
                    out.push(format!("{what}: {key}"));
                }
            }
        };
    for (top, value) in example {
        match (top.as_str(), value) {
            ("daemon", toml::Value::Table(t)) => check(&mut out, "[daemon]", "RawDaemon", t, &[]),
            ("fleet", toml::Value::Table(t)) => check(&mut out, "[fleet]", "RawFleet", t, &[]),
            ("defaults", toml::Value::Table(t)) => {
                check(&mut out, "[defaults]", "RawTiming", t, &[])
            }
            ("clients", toml::Value::Table(clients)) => {
                for (name, client) in clients {
                    let Some(client) = client.as_table() else {
                        out.push(format!("[clients.{name}] is not a table"));
                        continue;
                    };
                    let what = format!("[clients.{name}]");
                    check(
                        &mut out,
                        &what,
                        "RawClient",
                        client,
                        &["assertion", "outputs"],
                    );
                    if let Some(a) = client.get("assertion").and_then(toml::Value::as_table) {
                        check(
                            &mut out,
                            &format!("{what}.assertion"),
                            "RawAssertion",
                            a,
                            &[],
                        );
                    }
                    for o in client
                        .get("outputs")
                        .and_then(toml::Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(toml::Value::as_table)
                    {
                        check(&mut out, &format!("{what}.outputs"), "RawOutput", o, &[]);
                    }
                }
            }
            _ => out.push(format!("unknown table [{top}]")),
        }
    }
    out
}

#[test]
fn the_toml_examples_of_the_docs_use_only_real_keys() {
    let tables = raw_tables(&read(&repo().join("src/config/raw.rs")));
    let mut errors = Vec::new();
    let mut examples = 0;
    for file in files_under(&repo().join("docs"), &[".md"])
        .into_iter()
        .chain([repo().join("README.md")])
    {
        let text = read(&file);
        for block in text.split("```toml\n").skip(1) {
            let block = block.split("```").next().unwrap_or_default();
            examples += 1;
            let shown = file
                .strip_prefix(repo())
                .unwrap_or(&file)
                .display()
                .to_string();
            match block.parse::<toml::Table>() {
                Ok(t) => errors.extend(
                    unknown_example_keys(&t, &tables)
                        .into_iter()
                        .map(|e| format!("{shown}: {e}")),
                ),
                Err(e) => errors.push(format!("{shown}: an example is not TOML: {e}")),
            }
        }
    }
    assert!(examples >= 10, "only {examples} TOML examples found");
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // The walk itself: a misspelt key at each level is caught.
    let bad: toml::Table = "[daemon]\nsockett = 'x'\n[clients.a]\ntoken_ur = 'x'\n\
        [clients.a.assertion]\nkeyy = 'x'\n[[clients.a.outputs]]\npathh = 'x'\n"
        .parse()
        .unwrap();
    assert_eq!(unknown_example_keys(&bad, &tables).len(), 4);
}

#[test]
fn raw_tables_reads_fields_renames_and_only_serde_structs() {
    let tables = raw_tables(
        "/// doc\n#[derive(Debug, Deserialize)]\n#[serde(deny_unknown_fields)]\n\
         pub(crate) struct RawX {\n    pub a: Option<u8>,\n    #[serde(rename = \"b-b\")]\n\
         pub b: u8,\n    // comment: not a field\n}\n\n#[derive(Debug)]\nstruct RawNot {\n    pub c: u8,\n}\n",
    );
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!(tables["RawX"], ["a", "b-b"]);
}

// === the manual page and the README ===

#[test]
fn the_config_manual_page_names_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("generate-assets")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page_path = dir.path().join("tokenwarden.toml.5");
    let page = read(&page_path);
    assert!(page.contains(".TH tokenwarden.toml 5 "), "{page}");
    for section in ["NAME", "DESCRIPTION", "[daemon]", "\"SEE ALSO\""] {
        assert!(page.contains(&format!("\n.SH {section}\n")), "{section}");
    }
    let tables = raw_tables(&read(&repo().join("src/config/raw.rs")));
    for key in tables.values().flatten() {
        // roff writes `-` as `\-`.
        let escaped = key.replace('-', "\\-");
        assert!(
            page.contains(&format!("\\fB{escaped}\\fR")),
            "`{key}` missing from tokenwarden.toml.5"
        );
    }
    let main = read(&dir.path().join("tokenwarden.8"));
    assert!(
        main.contains("tokenwarden.toml"),
        "tokenwarden(8) does not refer to it"
    );

    match Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&page_path)
        .env("MANWIDTH", "80")
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("max_concurrent_refreshes"), "{text}");
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(warnings.trim().is_empty(), "man warns: {warnings}");
        }
        _ => eprintln!("SKIPPED: rendering tokenwarden.toml.5 with man(1): man is not installed"),
    }
}

#[test]
fn the_readme_keeps_the_setup_commands_and_its_first_config_passes_check() {
    let readme = read(&repo().join("README.md"));
    for command in ["cargo run --release -- demo", "bash scripts/test.sh"] {
        assert!(
            readme.lines().any(|l| l.starts_with(command)),
            "README.md lost the line starting `{command}`"
        );
    }
    let ci = read(&repo().join(".ci/run"));
    assert!(ci.lines().any(|l| l.trim() == "bash scripts/test.sh"));

    let first_config = section(&readme, "A first config");
    let toml = first_config
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```toml block under ## A first config");
    assert!(toml.lines().count() <= 16, "the first config grew: {toml}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenwarden.toml");
    std::fs::write(&config, toml).unwrap();
    std::fs::write(dir.path().join("api.secret"), "not-a-real-secret\n").unwrap();
    let out = Command::new(bin())
        .arg("check")
        .arg("-c")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the README's first config fails check:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// === internal citations ===

/// Files still allowed to cite the internal specification (paths are prefixes relative to the
/// repository root): none.
const SPEC_CITATIONS_NOT_YET_CHECKED: &[&str] = &[];

/// The lines (1-based) of `text` that cite the internal specification instead of the README,
/// a docs/ page or an RFC. The needles are built here so this file does not match itself.
fn spec_citations(text: &str) -> Vec<usize> {
    let needles = [concat!("SPEC", " §"), concat!("SPEC", ".md")];
    text.lines()
        .enumerate()
        .filter(|(_, line)| needles.iter().any(|n| line.contains(n)))
        .map(|(i, _)| i + 1)
        .collect()
}

/// Every file git tracks, relative to the repository root; `None` without git or a checkout.
fn tracked_files() -> Option<Vec<PathBuf>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(["ls-files", "-z"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let list = String::from_utf8(out.stdout).ok()?;
    Some(
        list.split('\0')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect(),
    )
}

#[test]
fn no_tracked_file_cites_the_internal_spec() {
    let files = match tracked_files() {
        Some(files) => files,
        None => {
            eprintln!("git ls-files failed (no git, or not a checkout): checking every file");
            files_under(repo(), &[""])
                .into_iter()
                .filter_map(|f| f.strip_prefix(repo()).ok().map(Path::to_path_buf))
                .collect()
        }
    };
    assert!(files.iter().any(|f| f.ends_with("src/schedule.rs")));
    let mut errors = Vec::new();
    for file in &files {
        let shown = file.to_string_lossy();
        if SPEC_CITATIONS_NOT_YET_CHECKED
            .iter()
            .any(|p| shown.starts_with(p))
        {
            continue;
        }
        // Binary files (and files deleted but not yet staged) are not text to check.
        let Ok(text) = std::fs::read_to_string(repo().join(file)) else {
            continue;
        };
        for line in spec_citations(&text) {
            errors.push(format!(
                "{shown}:{line}: cites the internal spec; link the docs/ page or RFC section instead"
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // The scan itself: a citation is found by line, a look-alike is not.
    let sample = concat!(
        "ok\n(SPEC",
        " §4)\nSTATE_UNSPECIFIED SPECS\nsee SPEC",
        ".md\n"
    );
    assert_eq!(spec_citations(sample), [2, 4]);
}
