//! The architecture rules a reader relies on, checked on the source tree:
//! - generated protobuf types (`sc_proto`) appear only in each daemon's gRPC edge module;
//! - sc-worker's modules form no cycle (each room of the publish path is crossed once).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Each daemon crate's source files allowed to name `sc_proto`: its edge modules.
const EDGES: &[(&str, &[&str])] = &[
    ("sc-worker", &["broker_link.rs"]),
    // The sc.broker.v1 server, and the client of the key hand-over between brokers.
    ("sc-broker", &["grpc.rs", "handover.rs"]),
    // The sc.master.v1 server; the sc.metrics.v1 clients (`GET /metrics`, the page's samples).
    ("sc-master", &["grpc.rs", "metrics.rs", "samples/scrape.rs"]),
    // The sc.master.v1 client; the sc.metrics.v1 server every member runs.
    ("sc-common", &["master_link.rs", "metrics.rs"]),
    ("sc-balancer", &[]),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every `.rs` file under `dir`, as paths relative to `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// The code of a file without its comments (line comments and doc comments) and without its
/// unit tests (which may build generated values as fixtures).
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let without_tests = text.split("\n#[cfg(test)]\nmod tests").next().unwrap_or_default().to_owned();
    without_tests
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn generated_types_stay_at_each_daemons_edge() {
    let mut offenders = Vec::new();
    for (krate, edges) in EDGES {
        let src = root().join("crates").join(krate).join("src");
        for file in sources(&src) {
            let name = file.to_string_lossy().into_owned();
            if edges.contains(&name.as_str()) {
                continue;
            }
            if code(&src.join(&file)).contains("sc_proto") {
                offenders.push(format!("{krate}/src/{name}"));
            }
        }
    }
    assert!(offenders.is_empty(), "generated types outside the edge modules: {offenders:?}");
}

/// The top-level module a `crate::` path names, for every such path in `text`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::X, b}`: every first segment inside the braces.
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String =
                    item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    modules.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            modules.insert(name);
        }
    }
    modules
}

#[test]
fn worker_modules_form_no_cycle() {
    let src = root().join("crates/sc-worker/src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&src) {
        // `foo.rs` and `foo/bar.rs` are one room: `foo`.
        let module = file
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = code(&src.join(&file));
        // Unit tests may reach anywhere.
        let text = text.split("#[cfg(test)]").next().unwrap_or("");
        let uses = graph.entry(module.clone()).or_default();
        for used in crate_paths(text) {
            if used != module {
                uses.insert(used);
            }
        }
    }
    assert!(graph.contains_key("broker_link") && graph.contains_key("hub"), "modules found: {graph:?}");

    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("module cycle in sc-worker: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_check_sees_braced_and_plain_paths() {
    let found = crate_paths("use crate::{a::X, b};\nlet x = crate::c::f();");
    assert_eq!(found, ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect());
}
