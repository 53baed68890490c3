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

/// Constructors of the standard library's randomly seeded hashers: a `HashMap` iterated into an output would make
/// the core's outputs depend on the process.
const RANDOM_HASHERS: &[&str] = &[
    "RandomState",
    "DefaultHasher",
    "HashMap::new(",
    "HashSet::new(",
    "HashMap::with_capacity(",
    "HashSet::with_capacity(",
    "HashMap::default(",
    "HashSet::default(",
];

/// Every `.rs` file under `dir`, at any depth.
fn sources(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable directory") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The generic arguments of each `name<...>` in `code`, counted at the top level (`HashMap<K, V>` has 2).
fn generic_arities(code: &str, name: &str) -> Vec<usize> {
    let pattern = format!("{name}<");
    let mut out = Vec::new();
    for (at, _) in code.match_indices(&pattern) {
        if at > 0 && code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let (mut depth, mut args) = (0, 1);
        for c in code[at + pattern.len() - 1..].chars() {
            match c {
                '<' | '(' | '[' => depth += 1,
                '>' | ')' | ']' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ',' if depth == 1 => args += 1,
                _ => {}
            }
        }
        out.push(args);
    }
    out
}

#[test]
fn sources_name_no_io_api_and_no_random_hasher() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = sources(&src);
    let mut nested = 0;
    for path in &files {
        nested += usize::from(path.parent() != Some(src.as_path()));
        let text = std::fs::read_to_string(path).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let at = || format!("{}:{}: {line}", path.display(), n + 1);
            for api in FORBIDDEN_APIS {
                assert!(!code.contains(api), "uses {api}: {}", at());
            }
            for hasher in RANDOM_HASHERS {
                assert!(!code.contains(hasher), "uses a randomly seeded hasher ({hasher}): {}", at());
            }
            // A map or set type without its hasher parameter is one with the random default.
            for (name, with_hasher) in [("HashMap", 3), ("HashSet", 2)] {
                for arity in generic_arities(code, name) {
                    assert_eq!(arity, with_hasher, "{name} without a fixed hasher: {}", at());
                }
            }
        }
    }
    assert!(files.len() >= 20, "expected the core's sources, found {} files", files.len());
    assert!(nested >= 5, "the scan must reach the engine in src/sync/ (found {nested} nested files)");
}

#[test]
fn the_hasher_check_sees_what_it_must() {
    assert_eq!(generic_arities("let m: HashMap<ChunkId, Vec<(u32, u64)>> = x;", "HashMap"), vec![2]);
    assert_eq!(generic_arities("HashMap<ChunkId, u32, BuildHasherDefault<IdHasher>>", "HashMap"), vec![3]);
    assert_eq!(generic_arities("FxHashMap<u8, u8>", "HashMap"), Vec::<usize>::new());
}
