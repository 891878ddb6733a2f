//! The JWT `exp` fallback: any access token string.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tokenwarden::fuzzing::jwt_exp(data);
});
