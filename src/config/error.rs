//! Config errors with their location, and the helpers that make them readable: byte offset →
//! line and column, and "did you mean" suggestions.

use std::fmt;
use std::path::PathBuf;

/// One problem in the config, located in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line; 0 when the problem concerns the whole file (it cannot be read).
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong, and where it helps, what to write instead. Never contains a secret.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `FILE:LINE:COL: message` (or `FILE: message` for a file that cannot be read).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a config, in file order (the main file, then the included ones in
/// the order they were read; by position within a file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    /// Never empty when returned by the loader.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    /// One line per error.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A file's text with the offsets of its line starts, to turn byte offsets into positions.
#[derive(Debug)]
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// 1-based line and column (in characters) of byte `offset` of `text`.
    pub fn position(&self, text: &str, offset: usize) -> (usize, usize) {
        let offset = offset.min(text.len());
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let column = text
            .get(start..offset)
            .map(|s| s.chars().count())
            .unwrap_or(offset - start);
        (line, column + 1)
    }
}

/// The candidate closest to `word`, if it is close enough to be what was meant.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(&str, f64)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(word, c);
        let close = strsim::damerau_levenshtein(word, c) <= 2.min(c.len().saturating_sub(1))
            || score >= 0.88;
        if close && best.is_none_or(|(_, s)| score > s) {
            best = Some((c, score));
        }
    }
    best.map(|(c, _)| c)
}

/// `; did you mean "X"?` or, with no close candidate, the list of valid ones.
pub(crate) fn suggestion(word: &str, candidates: &[&str]) -> String {
    match did_you_mean(word, candidates.iter().copied()) {
        Some(c) => format!("; did you mean \"{c}\"?"),
        None => format!("; expected one of: {}", candidates.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_columns() {
        let text = "a = 1\n\nclé = \"é\"\nlast";
        let idx = LineIndex::new(text);
        let cases = [
            (0, (1, 1)),
            (4, (1, 5)),
            (5, (1, 6)),
            (6, (2, 1)),
            (7, (3, 1)),
            // "clé = " is 7 bytes but 6 characters.
            (14, (3, 7)),
            (text.len(), (4, 5)),
            (text.len() + 10, (4, 5)),
        ];
        for (offset, want) in cases {
            assert_eq!(idx.position(text, offset), want, "offset {offset}");
        }
    }

    #[test]
    fn suggestions() {
        let keys = [
            "token_url",
            "grant_type",
            "client_id",
            "client_secret",
            "scope",
        ];
        let cases = [
            ("tokn_url", Some("token_url")),
            ("token-url", Some("token_url")),
            ("client_secrte", Some("client_secret")),
            ("scopes", Some("scope")),
            ("grant", Some("grant_type")),
            ("banana", None),
            ("x", None),
        ];
        for (word, want) in cases {
            assert_eq!(did_you_mean(word, keys), want, "{word}");
        }
        let grants = [
            "client_credentials",
            "password",
            "refresh_token",
            "jwt_bearer",
        ];
        assert_eq!(
            did_you_mean("client_credential", grants),
            Some("client_credentials")
        );
        assert_eq!(did_you_mean("pasword", grants), Some("password"));
        assert_eq!(suggestion("zzz", &["a", "b"]), "; expected one of: a, b");
    }

    #[test]
    fn display_is_file_line_col() {
        let e = ConfigError {
            file: "/etc/tw.toml".into(),
            line: 3,
            column: 7,
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "/etc/tw.toml:3:7: bad");
        let all = ConfigErrors {
            errors: vec![e.clone(), ConfigError { line: 0, ..e }],
        };
        assert_eq!(all.to_string(), "/etc/tw.toml:3:7: bad\n/etc/tw.toml: bad");
    }
}
