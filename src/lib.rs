//! tokenwarden keeps OAuth 2.0 access tokens fresh on Linux hosts.
#![forbid(unsafe_code)]
