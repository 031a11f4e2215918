//! The pusher-svc binary's command line: help, and exit 64 on bad configuration.

use std::process::Command;

fn pusher_svc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pusher-svc"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    let output = pusher_svc(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for (flag, env) in [
        ("--listen-addr", "PUSHER_LISTEN_ADDR"),
        ("--max-concurrency", "PUSHER_MAX_CONCURRENCY"),
        ("--result-cache-size", "PUSHER_RESULT_CACHE_SIZE"),
        ("--result-cache-ttl", "PUSHER_RESULT_CACHE_TTL"),
        ("--log-format", "PUSHER_LOG_FORMAT"),
    ] {
        assert!(
            help.contains(flag) && help.contains(env),
            "--help lacks {flag} / {env}:\n{help}"
        );
    }
}

#[test]
fn bad_configuration_exits_64_with_a_one_line_reason() {
    for (args, needle) in [
        (&["--listen-addr", "not-an-address"][..], "--listen-addr"),
        (&["--max-concurrency", "0"][..], "--max-concurrency"),
        (&["--result-cache-ttl", "0s"][..], "--result-cache-ttl"),
        (&["--webhook", "not a url"][..], "--webhook"),
        (
            &["--webhook-file", "/nonexistent/hooks.txt"][..],
            "--webhook-file",
        ),
        (&["--llm-url", "ftp://llm"][..], "--llm-url"),
        (&["--tls-key", "/tmp/key.pem"][..], "--tls-cert"),
    ] {
        let output = pusher_svc(args);
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8(output.stderr).unwrap().contains(needle),
            "{args:?}"
        );
    }
}
