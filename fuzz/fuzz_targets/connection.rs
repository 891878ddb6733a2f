//! A whole gRPC connection: any bytes after the HTTP/2 preface, served with the real services.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tokenwarden::fuzzing::connection(data);
});
