//! Architecture invariant, checked mechanically: the protocol core does no I/O, reads no clock and draws no
//! randomness. Its normal (non-dev) dependency tree may not contain a crate that could, and its sources may not name
//! the standard library's I/O, clock, thread, process or environment APIs.

use std::path::Path;
use std::process::Command;

/// Crates that open sockets or files, run async I/O, read clocks or draw OS randomness.
const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "async-std",
    "smol",
    "mio",
    "socket2",
    "libp2p",
    "quinn",
    "quinn-proto",
    "quinn-udp",
    "rustls",
    "rand",
    "rand_core",
    "getrandom",
    "redb",
    "axum",
    "hyper",
    "reqwest",
    "chrono",
    "time",
    "rayon",
    "tracing-subscriber",
];

/// Source patterns that mean I/O, a clock, threads, processes, the environment or global randomness.
const FORBIDDEN_APIS: &[&str] = &[
    "std::fs",
    "std::net",
    "std::io::",
    "std::time",
    "SystemTime",
    "Instant",
    "std::thread",
    "std::process",
    "std::env",
    "thread_rng",
    "OsRng",
    "getrandom",
    "println!",
    "eprintln!",
];

#[test]
fn normal_dependencies_do_no_io() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "-p", "mirrormesh-proto", "-e", "normal", "--prefix", "none", "--format", "{p}", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    let tree = String::from_utf8_lossy(&output.stdout);
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(crates.contains(&"mirrormesh-proto"), "unexpected cargo tree output: {tree}");
    assert!(crates.contains(&"blake3"), "the check must see real dependencies: {tree}");
    let bad: Vec<&&str> = crates.iter().filter(|c| FORBIDDEN_CRATES.contains(c)).collect();
    assert!(bad.is_empty(), "mirrormesh-proto depends on I/O crates {bad:?}:\n{tree}");
}

#[test]
fn sources_name_no_io_api() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in std::fs::read_dir(&src).expect("proto/src") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("readable source");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for api in FORBIDDEN_APIS {
                    assert!(!code.contains(api), "{}:{}: uses {api}: {line}", path.display(), n + 1);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "expected the core's sources, found {checked} files");
}
