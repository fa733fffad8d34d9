//! The module graph points one way: a module imports only from layers
//! below its own (docs/ARCHITECTURE.md). Read from the `crate::` paths in
//! `src/`, so a new upward import fails here, naming the file and the path.
//! The command line (`src/main.rs`, `src/cli/`) is the binary's and uses
//! the library from outside.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Layer of each library module; `raft::types` sits below `store`, the
/// rest of `raft` above it.
fn layer(module: &str) -> Option<u32> {
    Some(match module {
        "wire" | "pb" | "tls" | "metrics" | "codec" | "clock" | "out" => 0,
        "record" => 1,
        "error" | "raft::types" | "config" => 2,
        "auth" | "caps" | "settings" => 3,
        "store" => 4,
        "raft" => 5,
        "api" => 6,
        "node" => 7,
        _ => return None,
    })
}

/// The client and the bench tool stand beside the server's layers: each
/// may use only these.
fn side_module_may_use(module: &str) -> Option<&'static [&'static str]> {
    match module {
        "client" => Some(&["wire", "pb", "tls"]),
        "bench" => Some(&["client", "wire", "pb", "tls", "out"]),
        "gateway" => Some(&["client", "wire", "pb", "tls", "metrics", "codec"]),
        _ => None,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a file belongs to (`raft::types` for src/raft/types.rs).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts[0] == "raft" && parts.get(1).map(String::as_str) == Some("types") {
        return "raft::types".into();
    }
    parts[0].clone()
}

/// The first segment of an import path (two for `raft::types`).
fn target(path: &str) -> String {
    let mut segs = path
        .split("::")
        .map(|s| s.trim().trim_start_matches('{').trim());
    let first = segs.next().unwrap_or("").to_string();
    if first == "raft" && segs.next() == Some("types") {
        return "raft::types".into();
    }
    first
}

/// Every module named after `crate::` in `text` (grouped imports included),
/// outside `//` comments.
fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Up to the matching brace; items at depth 0 name modules.
            let (mut depth, mut item, mut end) = (0, String::new(), group.len());
            for (j, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = j;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(target(&std::mem::take(&mut item)));
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
            found.insert(target(&item));
            rest = &group[end..];
        } else {
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.insert(target(&path));
        }
    }
    found.retain(|m| !m.is_empty() && m.chars().next().unwrap().is_lowercase());
    found
}

#[test]
fn the_import_reader_sees_plain_and_grouped_imports() {
    let text = "use crate::store::{Rejoin, X};\nuse crate::{api::A, raft::types::Vote, wire};\n\
                // use crate::node;\nlet x = crate::metrics::fsync(d);";
    let want: BTreeSet<String> = ["store", "api", "raft::types", "wire", "metrics"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(imports(text), want);
}

#[test]
fn every_module_imports_only_from_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let module = module_of(&src, file);
        if matches!(module.as_str(), "main" | "cli" | "lib") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for t in imports(&text) {
            if t == module || (module == "raft" && t == "raft::types") {
                continue;
            }
            checked += 1;
            let ok = match (side_module_may_use(&module), layer(&module), layer(&t)) {
                (Some(allowed), _, _) => allowed.contains(&t.as_str()),
                (None, Some(m), Some(l)) => l < m,
                (None, None, _) => {
                    wrong.push(format!("{}: module {module} has no layer", file.display()));
                    continue;
                }
                // A server module importing the client or the bench tool.
                (None, Some(_), None) => false,
            };
            if !ok {
                wrong.push(format!(
                    "{}: module {module} imports crate::{t}",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} imports read: is the reader broken?"
    );
    assert!(
        wrong.is_empty(),
        "imports against the layers (docs/ARCHITECTURE.md):\n{}",
        wrong.join("\n")
    );
}
