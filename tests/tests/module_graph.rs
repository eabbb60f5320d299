//! Inside each program, modules depend one way: no two top-level modules
//! import each other, directly or through others. Read from the sources, so
//! a new `use crate::...` that closes a circle fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it names as `crate::<name>`.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    let mut files = Vec::new();
    collect(src, &mut files);
    let test_only = test_only_modules(&files);
    for file in files {
        let relative = file.strip_prefix(src).unwrap().with_extension("");
        let parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().to_string()).collect();
        let top = parts[0].clone();
        if matches!(top.as_str(), "lib" | "main" | "bin") || parts.iter().any(|p| test_only.contains(p)) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may reach anywhere.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let deps = graph.entry(top.clone()).or_default();
        for name in crate_paths(code) {
            if name != top {
                deps.insert(name);
            }
        }
    }
    graph
}

/// Every top-level name a file reaches as `crate::name` or `use crate::{name, ...}`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_lowercase()) {
                names.insert(name);
            }
        }
    }
    names
}

/// Modules declared under `#[cfg(test)]`.
fn test_only_modules(files: &[PathBuf]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.windows(2) {
            if pair[0].trim() == "#[cfg(test)]" {
                let declared = pair[1].trim().trim_start_matches("pub ").trim_start_matches("mod ");
                if pair[1].contains("mod ") && declared.ends_with(';') {
                    names.insert(declared.trim_end_matches(';').to_string());
                }
            }
        }
    }
    names
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The circles in `graph`: pairs of modules each of which reaches the other.
fn circles(graph: &Graph) -> Vec<(String, String)> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(module) = stack.pop() {
            for next in graph.get(&module).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let mut found = Vec::new();
    for (module, deps) in graph {
        for dep in deps {
            if module < dep && reach(dep).contains(module) {
                found.push((module.clone(), dep.clone()));
            }
        }
    }
    found
}

#[test]
fn every_programs_modules_depend_one_way() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for program in ["operator", "session-pod", "cli", "agent", "protocol", "wire", "crds", "serve", "tube"] {
        let graph = graph(&workspace.join(program).join("src"));
        assert!(graph.len() > 1 || ["wire", "serve"].contains(&program), "{program}: no modules found");
        let found = circles(&graph);
        assert!(found.is_empty(), "{program}: modules that import each other: {found:?}\n{graph:#?}");
    }
}

#[test]
fn a_circle_is_found() {
    let mut graph = Graph::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert!(circles(&graph).is_empty());
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(circles(&graph), [("a".to_string(), "b".to_string()), ("b".to_string(), "c".to_string())]);
    assert_eq!(
        crate_paths("use crate::{foo, bar::Baz};\nlet x = crate::qux::f(); crate::Error"),
        BTreeSet::from(["bar".to_string(), "foo".into(), "qux".into()])
    );
}
