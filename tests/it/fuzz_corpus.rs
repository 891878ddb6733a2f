//! Replays every file of the fuzz corpora (`fuzz/corpus/<target>/`) through the same entry
//! points the fuzz targets use, plus `fuzz/regressions/<target>/` (inputs that once crashed),
//! so a crash once found stays fixed.

use std::path::Path;

fn replay(target: &str, f: impl Fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data)));
        assert!(result.is_ok(), "{} panics", path.display());
        n += 1;
    }
    n
}

#[test]
fn config_corpus() {
    let n = replay("config", |d| {
        if let Ok(t) = std::str::from_utf8(d) {
            tokenwarden::fuzzing::config(t)
        }
    });
    assert!(n >= 40, "{n}");
}

#[test]
fn token_response_corpus() {
    assert!(replay("token_response", tokenwarden::fuzzing::token_response) >= 8);
}

#[test]
fn jwt_exp_corpus() {
    assert!(replay("jwt_exp", tokenwarden::fuzzing::jwt_exp) >= 6);
}

#[test]
fn authority_corpus() {
    assert!(replay("authority", tokenwarden::fuzzing::authority) >= 9);
}

#[test]
fn connection_corpus() {
    assert!(replay("connection", tokenwarden::fuzzing::connection) >= 8);
}
