//! The module graph: no import circles, and no `use` that goes back up the data path.
//!
//! Each part of `src/` has a rank; a module may use modules of its own part (without
//! a circle) and of parts ranked below it, never above. The ranks are the README's
//! layout, top to bottom. This reads the source as text: `crate::a::b` and
//! `super::x` paths, outside comments.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Parts, most specific first; higher ranks may use lower ones.
const RANKS: &[(&str, u32)] = &[
    ("run", 90),
    ("edge", 80),
    ("proxy", 70),
    ("admin", 65),
    ("observe", 60),
    ("engineio", 50),
    ("workers", 40),
    ("broker", 40),
    ("transport", 30),
    // The HTTP/1 vocabulary: a leaf (`http1_is_a_leaf`).
    ("http1", 15),
    ("runtime", 10),
    ("counters", 10),
    ("config", 0),
    ("lib", 100),
];

fn rank(module: &str) -> (String, u32) {
    for (part, r) in RANKS {
        if module == *part || module.starts_with(&format!("{part}::")) {
            return (part.to_string(), *r);
        }
    }
    panic!("module `{module}` has no rank in tests/layers.rs: add its part to RANKS");
}

/// `src/a/b.rs` → `a::b`; `src/a/mod.rs` → `a`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without `//` comments (doc comments name other modules) and
/// without its unit tests (`#[cfg(test)] mod tests`, at the end by convention).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::x::y`, `super::x` and `child::x` path in `code`, as module names,
/// resolved to the longest known module.
fn uses(module: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut prefixes = vec![
        ("crate::".to_string(), String::new()),
        ("super::".to_string(), parent(module)),
    ];
    // A module's own children, named without a prefix (`use registry::X`).
    for child in known
        .iter()
        .filter(|k| parent(k) == module && !module.is_empty())
    {
        let name = &child[module.len() + 2..];
        prefixes.push((format!("{name}::"), String::new()));
        prefixes.last_mut().expect("pushed").1 = module.to_string();
    }
    for (prefix, base) in &prefixes {
        let relative_child = !prefix.starts_with("crate") && !prefix.starts_with("super");
        let prefix = prefix.as_str();
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut segments: Vec<&str> = Vec::new();
            if !base.is_empty() {
                segments.extend(base.split("::"));
            }
            if relative_child {
                segments.push(&prefix[..prefix.len() - 2]);
            }
            segments.extend(path.split("::").filter(|s| !s.is_empty()));
            // The longest prefix that is a module.
            for n in (1..=segments.len()).rev() {
                let candidate = segments[..n].join("::");
                if known.contains(&candidate) {
                    if candidate != module {
                        found.insert(candidate);
                    }
                    break;
                }
            }
        }
    }
    found
}

fn parent(module: &str) -> String {
    match module.rfind("::") {
        Some(i) => module[..i].to_string(),
        None => String::new(),
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| f.file_name().is_some_and(|n| n != "main.rs"));
    let known: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    files
        .iter()
        .map(|f| {
            let module = module_of(&src, f);
            let text = std::fs::read_to_string(f).expect("read");
            let found = uses(&module, &code(&text), &known);
            (module, found)
        })
        .collect()
}

#[test]
fn no_use_goes_back_up() {
    let mut wrong = Vec::new();
    for (module, uses) in graph() {
        let (part, r) = rank(&module);
        for used in uses {
            let (used_part, used_r) = rank(&used);
            if used_part != part && used_r >= r {
                wrong.push(format!("{module} (rank {r}) uses {used} (rank {used_r})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "uses going up or sideways:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn http1_is_a_leaf() {
    let leaning: Vec<String> = graph()
        .into_iter()
        .filter(|(m, _)| rank(m).0 == "http1")
        .flat_map(|(m, uses)| {
            uses.into_iter()
                .filter(|u| rank(u).0 != "http1")
                .map(move |u| format!("{m} uses {u}"))
        })
        .collect();
    assert!(leaning.is_empty(), "http1 uses:\n{}", leaning.join("\n"));
}

#[test]
fn no_import_circles() {
    let g = graph();
    // Depth-first search; a module met again while on the stack closes a circle.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        circles: &mut Vec<String>,
    ) {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut circle = stack[i..].to_vec();
            circle.push(m.to_string());
            circles.push(circle.join(" → "));
            return;
        }
        if !done.insert(m.to_string()) {
            return;
        }
        stack.push(m.to_string());
        for next in g.get(m).into_iter().flatten() {
            visit(next, g, stack, done, circles);
        }
        stack.pop();
    }
    let (mut done, mut circles) = (BTreeSet::new(), Vec::new());
    for m in g.keys() {
        visit(m, &g, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_check_sees_a_use_going_up() {
    let known: BTreeSet<String> = [
        "workers::pool",
        "proxy::route",
        "edge::auth",
        "broker",
        "broker::registry",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let found = uses(
        "workers::pool",
        &code("use crate::proxy::route::Proxy; // crate::edge::auth"),
        &known,
    );
    assert_eq!(found, BTreeSet::from(["proxy::route".to_string()]));
    let (_, from) = rank("workers::pool");
    let (_, to) = rank("proxy::route");
    assert!(to > from);
    let found = uses(
        "edge::auth",
        &code("super::gate::x(); super::status"),
        &known,
    );
    assert!(
        found.is_empty(),
        "unknown modules are not reported: {found:?}"
    );
    let found = uses("broker", &code("use registry::Registry;"), &known);
    assert_eq!(found, BTreeSet::from(["broker::registry".to_string()]));
    let found = uses("broker::registry", &code("super::frame(x)"), &known);
    assert_eq!(found, BTreeSet::from(["broker".to_string()]));
}
