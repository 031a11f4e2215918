//! Helpers for the binaries' command lines.

use std::time::Duration;

/// Exit status for invalid configuration (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Parses a human duration such as `500ms`, `30s` or `2m`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}

/// Parses a duration that must be greater than zero.
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = parse_duration(value)?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_string());
    }
    Ok(duration)
}

/// Prints `error: {reason}` and exits with [`EXIT_CONFIG`]. For errors found after parsing.
pub fn exit_config_error(reason: impl std::fmt::Display) -> ! {
    eprintln!("error: {reason}");
    std::process::exit(EXIT_CONFIG)
}

/// Parses the command line; on a bad flag prints clap's message and exits with
/// [`EXIT_CONFIG`] (clap itself would use 2). `--help` and `--version` exit 0.
pub fn parse<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(config) => config,
        Err(error) => {
            let code = if error.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = error.print();
            std::process::exit(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("12").is_err(), "a bare number has no unit");
        assert!(parse_positive_duration("0s").is_err());
    }
}
