use super::*;
use std::time::UNIX_EPOCH;

/// A set of one file whose contents must start with "ok"; the value is the text.
fn text(path: &Path) -> Arc<Reloadable<String>> {
    Reloadable::load(vec![("--text", path.to_path_buf())], |files| {
        let text = String::from_utf8_lossy(files.bytes(0)).to_string();
        if !text.starts_with("ok") {
            return Err(format!("{}: does not start with ok", files.name(0)));
        }
        Ok(Loaded {
            value: text.clone(),
            not_after: None,
            summary: text,
        })
    })
    .unwrap()
}

fn now() -> SystemTime {
    SystemTime::now()
}

#[test]
fn a_rewritten_file_is_reloaded_and_an_identical_rewrite_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("value");
    std::fs::write(&path, "ok 1").unwrap();
    let value = text(&path);
    assert_eq!(value.poll(now()), Outcome::Unchanged);
    std::fs::write(&path, "ok 1").unwrap();
    assert_eq!(
        value.poll(now()),
        Outcome::Unchanged,
        "same bytes, new mtime"
    );
    let before = value.generation();
    std::fs::write(&path, "ok 2").unwrap();
    assert_eq!(
        value.poll(now()),
        Outcome::Reloaded {
            summary: "ok 2".into()
        }
    );
    assert_eq!(*value.current(), "ok 2");
    assert_ne!(value.generation(), before);
    assert_eq!(value.poll(now()), Outcome::Unchanged);
}

/// Kubernetes updates a mounted Secret by pointing `..data` at a new timestamped directory
/// (a rename over the old symlink); the file names are symlinks through `..data`.
#[test]
fn a_kubernetes_secret_symlink_swap_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_01")).unwrap();
    std::fs::write(root.join("..2026_01/value"), "ok first").unwrap();
    std::os::unix::fs::symlink("..2026_01", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/value", root.join("value")).unwrap();
    let value = text(&root.join("value"));
    assert_eq!(*value.current(), "ok first");

    std::fs::create_dir(root.join("..2026_02")).unwrap();
    std::fs::write(root.join("..2026_02/value"), "ok second").unwrap();
    std::os::unix::fs::symlink("..2026_02", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_01")).unwrap();
    assert!(matches!(value.poll(now()), Outcome::Reloaded { .. }));
    assert_eq!(*value.current(), "ok second");
}

#[test]
fn refused_contents_are_reported_once_when_read_twice_and_the_old_value_stays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("value");
    std::fs::write(&path, "ok 1").unwrap();
    let value = text(&path);

    std::fs::write(&path, "garbage").unwrap();
    assert_eq!(value.poll(now()), Outcome::Unsettled, "first read: not yet");
    let reported = value.poll(now());
    let Outcome::Refused { reason } = reported else {
        panic!("second read of the same contents is reported: {reported:?}");
    };
    assert!(
        reason.contains("--text") && reason.contains("does not start with ok"),
        "{reason}"
    );
    for _ in 0..3 {
        assert_eq!(value.poll(now()), Outcome::StillRefused, "reported once");
    }
    assert_eq!(*value.current(), "ok 1");

    std::fs::write(&path, "other garbage").unwrap();
    assert_eq!(value.poll(now()), Outcome::Unsettled);
    assert!(
        matches!(value.poll(now()), Outcome::Refused { .. }),
        "new bad contents are reported again"
    );

    std::fs::remove_file(&path).unwrap();
    assert_eq!(value.poll(now()), Outcome::Unsettled);
    let Outcome::Refused { reason } = value.poll(now()) else {
        panic!("a missing file is refused");
    };
    assert!(reason.contains("No such file"), "{reason}");

    std::fs::write(&path, "ok 1").unwrap();
    assert_eq!(
        value.poll(now()),
        Outcome::Unchanged,
        "back to what is in use"
    );
    std::fs::write(&path, "garbage").unwrap();
    assert_eq!(
        value.poll(now()),
        Outcome::Unsettled,
        "after a good read, the same bad contents count as new"
    );
    assert_eq!(*value.current(), "ok 1");
}

#[test]
fn bad_contents_fixed_before_the_next_poll_are_never_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("value");
    std::fs::write(&path, "ok 1").unwrap();
    let value = text(&path);
    std::fs::write(&path, "half written").unwrap();
    assert_eq!(value.poll(now()), Outcome::Unsettled);
    std::fs::write(&path, "ok 2").unwrap();
    assert!(matches!(value.poll(now()), Outcome::Reloaded { .. }));
}

#[test]
fn a_new_value_whose_certificate_has_expired_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("value");
    // The contents are the expiry, in seconds since the epoch.
    std::fs::write(&path, "2000000000").unwrap();
    let value = Reloadable::load(vec![("--cert", path.clone())], |files| {
        let secs: u64 = String::from_utf8_lossy(files.bytes(0))
            .parse()
            .map_err(|e| format!("{e}"))?;
        Ok(Loaded {
            value: secs,
            not_after: Some(UNIX_EPOCH + Duration::from_secs(secs)),
            summary: secs.to_string(),
        })
    })
    .unwrap();
    let at = UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    std::fs::write(&path, "1000000000").unwrap();
    assert_eq!(value.poll(at), Outcome::Unsettled);
    let Outcome::Refused { reason } = value.poll(at) else {
        panic!("expired");
    };
    assert!(
        reason.contains("expired at 2001-09-09T01:46:40Z"),
        "{reason}"
    );
    assert_eq!(*value.current(), 2_000_000_000);
    std::fs::write(&path, "1600000000").unwrap();
    assert!(matches!(value.poll(at), Outcome::Reloaded { .. }));
    assert_eq!(*value.current(), 1_600_000_000);
}

#[test]
fn a_missing_file_at_start_names_the_flag() {
    let error = Reloadable::load(vec![("--text", "/nonexistent/value".into())], |_| {
        Ok(Loaded {
            value: (),
            not_after: None,
            summary: String::new(),
        })
    })
    .err()
    .unwrap();
    assert!(error.starts_with("--text /nonexistent/value: "), "{error}");
}
