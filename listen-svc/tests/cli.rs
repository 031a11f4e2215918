//! The listen-svc binary's command line: help, and exit 64 on bad configuration.

use std::process::Command;

fn listen_svc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_listen-svc"))
        .args(args)
        .env_remove("LISTEN_STORE")
        .output()
        .unwrap()
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    let output = listen_svc(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for (flag, env) in [
        ("--listen-addr", "LISTEN_LISTEN_ADDR"),
        ("--pusher-url", "LISTEN_PUSHER_URL"),
        ("--store", "LISTEN_STORE"),
        ("--max-in-flight", "LISTEN_MAX_IN_FLIGHT"),
        ("--ack-timeout", "LISTEN_ACK_TIMEOUT"),
        ("--max-attempts", "LISTEN_MAX_ATTEMPTS"),
        ("--log-format", "LISTEN_LOG_FORMAT"),
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
        (&["--store", "mysql://db"][..], "--store"),
        (&["--pusher-url", "nonsense"][..], "--pusher-url"),
        (&["--ack-timeout", "soon"][..], "--ack-timeout"),
        (&["--max-in-flight", "0"][..], "--max-in-flight"),
    ] {
        let output = listen_svc(args);
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn environment_variables_configure_it_too() {
    let output = Command::new(env!("CARGO_BIN_EXE_listen-svc"))
        .env("LISTEN_MAX_ATTEMPTS", "zero")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--max-attempts"));
}
