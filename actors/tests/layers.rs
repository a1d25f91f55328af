//! The modules of each crate form layers: no import cycle between top-level modules.
//!
//! A cycle (say `billing` uses `ledger` which uses `billing`) means a type lives in the wrong
//! module; shared vocabulary belongs in `model`, the lowest module but `pricing`. Test code
//! (`#[cfg(test)] mod tests` blocks and test-only files) may reach anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Files declared `#[cfg(test)] mod name;`: test-only.
fn test_only(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("#[cfg(test)]") {
            rest = &rest[i + "#[cfg(test)]".len()..];
            let decl = rest.trim_start();
            let decl = decl.strip_prefix("pub ").unwrap_or(decl);
            if let Some(tail) = decl.strip_prefix("mod ")
                && let Some(end) = tail.find(';')
                && !tail[..end].contains('{')
            {
                let name = tail[..end].trim();
                let dir = f.parent().unwrap();
                let stem = f.file_stem().unwrap();
                out.insert(dir.join(stem).join(format!("{name}.rs")));
                out.insert(dir.join(format!("{name}.rs")));
            }
        }
    }
    out
}

/// Top-level module → the top-level modules its production code names as `crate::x`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let skip = test_only(&files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        if skip.contains(f) {
            continue;
        }
        let rel = f.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let code = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text,
        };
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or("");
            let mut rest = line;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    g.entry(top.clone()).or_default().insert(name);
                }
            }
        }
    }
    g
}

/// A cycle in `g`, if there is one.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for src in [root.join("src"), root.join("../src")] {
        let g = graph(&src);
        assert!(!g.is_empty(), "{}: no modules found", src.display());
        if let Some(c) = cycle(&g) {
            panic!("{}: import cycle {}", src.display(), c.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        cycle(&g).unwrap(),
        vec!["a".to_string(), "b".into(), "c".into(), "a".into()]
    );
    // The vocabulary stays at the bottom: `model` names no module but `pricing`.
    let real = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let model: Vec<&String> = real.get("model").into_iter().flatten().collect();
    assert!(model.iter().all(|m| *m == "pricing"), "{model:?}");
}

/// The HTTP routes never write to the store: they hold a `StoreReader` and call the actors'
/// handles (`Accounts`, `Outbox`, `Webhooks`) for every change.
#[test]
fn routes_hold_only_the_read_only_store_view() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let mut files = vec![root.join("http.rs")];
    rust_files(&root.join("http"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let words = code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            assert!(
                !words.into_iter().any(|w| w == "Store"),
                "{}:{}: a route names the writable `Store`: {line}",
                f.display(),
                n + 1
            );
        }
    }
}
