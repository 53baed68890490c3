//! The files under packaging/ are what operators copy: the example configs must load, and the systemd unit must let
//! the daemon write exactly where those configs say it writes.

mod support;

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
    status.repos.push(mirrormesh::status::RepoStatus { name: "alpine".into(), ..Default::default() });
    for counter in ["peers_banned_corruptchunk", "roots_rejected_bad_signature"] {
        status.counters.insert(counter.into(), 1);
    }
    metrics.refresh(&status, Some(0));
    metrics.published("alpine", 1);
    metrics.observe_sync("alpine", 1.0, Some(1.0));
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

fn run(command: &str, args: &[&std::ffi::OsStr], install: &str) -> String {
    let out = std::process::Command::new(command)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{command} must be installed ({install}): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{command} {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_fire_for_small_fabrics() {
    // promtool's rule unit tests: an origin with two mirrors that cannot reach each other is an overspend, a
    // healthy fabric is not, and a mirror behind the other is seen (packaging/mirrormesh-alerts.test.yml).
    let tests = packaging("mirrormesh-alerts.test.yml");
    let text = run("promtool", &["test".as_ref(), "rules".as_ref(), tests.as_os_str()], "apt-get install prometheus");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn systemd_unit_is_a_notify_service_with_watchdog_reload_and_mounts() {
    let unit = std::fs::read_to_string(packaging("mirrormesh.service")).unwrap();
    for line in ["Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID"] {
        assert!(unit.lines().any(|l| l == line), "the unit sets {line}");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")), "the unit sets a watchdog");
    let mounts: Vec<PathBuf> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("RequiresMountsFor="))
        .flat_map(|l| l.split_whitespace().map(PathBuf::from))
        .collect();
    for name in ["mirror.toml", "origin.toml"] {
        let config = Config::load(&packaging(name)).unwrap();
        for dir in [&config.state_dir, &config.tree, &config.staging_dir] {
            assert!(mounts.contains(dir), "{name}: {} is not in RequiresMountsFor {mounts:?}", dir.display());
        }
    }
    // systemd's own check, on the unit as installed but running the binary just built.
    let dir = tempfile::tempdir().unwrap();
    let installed = dir.path().join("mirrormesh.service");
    std::fs::write(&installed, unit.replace("/usr/local/bin/mirrormesh", env!("CARGO_BIN_EXE_mirrormesh"))).unwrap();
    let text = run("systemd-analyze", &["verify".as_ref(), installed.as_os_str()], "apt-get install systemd");
    assert!(!text.contains("mirrormesh.service:"), "systemd-analyze verify found problems in the unit:\n{text}");
}

#[test]
fn openrc_script_runs_the_same_daemon_and_reloads_with_sighup() {
    let path = packaging("mirrormesh.initd");
    let script = std::fs::read_to_string(&path).unwrap();
    assert!(script.starts_with("#!/sbin/openrc-run\n"));
    // openrc-run scripts are POSIX shell: they must at least parse.
    run("sh", &["-n".as_ref(), path.as_os_str()], "a POSIX shell");
    let unit = std::fs::read_to_string(packaging("mirrormesh.service")).unwrap();
    assert!(unit.contains("daemon --config /etc/mirrormesh/mirrormesh.toml"));
    assert!(script.contains(": \"${MIRRORMESH_CONFIG:=/etc/mirrormesh/mirrormesh.toml}\""), "the unit's config path");
    assert!(script.contains("command_args=\"daemon --config ${MIRRORMESH_CONFIG}\""));
    assert!(script.contains("extra_started_commands=\"reload\""));
    let reload = script.split("reload() {").nth(1).expect("a reload function");
    assert!(reload.contains("start-stop-daemon --signal HUP --pidfile \"${pidfile}\""), "reload sends SIGHUP");
    assert!(script.contains("need net localmount"), "started after the filesystems are mounted");
}

/// PromQL's keywords, aggregation operators and modifiers: words of an expression that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "inf",
    "nan",
];

/// The metric names an expression selects, each with the label names its matchers use.
fn metric_names(expr: &str) -> Vec<(String, Vec<String>)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // Label matchers: `name op "value"`, comma-separated; they belong to the metric just before.
            let start = i + 1;
            let mut depth_end = start;
            let mut in_string = None;
            while depth_end < chars.len() {
                match (in_string, chars[depth_end]) {
                    (None, '}') => break,
                    (None, q @ ('"' | '\'' | '`')) => in_string = Some(q),
                    (Some(q), ch) if ch == q => in_string = None,
                    _ => {}
                }
                depth_end += 1;
            }
            let body: String = chars[start..depth_end].iter().collect();
            let mut labels = Vec::new();
            let mut rest = body.as_str();
            while let Some(at) = rest.find(['=', '!']) {
                let name = rest[..at].trim().trim_start_matches(',').trim();
                if !name.is_empty() {
                    labels.push(name.to_owned());
                }
                // Skip the operator and the quoted value.
                let after = &rest[at..];
                let open = after.find('"').map_or(after.len(), |q| q + 1);
                let close = after[open..].find('"').map_or(after.len(), |q| open + q + 1);
                rest = &after[close.min(after.len())..];
            }
            if let Some(last) = out.last_mut().filter(|(_, l)| l.is_empty()) {
                last.1 = labels;
            }
            i = depth_end + 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let is_call = chars.get(j) == Some(&'(');
            if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word.as_str()) {
                // The parenthesised list after it (optional after group_left/right) holds label names.
                if is_call {
                    i = j;
                    while i < chars.len() && chars[i] != ')' {
                        i += 1;
                    }
                    i += 1;
                }
            } else if !is_call && !PROMQL_WORDS.contains(&word.as_str()) {
                out.push((word, Vec::new()));
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (`5m`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every PromQL query of a Grafana dashboard: panel targets (rows' panels too) and template variables
/// (`label_values(METRIC, LABEL)` is taken as the selector METRIC).
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    ("query" | "definition", serde_json::Value::String(q)) if q.starts_with("label_values(") => {
                        let inner = &q["label_values(".len()..q.len() - 1];
                        out.push(inner.split(',').next().unwrap().trim().to_owned());
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// Series names and the label names of each, from a /metrics text (classic format): every family a `# TYPE` line
/// declares (with `_bucket`, `_sum`, `_count` for histograms) and the labels of its samples.
fn exported(text: &str) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut out: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let suffixes: &[&str] = if kind == "histogram" { &["_bucket", "_sum", "_count"] } else { &[""] };
            for suffix in suffixes {
                out.entry(format!("{name}{suffix}")).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let labels = out.entry(line[..name_end].to_owned()).or_default();
            if line[name_end..].starts_with('{') {
                let body = &line[name_end + 1..line.find('}').unwrap()];
                for pair in body.split("\",") {
                    labels.insert(pair.split('=').next().unwrap().trim_start_matches(',').to_owned());
                }
            }
        }
    }
    out
}

#[test]
fn promql_names_are_found_and_keywords_are_not() {
    let names = metric_names(
        "sum by (le, repo) (rate(a_bucket{instance=~\"$i\",repo!=\"x\"}[1h])) / on(repo) group_left b \
         and topk(3, c) > 0.5 offset 5m or vector(0) - time()",
    );
    let names: Vec<(&str, Vec<&str>)> =
        names.iter().map(|(n, l)| (n.as_str(), l.iter().map(String::as_str).collect())).collect();
    assert_eq!(names, [("a_bucket", vec!["instance", "repo"]), ("b", vec![]), ("c", vec![])]);
}

#[test]
fn grafana_dashboard_queries_name_only_metrics_a_real_daemon_exports() {
    use mirrormesh::local_fabric::LocalFabric;
    let path = packaging("mirrormesh-grafana.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "{} queries", queries.len());

    // An origin and a mirror that synced a snapshot: what Prometheus scrapes from a working fabric.
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), env!("CARGO_BIN_EXE_mirrormesh").as_ref(), 1, &[]).unwrap();
    std::fs::create_dir_all(fabric.nodes[0].tree.join("alpine")).unwrap();
    std::fs::write(fabric.nodes[0].tree.join("alpine/p-1.0-r0.apk"), "package").unwrap();
    fabric.start_all().unwrap();
    let published = fabric.publish().unwrap();
    fabric.wait_all_settled(published.seq, std::time::Duration::from_secs(120)).unwrap();
    let mut metrics = std::collections::BTreeMap::new();
    for node in &fabric.nodes {
        let url = format!("http://{}/metrics", node.admin);
        let text = ureq::get(&url).call().unwrap().body_mut().read_to_string().unwrap();
        for (name, labels) in exported(&text) {
            metrics.entry(name).or_insert_with(std::collections::BTreeSet::new).extend(labels);
        }
    }
    let mut checked = 0;
    for query in &queries {
        let names = metric_names(query);
        assert!(!names.is_empty(), "no metric in {query:?}");
        for (name, labels) in names {
            let Some(exported_labels) = metrics.get(&name) else {
                panic!("the dashboard queries {name} ({query:?}), which the daemon does not export");
            };
            for label in labels {
                // Prometheus adds `instance` and `job` to every scraped series.
                let known = ["instance", "job"].contains(&label.as_str()) || exported_labels.contains(&label);
                // A family without samples in this fabric (no rejection yet) shows no labels to compare with.
                assert!(known || exported_labels.is_empty(), "{name} has no label {label} ({query:?})");
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "{checked} metric references checked");
}

/// The subcommands `mirrormesh --help` lists.
fn subcommands() -> Vec<String> {
    support::subcommands(std::path::Path::new(env!("CARGO_BIN_EXE_mirrormesh")))
}

#[test]
fn deb_package_installs_binary_unit_configs_man_pages_completions_and_creates_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let script = packaging("build-deb.sh");
    let built = run(
        "sh",
        &[script.as_os_str(), env!("CARGO_BIN_EXE_mirrormesh").as_ref(), out_dir.as_os_str()],
        "dpkg-deb (Debian's dpkg)",
    );
    let deb = PathBuf::from(built.trim());
    let arch = run("dpkg", &["--print-architecture".as_ref()], "dpkg");
    assert_eq!(deb, out_dir.join(format!("mirrormesh_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim())));

    let control = dir.path().join("control");
    run("dpkg-deb", &["-e".as_ref(), deb.as_os_str(), control.as_os_str()], "dpkg");
    let fields = std::fs::read_to_string(control.join("control")).unwrap();
    for field in [
        "Package: mirrormesh\n".to_owned(),
        format!("Version: {}\n", env!("CARGO_PKG_VERSION")),
        format!("Architecture: {}\n", arch.trim()),
        "Depends: adduser".to_owned(),
    ] {
        assert!(fields.contains(&field), "control has {field:?}:\n{fields}");
    }
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles, "/etc/mirrormesh/mirror.toml\n/etc/mirrormesh/origin.toml\n");
    for script in ["postinst", "postrm"] {
        let path = control.join(script);
        run("sh", &["-n".as_ref(), path.as_os_str()], "a POSIX shell");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o755, 0o755, "{script} is executable");
    }

    let root = dir.path().join("root");
    run("dpkg-deb", &["-x".as_ref(), deb.as_os_str(), root.as_os_str()], "dpkg");
    let file = |path: &str| {
        let full = root.join(path.trim_start_matches('/'));
        assert!(full.is_file(), "the package installs {path}");
        full
    };
    // The binary, stripped, runs.
    let installed = file("/usr/bin/mirrormesh");
    let version = std::process::Command::new(&installed).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout)
            .starts_with(&format!("mirrormesh {} (commit ", env!("CARGO_PKG_VERSION")))
    );
    // The unit, running the installed binary as the user the postinst creates.
    let unit = std::fs::read_to_string(file("/usr/lib/systemd/system/mirrormesh.service")).unwrap();
    let source = std::fs::read_to_string(packaging("mirrormesh.service")).unwrap();
    assert_eq!(unit, source.replace("ExecStart=/usr/local/bin/mirrormesh ", "ExecStart=/usr/bin/mirrormesh "));
    assert!(unit.lines().any(|l| l == "ExecStart=/usr/bin/mirrormesh daemon --config /etc/mirrormesh/mirrormesh.toml"));
    let user = unit.lines().find_map(|l| l.strip_prefix("User=")).expect("the unit names its user");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains(&format!("getent passwd {user} ")), "postinst checks for {user}");
    assert!(postinst.contains("adduser --system --group") && postinst.contains(&format!(" {user} ")), "{postinst}");
    let state = Config::load(&packaging("mirror.toml")).unwrap().state_dir;
    assert!(postinst.contains(&format!("install -d -o {user} -g {user} -m 0750 {}", state.display())), "{postinst}");
    // The example configs, as shipped.
    for name in ["mirror.toml", "origin.toml"] {
        let shipped = std::fs::read(file(&format!("/etc/mirrormesh/{name}"))).unwrap();
        assert_eq!(shipped, std::fs::read(packaging(name)).unwrap(), "{name}");
        let key = Config::load(&packaging(name)).unwrap().key;
        assert!(postinst.contains(&format!("mirrormesh keygen --out {}", key.display())), "postinst makes {key:?}");
    }
    // Man pages for the command and each subcommand, and the completions of three shells, naming every subcommand.
    let commands = subcommands();
    let page = |name: &str| {
        let gz = file(&format!("/usr/share/man/man1/{name}.1.gz"));
        let out = std::process::Command::new("gzip").arg("-dc").arg(gz).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let main_page = page("mirrormesh");
    for command in &commands {
        let roff = command.replace('-', "\\-");
        assert!(main_page.contains(&format!("mirrormesh\\-{roff}(1)")), "mirrormesh(1) names {command}");
        assert!(page(&format!("mirrormesh-{command}")).contains(".SH SYNOPSIS"));
    }
    for path in [
        "/usr/share/bash-completion/completions/mirrormesh",
        "/usr/share/zsh/vendor-completions/_mirrormesh",
        "/usr/share/fish/vendor_completions.d/mirrormesh.fish",
    ] {
        let text = std::fs::read_to_string(file(path)).unwrap();
        for command in &commands {
            assert!(text.contains(command.as_str()), "{path} completes {command}");
        }
    }
    file("/usr/share/doc/mirrormesh/copyright");
    file("/usr/share/doc/mirrormesh/examples/mirrormesh.initd");
}

/// The value of `name="..."` in an APKBUILD (the quoted text, which may span lines).
fn apkbuild_var<'a>(text: &'a str, name: &str) -> &'a str {
    let start = text.find(&format!("\n{name}=")).unwrap_or_else(|| panic!("APKBUILD sets {name}")) + name.len() + 2;
    let rest = &text[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => &quoted[..quoted.find('"').expect("closing quote")],
        None => rest.lines().next().unwrap(),
    }
}

#[test]
fn apkbuild_parses_and_names_files_that_exist_with_their_checksums() {
    // No Alpine here (abuild, apk): what can be checked without it is.
    let path = packaging("APKBUILD");
    run("sh", &["-n".as_ref(), path.as_os_str()], "a POSIX shell");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(apkbuild_var(&text, "pkgname"), "mirrormesh");
    assert_eq!(apkbuild_var(&text, "pkgver"), env!("CARGO_PKG_VERSION"), "the APKBUILD packages this version");
    // Local sources (not URLs) are files beside it, and their sums are the ones abuild will check.
    let sums = apkbuild_var(&text, "sha512sums");
    let mut local = 0;
    for source in apkbuild_var(&text, "source").split_whitespace() {
        if source.contains("://") {
            continue;
        }
        let file = packaging(source);
        assert!(file.is_file(), "APKBUILD source {source} is in packaging/");
        let sum = run("sha512sum", &[file.as_os_str()], "coreutils");
        let sum = sum.split_whitespace().next().unwrap();
        assert!(
            sums.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [sum, source]),
            "sha512sums has {source}'s sum {sum} (run `abuild checksum`, or sha512sum, after changing it)"
        );
        local += 1;
    }
    assert_eq!(local, 2, "the OpenRC script and its settings");
    // The user the OpenRC script runs as is the one the pre-install script creates.
    let install = apkbuild_var(&text, "install").replace("$pkgname", "mirrormesh");
    let pre_install = packaging(&install);
    run("sh", &["-n".as_ref(), pre_install.as_os_str()], "a POSIX shell");
    let created = std::fs::read_to_string(&pre_install).unwrap();
    let initd = std::fs::read_to_string(packaging("mirrormesh.initd")).unwrap();
    assert!(initd.contains(": \"${MIRRORMESH_USER:=mirrormesh}\""));
    assert_eq!(apkbuild_var(&text, "pkgusers"), "mirrormesh");
    assert!(
        created.contains("adduser -S") && created.trim_end().lines().any(|l| l.ends_with(" mirrormesh 2>/dev/null"))
    );
    // The script runs the binary where package() puts it; the configs are the shipped ones.
    assert!(initd.contains("command=\"/usr/bin/mirrormesh\""));
    assert!(text.contains("install -Dm755 target/release/mirrormesh -t \"$pkgdir\"/usr/bin/"));
    assert!(text.contains("install -Dm755 \"$srcdir\"/mirrormesh.initd \"$pkgdir\"/etc/init.d/mirrormesh"));
    assert!(text.contains("packaging/mirror.toml packaging/origin.toml -t \"$pkgdir\"/etc/mirrormesh/"));
    assert!(text.contains("mirrormesh generate --out generated"), "man pages and completions are generated");
}
