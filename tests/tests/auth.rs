//! Bearer-token auth on the public Listen API (real listen binary; tokens signed here).

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tests::listen::{ConversationStatus, SessionRequest, Start, session_request::Msg};
use tests::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn user(uid: &str) -> String {
    hs256(json!({"sub": uid, "exp": now() + 600}))
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn system(extra: &[&str]) -> (Service, Service) {
    let pusher_port = free_port();
    let pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let mut args = vec!["--auth-jwt-secret", SECRET];
    args.extend_from_slice(extra);
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &args,
    })
    .await;
    (pusher, listen)
}

#[tokio::test]
async fn a_user_may_only_touch_its_own_conversations() {
    let (_pusher, listen) = system(&[]).await;
    let mut client = listen_client(&listen);

    let mine = client
        .submit_conversation(with_token(talk("alice", "k"), &user("alice")))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let status = client
        .submit_conversation(with_token(talk("bob", "k"), &user("alice")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().starts_with("uid"), "{}", status.message());

    let get = |token: String| {
        with_token(
            listen::GetConversationRequest {
                conversation_id: mine.clone(),
                ..Default::default()
            },
            &token,
        )
    };
    assert!(client.get_conversation(get(user("alice"))).await.is_ok());
    assert_eq!(
        client
            .get_conversation(get(user("mallory")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let retry = with_token(
        listen::RetryConversationRequest {
            conversation_id: mine.clone(),
        },
        &user("mallory"),
    );
    assert_eq!(
        client.retry_conversation(retry).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Listing defaults to the caller's own conversations; asking for someone else's is denied.
    let listed = client
        .list_conversations(with_token(
            listen::ListConversationsRequest::default(),
            &user("mallory"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.conversations.is_empty());
    let others = with_token(
        listen::ListConversationsRequest {
            uid: "alice".into(),
            ..Default::default()
        },
        &user("mallory"),
    );
    assert_eq!(
        client.list_conversations(others).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let link = with_token(listen::GetLinkStatusRequest {}, &user("alice"));
    assert_eq!(
        client.get_link_status(link).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // A live session may only start for the token's own uid.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SessionRequest {
        msg: Some(Msg::Start(Start {
            uid: "bob".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut events = client
        .session(with_token(ReceiverStream::new(rx), &user("alice")))
        .await
        .unwrap()
        .into_inner();
    let status = events.message().await.unwrap_err();
    assert_eq!(
        (status.code(), status.message().starts_with("start.uid")),
        (Code::PermissionDenied, true),
        "{status:?}"
    );

    // Nothing was written for the denied calls.
    let service = hs256(json!({"sub": "ops", "exp": now() + 600, "scope": "read listen:service"}));
    let all = client
        .list_conversations(with_token(
            listen::ListConversationsRequest::default(),
            &service,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.conversations.len(), 1);
}

#[tokio::test]
async fn a_service_token_may_act_for_anyone() {
    let (_pusher, listen) = system(&[]).await;
    let mut client = listen_client(&listen);
    let service = hs256(json!({"sub": "ingest", "exp": now() + 600, "scp": ["listen:service"]}));
    let id = client
        .submit_conversation(with_token(talk("carol", "k"), &service))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let get = with_token(
        listen::GetConversationRequest {
            conversation_id: id,
            ..Default::default()
        },
        &service,
    );
    assert_eq!(
        client.get_conversation(get).await.unwrap().into_inner().uid,
        "carol"
    );
    assert!(
        client
            .get_link_status(with_token(listen::GetLinkStatusRequest {}, &service))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn missing_bad_and_expired_tokens_are_unauthenticated_and_health_stays_open() {
    let (_pusher, listen) = system(&[]).await;
    let mut client = listen_client(&listen);
    let status = client
        .submit_conversation(talk("alice", "k"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("bearer"), "{}", status.message());
    for token in [
        "not-a-jwt".to_string(),
        hs256(json!({"sub": "alice", "exp": now() - 3600})),
        hs256(json!({"sub": "alice"})),
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "alice", "exp": now() + 600}),
            &EncodingKey::from_secret(b"some-other-secret-that-is-32-bytes-long"),
        )
        .unwrap(),
    ] {
        let status = client
            .submit_conversation(with_token(talk("alice", "k"), &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token}: {status:?}");
    }
    // Health and reflection are not behind auth.
    assert!(listen.health("").await.is_some());
    assert!(listen.health("listen.v1.PusherLink").await.is_some());
}

#[tokio::test]
async fn rs256_tokens_verify_against_a_jwks_file() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let jwks = fixtures.join("test-jwks.json").display().to_string();
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[
            "--auth-jwks-file",
            &jwks,
            "--auth-issuer",
            "https://idp.test",
        ],
    })
    .await;
    let mut client = listen_client(&listen);
    let key = EncodingKey::from_rsa_pem(&std::fs::read(fixtures.join("test-rsa-key.pem")).unwrap())
        .unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-key-1".into());
    let token = encode(
        &header,
        &json!({"sub": "dana", "exp": now() + 600, "iss": "https://idp.test"}),
        &key,
    )
    .unwrap();
    let id = client
        .submit_conversation(with_token(talk("dana", "k"), &token))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    wait_for("completed", Duration::from_secs(20), || {
        let mut client = client.clone();
        let (id, token) = (id.clone(), token.clone());
        async move {
            let c = client
                .get_conversation(with_token(
                    listen::GetConversationRequest {
                        conversation_id: id,
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .ok()?;
            (c.into_inner().status == ConversationStatus::Completed as i32).then_some(())
        }
    })
    .await;
    let wrong_issuer = encode(
        &header,
        &json!({"sub": "dana", "exp": now() + 600, "iss": "https://evil.test"}),
        &key,
    )
    .unwrap();
    let status = client
        .submit_conversation(with_token(talk("dana", "k2"), &wrong_issuer))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_short_secret_or_a_broken_jwks_exits_64() {
    for (args, flag) in [
        (vec!["--auth-jwt-secret", "short"], "--auth-jwt-secret"),
        (
            vec!["--auth-jwks-file", "/nonexistent/jwks.json"],
            "--auth-jwks-file",
        ),
        (
            vec!["--auth-jwks-file", "/etc/hostname"],
            "--auth-jwks-file",
        ),
    ] {
        let output = std::process::Command::new(binary("listen-svc"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(flag),
            "{args:?}"
        );
    }
}

/// The JWKS file and the HS256 secret file are read again while listen runs: a rotated key
/// is accepted, the one it replaced is not, and a broken JWKS keeps the keys in use.
#[tokio::test]
async fn rotated_keys_are_accepted_without_a_restart() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let dir = tempfile::tempdir().unwrap();
    let (jwks, secret) = (dir.path().join("jwks.json"), dir.path().join("secret"));
    let original = std::fs::read_to_string(fixtures.join("test-jwks.json")).unwrap();
    std::fs::write(&jwks, &original).unwrap();
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let pusher_port = free_port();
    let _pusher = start_pusher(PusherOptions::port(pusher_port)).await;
    let (jwks_arg, secret_arg) = (jwks.display().to_string(), secret.display().to_string());
    let listen = start_listen(ListenOptions {
        pusher_port,
        extra: &[
            "--auth-jwks-file",
            &jwks_arg,
            "--auth-jwt-secret-file",
            &secret_arg,
            "--credentials-reload-interval",
            "200ms",
        ],
    })
    .await;
    let client = listen_client(&listen);
    let accepted = |token: String| {
        let mut client = client.clone();
        async move {
            client
                .list_conversations(with_token(
                    listen::ListConversationsRequest::default(),
                    &token,
                ))
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    };
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(fixtures.join("test-rsa-key.pem")).unwrap())
        .unwrap();
    let rs256 = |kid: &str| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        encode(&header, &json!({"sub": "erin", "exp": now() + 600}), &rsa).unwrap()
    };
    let hs256_with = |secret: &str| {
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "erin", "exp": now() + 600}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(accepted(rs256("test-key-1")).await, Ok(()));
    assert_eq!(
        accepted(user("erin")).await,
        Ok(()),
        "the trailing newline is not part of the secret"
    );

    const NEW_SECRET: &str = "the-rotated-hs256-secret-of-32-bytes-or-more";
    std::fs::write(&secret, NEW_SECRET).unwrap();
    wait_for(
        "the new secret to be accepted",
        Duration::from_secs(10),
        || {
            let token = hs256_with(NEW_SECRET);
            let accepted = &accepted;
            async move { accepted(token).await.ok() }
        },
    )
    .await;
    assert_eq!(accepted(user("erin")).await, Err(Code::Unauthenticated));

    let failures = "listen_credential_reload_failures_total{credential=\"auth-jwks-file\"}";
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    wait_for(
        "the empty JWKS to be refused",
        Duration::from_secs(10),
        || async { (listen.metric(failures).await == 1.0).then_some(()) },
    )
    .await;
    assert_eq!(
        accepted(rs256("test-key-1")).await,
        Ok(()),
        "the old keys stay"
    );

    std::fs::write(&jwks, original.replace("test-key-1", "test-key-2")).unwrap();
    wait_for(
        "the rotated key to be accepted",
        Duration::from_secs(10),
        || {
            let token = rs256("test-key-2");
            let accepted = &accepted;
            async move { accepted(token).await.ok() }
        },
    )
    .await;
    assert_eq!(
        accepted(rs256("test-key-1")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        listen.log_lines_with(&["credential files refused", "auth-jwks-file", "no keys"]),
        1
    );
}
