//! Config parsing and validation: any text must give a Config or located errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        tokenwarden::fuzzing::config(text);
    }
});
