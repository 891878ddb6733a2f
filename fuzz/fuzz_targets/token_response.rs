//! Token endpoint answers: any status, content type and body must parse or give an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tokenwarden::fuzzing::token_response(data);
});
