//! `tokenwarden init`: an annotated starting config for one client of a chosen style, with
//! `[daemon]` defaults, placeholders marked `# CHANGE`, and comments saying what each key does
//! and where the secrets go. Printed, or written to a new file created 0600.

use std::io::Write as _;
use std::path::Path;

use crate::config::DEFAULT_CONFIG_PATH;

/// The kinds of client `init` writes a config for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// The client authenticates as itself with a secret (RFC 6749 §4.4).
    ClientCredentials,
    /// The client acts for a user with a password, then refresh tokens (RFC 6749 §4.3, §6).
    Password,
    /// The token request carries a signed JWT assertion (RFC 7523 §2.1).
    JwtBearer,
    /// Client credentials, authenticated by a JWT signed with a private key (RFC 7523 §2.2).
    PrivateKeyJwt,
}

impl Style {
    /// Every style.
    pub const ALL: [Style; 4] = [
        Style::ClientCredentials,
        Style::Password,
        Style::JwtBearer,
        Style::PrivateKeyJwt,
    ];

    fn client_template(self) -> &'static str {
        match self {
            Style::ClientCredentials => include_str!("init/client-credentials.toml"),
            Style::Password => include_str!("init/password.toml"),
            Style::JwtBearer => include_str!("init/jwt-bearer.toml"),
            Style::PrivateKeyJwt => include_str!("init/private-key-jwt.toml"),
        }
    }
}

const DAEMON: &str = include_str!("init/daemon.toml");
const OUTPUT: &str = include_str!("init/output.toml");

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The client name is not one the config accepts.
    #[error("not a client name: {0:?} (names are 1 to 64 of A-Z a-z 0-9 _ . -)")]
    BadName(String),
    /// `--output` names a file that exists.
    #[error("refusing to overwrite {0}: it exists (remove it, or pick another --output)")]
    Exists(String),
    /// `--output` could not be created or written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The config text for one client `name` of `style`; `config_path` is where it will live (the
/// commands in its header name it).
pub fn render(style: Style, name: &str, config_path: &str) -> Result<String, InitError> {
    if !crate::config::is_client_name(name) {
        return Err(InitError::BadName(name.to_string()));
    }
    let mut text = String::from(DAEMON);
    text.push_str(style.client_template());
    // A table key: bare when it can be, quoted when the name holds a dot.
    let key = if name.contains('.') {
        format!("\"{name}\"")
    } else {
        name.to_string()
    };
    Ok(text
        .replace("@OUTPUT@\n", OUTPUT)
        .replace("@KEY@", &key)
        .replace("@NAME@", name)
        .replace("@CONFIG@", config_path))
}

/// Writes `text` to a new file at `path`, created 0600; an existing file (or symlink) is
/// never replaced.
pub fn write_new(path: &Path, text: &str) -> Result<(), InitError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let shown = path.display().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => InitError::Exists(shown.clone()),
            _ => InitError::Write {
                path: shown.clone(),
                source: e,
            },
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| InitError::Write {
            path: shown,
            source: e,
        })
}

/// Where the header of a printed config says it goes.
pub fn default_path() -> &'static str {
    DEFAULT_CONFIG_PATH
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_style_parses_as_toml_and_names_its_client() {
        for style in Style::ALL {
            let text = render(style, "api.v2", "/etc/tw.toml").unwrap();
            let table: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
            let client = &table["clients"]["api.v2"];
            assert!(client.get("token_url").is_some(), "{style:?}");
            assert_eq!(
                client["outputs"][0]["path"].as_str(),
                Some("/run/tokenwarden/api.v2.token")
            );
            assert!(
                !text.contains("@NAME@") && !text.contains("@OUTPUT@"),
                "{text}"
            );
            assert!(text.contains("tokenwarden check -c /etc/tw.toml"));
            assert!(text.contains("# CHANGE"), "{style:?}");
        }
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a b", "a/b", "x\"y", &"x".repeat(65)] {
            assert!(render(Style::Password, bad, "/x").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_existing_file_is_never_replaced() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tw.toml");
        write_new(&p, "x = 1\n").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        let e = write_new(&p, "y = 2\n").unwrap_err();
        assert!(matches!(e, InitError::Exists(_)), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x = 1\n");
        // Nor through a symlink, dangling or not.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
        assert!(write_new(&link, "z = 3\n").is_err());
        assert!(!dir.path().join("elsewhere").exists());
    }
}
