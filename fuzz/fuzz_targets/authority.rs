//! The gRPC `:authority` adaptor: any bytes after the HTTP/2 preface.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tokenwarden::fuzzing::authority(data);
});
