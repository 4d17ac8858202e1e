//! Connecting: bounded failure without a cluster, configuration errors,
//! monitor commands and identity with one.

mod common;

use std::time::{Duration, Instant};

use ceph_client::{ConnectConfig, Error, Rados};

/// A config that reads an empty conf file (so no ambient `CEPH_CONF` or
/// /etc/ceph steers the test) and names the given monitor.
fn isolated(dir: &tempfile::TempDir, mon_host: &str, timeout: Duration) -> ConnectConfig {
    let conf = dir.path().join("empty.conf");
    std::fs::write(&conf, "").unwrap();
    ConnectConfig {
        conf: Some(conf),
        options: vec![
            ("mon_host".into(), mon_host.into()),
            // No keyring is needed to find out nobody answers.
            ("auth_client_required".into(), "none".into()),
        ],
        timeout,
        ..Default::default()
    }
}

#[test]
fn connect_to_a_closed_port_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let e = Rados::connect(&isolated(&dir, "127.0.0.1:1", Duration::from_secs(3))).unwrap_err();
    let took = started.elapsed();
    assert!(e.is_timed_out(), "{e}");
    assert_eq!(
        e.to_string(),
        "rados_connect on cluster: Connection timed out (errno 110)"
    );
    assert!(
        took >= Duration::from_secs(2),
        "the timeout was applied, not an instant failure: {took:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "bounded by the timeout: {took:?}"
    );
}

#[test]
fn sub_second_timeouts_round_up_and_still_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let e = Rados::connect(&isolated(&dir, "127.0.0.1:1", Duration::from_millis(300))).unwrap_err();
    assert!(e.is_timed_out(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = ConnectConfig {
        conf: Some(dir.path().join("nope.conf")),
        ..Default::default()
    };
    let e = Rados::connect(&missing).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(e.op(), "rados_conf_read_file");

    let mut bad_option = isolated(&dir, "127.0.0.1:1", Duration::from_secs(3));
    bad_option
        .options
        .push(("no_such_ceph_option".into(), "1".into()));
    let e = Rados::connect(&bad_option).unwrap_err();
    assert_eq!(e.op(), "rados_conf_set");
    assert!(
        e.to_string().contains(r#"option "no_such_ceph_option""#),
        "{e}"
    );

    let mut bad_value = isolated(&dir, "127.0.0.1:1", Duration::from_secs(3));
    bad_value
        .options
        .push(("rados_osd_op_timeout".into(), "soon".into()));
    let e = Rados::connect(&bad_value).unwrap_err();
    assert_eq!(e.op(), "rados_conf_set");
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");

    let nul = ConnectConfig {
        cluster: Some("ce\0ph".into()),
        ..Default::default()
    };
    assert!(matches!(
        Rados::connect(&nul).unwrap_err(),
        Error::Nul {
            what: "cluster name",
            ..
        }
    ));
}

#[test]
fn default_config_is_ten_seconds() {
    let c = ConnectConfig::default();
    assert_eq!(c.timeout, Duration::from_secs(10));
    assert!(c.conf.is_none() && c.id.is_none() && c.keyring.is_none() && c.cluster.is_none());
    assert!(c.options.is_empty());
}

#[test]
fn connect_identity_and_mon_commands() {
    let Some(env) = testkit::ceph::require("connect_identity_and_mon_commands") else {
        return;
    };
    let mut config = common::config(&env);
    // `client.` prefix is accepted and not doubled.
    config.id = Some(format!("client.{}", env.id));
    let rados = Rados::connect(&config).unwrap();
    let other = Rados::connect(&common::config(&env)).unwrap();
    assert_ne!(rados.instance_id(), 0);
    assert_ne!(rados.instance_id(), other.instance_id());
    let addr = rados.client_addr().unwrap();
    assert!(addr.contains(":0/") || addr.contains('/'), "{addr}");
    assert_ne!(addr, other.client_addr().unwrap());

    let (out, _status) = rados
        .mon_command(r#"{"prefix":"osd pool ls","format":"json"}"#)
        .unwrap();
    assert!(out.contains(&format!("\"{}\"", env.pool)), "{out}");
    let e = rados
        .mon_command(r#"{"prefix":"no such command"}"#)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert!(
        matches!(&e, Error::MonCommand { status, .. } if !status.is_empty()),
        "{e:?}"
    );
    let e = rados.mon_command("not json").unwrap_err();
    assert!(e.errno().is_some(), "{e}");

    // Wrong credentials fail (not hang).
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("bad.keyring");
    std::fs::write(
        &keyring,
        format!(
            "[client.{}]\n\tkey = AQBTfnBlAAAAABAAtGJ4yXc2ZDDEMZvV6rL0KA==\n",
            env.id
        ),
    )
    .unwrap();
    let bad = ConnectConfig {
        keyring: Some(keyring),
        timeout: Duration::from_secs(5),
        ..common::config(&env)
    };
    let started = Instant::now();
    let e = Rados::connect(&bad).unwrap_err();
    assert!(e.errno().is_some(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}
