use super::*;
use crate::grpc::Loopback;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

async fn start() -> (HealthReporter, Loopback) {
    let (reporter, service) = health_reporter();
    let router = crate::grpc::server_builder(Default::default()).add_service(service);
    (reporter, Loopback::serve(router).await)
}

fn request(name: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: name.to_string(),
    }
}

async fn watch(
    channel: &Channel,
    name: &str,
) -> Result<tonic::Streaming<HealthCheckResponse>, Status> {
    Ok(HealthClient::new(channel.clone())
        .watch(request(name))
        .await?
        .into_inner())
}

async fn next(updates: &mut tonic::Streaming<HealthCheckResponse>) -> WireStatus {
    let response = tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .expect("a health update within 5 s")
        .expect("the watch stays open")
        .expect("an update, not an error");
    WireStatus::try_from(response.status).unwrap()
}

async fn check(channel: &Channel, name: &str) -> Result<WireStatus, Status> {
    let response = HealthClient::new(channel.clone())
        .check(request(name))
        .await?;
    Ok(WireStatus::try_from(response.into_inner().status).unwrap())
}

#[tokio::test]
async fn watch_on_an_unknown_name_sends_service_unknown_then_its_status_once_known() {
    let (reporter, server) = start().await;
    let mut updates = watch(&server.channel, "later.v1.Later").await.unwrap();
    assert_eq!(next(&mut updates).await, WireStatus::ServiceUnknown);
    // Watched but unknown: Check still says NOT_FOUND.
    let error = check(&server.channel, "later.v1.Later").await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);

    reporter
        .set_service_status("later.v1.Later", ServingStatus::Serving)
        .await;
    assert_eq!(next(&mut updates).await, WireStatus::Serving);
    reporter
        .set_service_status("later.v1.Later", ServingStatus::NotServing)
        .await;
    assert_eq!(next(&mut updates).await, WireStatus::NotServing);
    assert_eq!(
        check(&server.channel, "later.v1.Later").await.unwrap(),
        WireStatus::NotServing
    );
}

#[tokio::test]
async fn watch_on_a_known_name_sends_its_status_and_each_change_once() {
    type Named = HealthServer<HealthService>;
    let (reporter, server) = start().await;
    reporter.set_serving::<Named>().await;
    let mut updates = watch(&server.channel, Named::NAME).await.unwrap();
    assert_eq!(next(&mut updates).await, WireStatus::Serving);

    reporter.set_not_serving::<Named>().await;
    assert_eq!(next(&mut updates).await, WireStatus::NotServing);
    // Setting the same status again sends nothing: the next update is the next change.
    reporter.set_not_serving::<Named>().await;
    reporter.set_serving::<Named>().await;
    assert_eq!(next(&mut updates).await, WireStatus::Serving);
}

#[tokio::test]
async fn check_answers_known_names_and_not_found_for_others() {
    let (reporter, server) = start().await;
    assert_eq!(
        check(&server.channel, "").await.unwrap(),
        WireStatus::Serving
    );
    reporter
        .set_service_status("down.v1.Down", ServingStatus::NotServing)
        .await;
    assert_eq!(
        check(&server.channel, "down.v1.Down").await.unwrap(),
        WireStatus::NotServing
    );
    let error = check(&server.channel, "no.such.Service").await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(error.message().contains("no.such.Service"), "{error:?}");
}

#[tokio::test]
async fn unknown_watched_names_are_bounded_and_a_gone_watcher_frees_its_name() {
    let (reporter, server) = start().await;
    let mut watchers = Vec::new();
    for i in 0..MAX_UNKNOWN_WATCHED {
        let mut updates = watch(&server.channel, &format!("unknown.{i}"))
            .await
            .unwrap();
        assert_eq!(next(&mut updates).await, WireStatus::ServiceUnknown);
        watchers.push(updates);
    }

    let error = watch(&server.channel, "one.too.many").await.unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert!(
        error.message().contains(&MAX_UNKNOWN_WATCHED.to_string()),
        "{error:?}"
    );
    // Names already watched and known names are not refused.
    let mut again = watch(&server.channel, "unknown.0").await.unwrap();
    assert_eq!(next(&mut again).await, WireStatus::ServiceUnknown);
    reporter
        .set_service_status("known.v1.Known", ServingStatus::Serving)
        .await;
    let mut known = watch(&server.channel, "known.v1.Known").await.unwrap();
    assert_eq!(next(&mut known).await, WireStatus::Serving);

    // The server hears of the cancelled call shortly after the client drops it.
    drop(watchers.pop());
    let mut freed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch(&server.channel, "one.too.many").await {
                Ok(updates) => break updates,
                Err(error) if error.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(error) => panic!("{error:?}"),
            }
        }
    })
    .await
    .expect("the dropped watcher's name is freed within 5 s");
    assert_eq!(next(&mut freed).await, WireStatus::ServiceUnknown);
}

#[tokio::test]
async fn an_unknown_name_is_forgotten_with_its_last_watcher_and_a_known_one_is_kept() {
    let reporter = HealthReporter::new();
    let service = reporter.service();
    let watched = |name: &str| service.statuses.lock().contains_key(name);

    let first = service.watch(Request::new(request("x"))).await.unwrap();
    let second = service.watch(Request::new(request("x"))).await.unwrap();
    assert!(watched("x"));
    drop(first);
    assert!(watched("x"), "one watcher is left");
    drop(second);
    assert!(!watched("x"), "no watcher is left");

    let watcher = service.watch(Request::new(request("y"))).await.unwrap();
    reporter
        .set_service_status("y", ServingStatus::Serving)
        .await;
    drop(watcher);
    assert!(watched("y"), "a known name stays");
}

#[tokio::test]
async fn ending_watches_for_shutdown_sends_the_last_status_then_ends_ok() {
    let (reporter, server) = start().await;
    let mut known = watch(&server.channel, "").await.unwrap();
    assert_eq!(next(&mut known).await, WireStatus::Serving);
    let mut unknown = watch(&server.channel, "never.v1.Set").await.unwrap();
    assert_eq!(next(&mut unknown).await, WireStatus::ServiceUnknown);

    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter.end_watches();
    assert_eq!(next(&mut known).await, WireStatus::NotServing);
    for updates in [&mut known, &mut unknown] {
        let end = tokio::time::timeout(Duration::from_secs(5), updates.next())
            .await
            .expect("the watch ends within 5 s");
        assert!(end.is_none(), "ended OK, got {end:?}");
    }
    // Check still answers while the server drains.
    assert_eq!(
        check(&server.channel, "").await.unwrap(),
        WireStatus::NotServing
    );
}
