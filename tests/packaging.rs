//! The files under packaging/ are what operators copy: the example configs must load, and the systemd unit must let
//! the daemon write exactly where those configs say it writes.

use std::path::{Path, PathBuf};

use mirrormesh::config::Config;

fn packaging(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging").join(name)
}

#[test]
fn example_configs_load() {
    let mirror = Config::load(&packaging("mirror.toml")).expect("mirror.toml loads");
    assert_eq!(mirror.bootstrap.len(), 1);
    assert_eq!(mirror.publishers.len(), 1, "a mirror trusts the origin");
    assert_eq!(mirror.bootstrap[0].0, mirror.publishers[0].1, "it bootstraps from the origin it trusts");
    let origin = Config::load(&packaging("origin.toml")).expect("origin.toml loads");
    assert!(origin.watch);
    assert_eq!(origin.tree, mirror.tree);
}

#[test]
fn systemd_unit_writes_where_the_config_does() {
    let unit = std::fs::read_to_string(packaging("mirrormesh.service")).unwrap();
    let writable: Vec<PathBuf> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ReadWritePaths="))
        .flat_map(|l| l.split_whitespace().map(PathBuf::from))
        .collect();
    for name in ["mirror.toml", "origin.toml"] {
        let config = Config::load(&packaging(name)).unwrap();
        for dir in [&config.state_dir, &config.tree, &config.staging_dir] {
            assert!(writable.contains(dir), "{name}: {} is not in ReadWritePaths {writable:?}", dir.display());
        }
    }
    for line in ["ProtectSystem=strict", "NoNewPrivileges=yes", "User=mirrormesh"] {
        assert!(unit.lines().any(|l| l == line), "the unit sets {line}");
    }
    assert!(unit.contains("--config /etc/mirrormesh/mirrormesh.toml"));
}

#[test]
fn alert_rules_are_valid_and_name_only_exported_metrics() {
    let path = packaging("mirrormesh-alerts.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool (Debian package prometheus) must be installed: apt-get install prometheus");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let rules = std::fs::read_to_string(&path).unwrap();
    // Families with labels show once they have a series.
    let metrics = mirrormesh::metrics::Metrics::new();
    let mut status = mirrormesh::status::Status::default();
    for counter in ["peers_banned_corruptchunk", "roots_rejected_bad_signature"] {
        status.counters.insert(counter.into(), 1);
    }
    metrics.refresh(&status, Some(0));
    let exported = metrics.encode_text();
    let mut checked = 0;
    for (at, _) in rules.match_indices("mirrormesh_") {
        let name: String =
            rules[at..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
        assert!(exported.contains(&name), "the rules use {name}, which the daemon does not export");
        checked += 1;
    }
    assert!(checked >= 10, "{checked} metric references checked");
}
