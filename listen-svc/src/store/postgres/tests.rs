//! TLS towards PostgreSQL on real servers: every `sslmode` against the test process's TLS
//! server and its plaintext one, what the server sees (`pg_stat_ssl`), and the words of each
//! failure.

use super::PostgresStore;
use ::tests::postgres::{ServerTls, TestPostgres, shared, shared_tls};
use std::path::Path;

/// How a test reaches a server: the host in the URL, and the role.
#[derive(Clone, Copy)]
enum Via {
    /// `127.0.0.1`, a name the TLS server's certificate does not hold.
    Address,
    /// `db.test` (with `hostaddr=127.0.0.1`), the name in its certificate.
    Name,
    /// `db.test` as the role that must present a client certificate.
    CertUser,
    /// `db.test` as the role that must give its password over TLS (SCRAM), with
    /// `channel_binding=require`: SCRAM-SHA-256-PLUS, bound to the server's certificate.
    PasswordUser,
}

/// The URL of a fresh database on `server`, with the TLS parameters `params`.
async fn url(server: &TestPostgres, via: Via, params: &[(&str, &Path)], mode: &str) -> String {
    let database = server.new_database().await;
    let password_user = format!("{}:{}", ServerTls::PASSWORD_USER, ServerTls::PASSWORD);
    let (user, host, hostaddr) = match via {
        Via::Address => ("postgres", "127.0.0.1", ""),
        Via::Name => ("postgres", ServerTls::HOST_NAME, "&hostaddr=127.0.0.1"),
        Via::CertUser => (
            ServerTls::CERT_USER,
            ServerTls::HOST_NAME,
            "&hostaddr=127.0.0.1",
        ),
        Via::PasswordUser => (
            password_user.as_str(),
            ServerTls::HOST_NAME,
            "&hostaddr=127.0.0.1&channel_binding=require",
        ),
    };
    let params: String = params
        .iter()
        .map(|(key, path)| format!("&{key}={}", path.display()))
        .collect();
    format!(
        "postgres://{user}@{host}:{}/{database}?sslmode={mode}{hostaddr}{params}",
        server.port
    )
}

/// Whether the store's connection is encrypted, as the server sees it.
async fn uses_tls(store: &PostgresStore) -> bool {
    let client = store.client().await.unwrap();
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn each_sslmode_connects_to_a_tls_server_as_libpq_would() {
    let server = shared_tls();
    let tls = server.tls();
    let (ca, other_ca) = (tls.ca(), tls.other_ca());
    let (cert, key) = tls.client_cert();
    type Case<'a> = (&'a str, Via, Vec<(&'a str, &'a Path)>, bool);
    let cases: Vec<Case> = vec![
        ("disable", Via::Address, vec![], false),
        ("prefer", Via::Address, vec![], true),
        ("require", Via::Address, vec![], true),
        // require with a root certificate checks the chain (as verify-ca), not the name.
        ("require", Via::Address, vec![("sslrootcert", &ca)], true),
        ("verify-ca", Via::Address, vec![("sslrootcert", &ca)], true),
        ("verify-full", Via::Name, vec![("sslrootcert", &ca)], true),
        // libpq: under prefer a failed handshake (here: an untrusted certificate) is retried
        // without TLS.
        (
            "prefer",
            Via::Address,
            vec![("sslrootcert", &other_ca)],
            false,
        ),
        (
            "verify-full",
            Via::CertUser,
            vec![("sslrootcert", &ca), ("sslcert", &cert), ("sslkey", &key)],
            true,
        ),
        (
            "verify-full",
            Via::PasswordUser,
            vec![("sslrootcert", &ca)],
            true,
        ),
        ("require", Via::PasswordUser, vec![], true),
    ];
    for (mode, via, params, encrypted) in cases {
        let url = url(server, via, &params, mode).await;
        let store = match PostgresStore::open(&url).await {
            Ok(store) => store,
            Err(error) => panic!("{url}: {error}"),
        };
        assert_eq!(uses_tls(&store).await, encrypted, "{url}");
    }
}

#[tokio::test]
async fn a_failed_check_of_the_server_or_client_says_what_failed() {
    let server = shared_tls();
    let tls = server.tls();
    let (ca, other_ca) = (tls.ca(), tls.other_ca());
    let (untrusted_cert, untrusted_key) = tls.untrusted_client_cert();
    let other_ca_text = other_ca.display().to_string();
    let missing = Path::new("/nonexistent/pg-ca.pem");
    type Case<'a> = (&'a str, Via, Vec<(&'a str, &'a Path)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "verify-full",
            Via::Name,
            vec![("sslrootcert", &other_ca)],
            vec!["certificate verify failed", "not trusted", &other_ca_text],
        ),
        (
            "verify-ca",
            Via::Address,
            vec![("sslrootcert", &other_ca)],
            vec!["not trusted"],
        ),
        (
            "require",
            Via::Address,
            vec![("sslrootcert", &other_ca)],
            vec!["not trusted"],
        ),
        (
            "verify-full",
            Via::Address,
            vec![("sslrootcert", &ca)],
            vec![
                "not valid for the host name 127.0.0.1",
                ServerTls::HOST_NAME,
            ],
        ),
        // pg_hba.conf wants a client certificate for this role: the server says so.
        (
            "verify-full",
            Via::CertUser,
            vec![("sslrootcert", &ca)],
            vec!["28000", "certificate"],
        ),
        (
            "verify-full",
            Via::CertUser,
            vec![
                ("sslrootcert", &ca),
                ("sslcert", &untrusted_cert),
                ("sslkey", &untrusted_key),
            ],
            vec!["client certificate"],
        ),
        (
            "verify-full",
            Via::Name,
            vec![("sslrootcert", missing)],
            vec!["sslrootcert /nonexistent/pg-ca.pem: no such file"],
        ),
    ];
    for (mode, via, params, needles) in cases {
        let url = url(server, via, &params, mode).await;
        let Err(error) = PostgresStore::open(&url).await else {
            panic!("{url}: connected")
        };
        let error = error.to_string();
        for needle in needles {
            assert!(error.contains(needle), "{url}: {error:?} lacks {needle:?}");
        }
    }
}

#[tokio::test]
async fn a_server_without_tls_is_refused_unless_plaintext_is_allowed() {
    let server = shared();
    for mode in ["disable", "prefer"] {
        let url = url(server, Via::Address, &[], mode).await;
        let store = PostgresStore::open(&url).await.unwrap();
        assert!(!uses_tls(&store).await, "{url}");
    }
    let ca = shared_tls().tls().ca();
    for (mode, params) in [
        ("require", vec![]),
        ("verify-ca", vec![("sslrootcert", ca.as_path())]),
    ] {
        let url = url(server, Via::Address, &params, mode).await;
        let Err(error) = PostgresStore::open(&url).await else {
            panic!("{url}: connected")
        };
        let expected = format!(
            "the PostgreSQL server at 127.0.0.1:{} does not accept TLS, and sslmode={mode} needs it",
            server.port
        );
        assert!(error.to_string().contains(&expected), "{error}");
    }
}
