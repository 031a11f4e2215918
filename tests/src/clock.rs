//! A process with a shifted wall clock: libfaketime (Debian's `faketime` package) preloaded
//! into it, as a VM resumed after a suspend or a broken NTP daemon would leave it. Monotonic
//! time is left alone, as on a real machine whose wall clock steps. Tests that need it fail,
//! never skip, when the library is missing.

use std::path::Path;

/// Where Debian puts the multi-threaded libfaketime.
const LIBRARIES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
];

/// Environment that shifts a process's wall clock by `offset` (libfaketime's syntax:
/// `+2h`, `-30m`).
pub fn shifted_clock(offset: &str) -> Vec<(String, String)> {
    let library = LIBRARIES
        .iter()
        .find(|path| Path::new(path).exists())
        .unwrap_or_else(|| {
            panic!(
                "libfaketime is missing (looked in {LIBRARIES:?}): install Debian's faketime \
                 package (apt-get install faketime); .ci/run installs it"
            )
        });
    [
        ("LD_PRELOAD", *library),
        ("FAKETIME", offset),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}
