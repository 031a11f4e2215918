//! listen on PostgreSQL over TLS: the real binaries and real PostgreSQL servers started by the
//! test, one with TLS (certificates generated for it) and one without.

use std::process::Stdio;
use std::time::Duration;
use tests::listen::ConversationStatus;
use tests::postgres::{ServerTls, TestPostgres, shared, shared_tls};
use tests::*;

/// Starts pusher and a listen on `store`, has one conversation processed, and returns what
/// the server says of listen's connections to `database`: how many, and how many use TLS.
async fn process_one_conversation(
    server: &TestPostgres,
    database: &str,
    store: &str,
) -> (i64, i64) {
    let pusher = start_pusher(PusherOptions::port(free_port())).await;
    let listen = start_listen(ListenOptions {
        pusher_port: pusher.addr.port(),
        extra: &["--store", store],
    })
    .await;
    let client = listen_client(&listen);
    let id = client
        .clone()
        .submit_conversation(talk("pg-tls", "k"))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_one(
        &client,
        &id,
        ConversationStatus::Completed,
        Duration::from_secs(20),
    )
    .await;
    // The harness's own connection is plaintext, as the postgres role, and not listen's.
    let (db, connection) = tokio_postgres::connect(&server.url(database), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'listen-svc' AND a.datname = $1",
            &[&database],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn listen_stores_and_processes_over_verify_full_tls() {
    let server = shared_tls();
    let database = server.new_database().await;
    let store = format!(
        "postgres://postgres:s3cret@{host}:{port}/{database}?hostaddr=127.0.0.1\
         &sslmode=verify-full&sslrootcert={ca}",
        host = ServerTls::HOST_NAME,
        port = server.port,
        ca = server.tls().ca().display(),
    );
    let (connections, encrypted) = process_one_conversation(server, &database, &store).await;
    assert!(connections > 0);
    assert_eq!(encrypted, connections, "every listen connection uses TLS");
}

/// verify-ca checks the CA but not the name (the URL says 127.0.0.1; the certificate,
/// db.test), and the role that pg_hba.conf admits only with a client certificate gets in
/// with sslcert/sslkey.
#[tokio::test]
async fn listen_stores_and_processes_over_verify_ca_with_a_client_certificate() {
    let server = shared_tls();
    let tls = server.tls();
    let database = server.new_database().await;
    let (cert, key) = tls.client_cert();
    let store = format!(
        "postgres://{user}@127.0.0.1:{port}/{database}?sslmode=verify-ca&sslrootcert={ca}\
         &sslcert={cert}&sslkey={key}",
        user = ServerTls::CERT_USER,
        port = server.port,
        ca = tls.ca().display(),
        cert = cert.display(),
        key = key.display(),
    );
    let (connections, encrypted) = process_one_conversation(server, &database, &store).await;
    assert!(connections > 0);
    assert_eq!(encrypted, connections);
}

/// Runs listen on `store` until it exits (within 30 s); its exit status and output.
async fn listen_exit(store: &str) -> (std::process::ExitStatus, String) {
    let child = tokio::process::Command::new(binary("listen-svc"))
        .args(["--listen-addr", "127.0.0.1:0", "--admin-addr", "off"])
        .args(["--store", store])
        .env_remove("LISTEN_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("listen on {store} did not exit within 30s"))
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

/// listen does not start on a connection weaker than the URL asks for, and says why: a server
/// without TLS under sslmode=require, a certificate from another CA, a certificate for
/// another name under verify-full.
#[tokio::test]
async fn listen_refuses_to_start_on_a_connection_weaker_than_asked() {
    let plain = shared();
    let server = shared_tls();
    let tls = server.tls();
    let (plain_db, tls_db) = (plain.new_database().await, server.new_database().await);
    let cases = [
        (
            format!(
                "postgres://postgres:s3cret@127.0.0.1:{}/{plain_db}?sslmode=require",
                plain.port
            ),
            vec![
                format!(
                    "the PostgreSQL server at 127.0.0.1:{} does not accept TLS, and \
                     sslmode=require needs it",
                    plain.port
                ),
                "--store".to_string(),
            ],
        ),
        (
            format!(
                "postgres://postgres:s3cret@{}:{}/{tls_db}?hostaddr=127.0.0.1\
                 &sslmode=verify-full&sslrootcert={}",
                ServerTls::HOST_NAME,
                server.port,
                tls.other_ca().display()
            ),
            vec![
                "certificate verify failed".to_string(),
                "not trusted".to_string(),
                tls.other_ca().display().to_string(),
            ],
        ),
        (
            format!(
                "postgres://postgres:s3cret@127.0.0.1:{}/{tls_db}?sslmode=verify-full\
                 &sslrootcert={}",
                server.port,
                tls.ca().display()
            ),
            vec![
                "not valid for the host name 127.0.0.1".to_string(),
                ServerTls::HOST_NAME.to_string(),
            ],
        ),
    ];
    for (store, needles) in cases {
        let (status, output) = listen_exit(&store).await;
        assert!(!status.success(), "{store}: {status}\n{output}");
        for needle in needles {
            assert!(
                output.contains(&needle),
                "{store}: lacks {needle:?}:\n{output}"
            );
        }
        assert!(
            !output.contains("s3cret"),
            "{store}: the password is shown:\n{output}"
        );
    }
}

/// TLS parameters that cannot work are refused before anything connects: status 64 and a
/// reason naming the parameter.
#[tokio::test]
async fn bad_tls_parameters_exit_64_naming_the_parameter() {
    let cases = [
        (
            "postgres://u:s3cret@db/x?sslmode=verify",
            "--store: sslmode=\"verify\" is not one of disable, prefer, require, verify-ca, verify-full",
        ),
        (
            "postgres://u:s3cret@db/x?sslmode=verify-full",
            "sslmode=verify-full needs sslrootcert",
        ),
        (
            "postgres://u:s3cret@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "--store: sslrootcert /nonexistent/ca.pem: no such file",
        ),
        (
            "postgres://u:s3cret@db/x?sslmode=require&sslcert=/nonexistent/c.pem",
            "sslcert and sslkey go together",
        ),
        (
            "postgres://u:s3cret@db/x?sslcrl=/etc/crl.pem",
            "sslcrl is not supported",
        ),
    ];
    for (store, needle) in cases {
        let (status, output) = listen_exit(store).await;
        assert_eq!(status.code(), Some(64), "{store}: {output}");
        assert!(
            output.contains(needle),
            "{store}: lacks {needle:?}:\n{output}"
        );
        assert!(!output.contains("s3cret"), "{store}: {output}");
    }
}
