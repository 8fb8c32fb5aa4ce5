//! The crate's layering, checked from its source: every `crate::`/`super::` path in `src/`
//! (test code excluded) is an edge from the module that writes it to the module it names.
//! Edges point down the pipeline — a module may use modules of its own layer or of layers
//! below — and no modules import each other, directly or round a longer loop.
//!
//! `cargo test --test it layers` runs it; it needs no database and no network. When a module
//! is added, it gets a place in `LAYERS` (the test says so), which is also the map that
//! `ARCHITECTURE.md` draws.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. An entry names a module or a folder of modules (its whole subtree).
const LAYERS: &[(&str, &[&str])] = &[
    // Pure values and small process-level helpers: no database, no network, no run folder.
    (
        "core",
        &[
            "models",
            "plan::tokens",
            "plan::request",
            "plan::sharder",
            "tsv",
            "output",
            "crashpoint",
            "exit",
            "interrupt",
            "printer",
        ],
    ),
    // The run folder: its layout, run.json and its serde types, the state machine, the lock,
    // finding runs.
    ("run", &["run", "runs"]),
    // Reading a run back.
    ("report", &["status"]),
    // The outside world: the database, the batch provider, and the emulator of it.
    ("services", &["pg", "provider", "emulator"]),
    // Validated settings of each command (they name pg's source settings and the printer's).
    ("config", &["config"]),
    // The realtime path, beside the batch path: it never touches a run.
    ("realtime", &["realtime"]),
    // The stages of a run.
    ("plan", &["plan"]),
    ("advance", &["advance"]),
    ("sync", &["sync"]),
    // Arguments, dispatch, and the test support that drives the whole.
    ("top", &["cli", "crate", "testkit"]),
];

/// The emulator is a product module of its own: it uses nothing of the product but the token
/// counter.
const EMULATOR_MAY_USE: &[&str] = &["plan::tokens"];

#[test]
fn imports_point_down_the_pipeline_and_never_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = source_files(&src);
    let modules: BTreeSet<String> = files.keys().cloned().collect();

    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &files {
        let text = fs_err::read_to_string(path).unwrap();
        let code = production_code(&text);
        // A parent naming its own child by a relative path (`ingest::DbContext`) is an edge too.
        for child in children(&code) {
            let child_module = if module == "crate" {
                child.clone()
            } else {
                format!("{module}::{child}")
            };
            if modules.contains(&child_module) && mentions(&code, &format!("{child}::")) {
                edges
                    .entry(module.clone())
                    .or_default()
                    .insert(child_module);
            }
        }
        for reference in references(&code) {
            let absolute = match reference.strip_prefix("super::") {
                Some(rest) => format!("{}::{rest}", parent(module)),
                None => reference.clone(),
            };
            let target = resolve(&modules, &absolute)
                .unwrap_or_else(|| panic!("{module}: cannot resolve `{reference}`"));
            if target != *module {
                edges.entry(module.clone()).or_default().insert(target);
            }
        }
    }

    let mut upward = Vec::new();
    for (from, targets) in &edges {
        let from_rank = rank(from);
        for to in targets {
            // A folder's `mod.rs` re-exporting or documenting its children is not an edge up.
            if to.starts_with(&format!("{from}::")) && from != "crate" {
                continue;
            }
            if rank(to) > from_rank {
                upward.push(format!(
                    "{from} ({}) uses {to} ({})",
                    LAYERS[from_rank].0,
                    LAYERS[rank(to)].0
                ));
            }
            if from.starts_with("emulator")
                && !to.starts_with("emulator")
                && !EMULATOR_MAY_USE.contains(&to.as_str())
            {
                upward.push(format!(
                    "{from} uses {to}: the emulator may use only tokens"
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports against the layer order:\n{}",
        upward.join("\n")
    );

    let cycles = cycles(&edges);
    assert!(cycles.is_empty(), "import cycles: {cycles:?}");
    let n_edges: usize = edges.values().map(BTreeSet::len).sum();
    eprintln!(
        "{} modules, {n_edges} import edges, cycles: {cycles:?}",
        modules.len()
    );
}

/// Module path (`pg::conn`, `crate` for `lib.rs`) → file, for every production source file.
fn source_files(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut files = BTreeMap::new();
    let mut folders = vec![src.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in fs_err::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            let relative = path.strip_prefix(src).unwrap().with_extension("");
            let parts: Vec<String> = relative
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect();
            let file = parts.last().unwrap().as_str();
            // Test files and the binary are not the library's modules.
            if path.extension().is_none_or(|ext| ext != "rs")
                || file == "tests"
                || file.ends_with("_tests")
                || parts == ["main"]
            {
                continue;
            }
            let module = match file {
                "lib" => "crate".to_owned(),
                "mod" => parts[..parts.len() - 1].join("::"),
                _ => parts.join("::"),
            };
            files.insert(module, path);
        }
    }
    files
}

/// The text without comments and without inline `#[cfg(test)] mod … { … }` blocks.
fn production_code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.starts_with("mod ") && next.ends_with('{'))
        {
            // Top-level test modules end at the first `}` in the first column.
            for skipped in lines.by_ref() {
                if skipped == "}" {
                    break;
                }
            }
            continue;
        }
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// The modules a file declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn children(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub(crate) mod ")
                .or_else(|| line.strip_prefix("pub mod "))
                .or_else(|| line.strip_prefix("mod "))?;
            Some(rest.strip_suffix(';')?.to_owned())
        })
        .collect()
}

/// Whether `code` uses `path` as a relative path (not as the tail of a longer one).
fn mentions(code: &str, path: &str) -> bool {
    code.match_indices(path).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    })
}

/// Every path that starts with `crate::` or `super::`, with `{…}` groups expanded.
fn references(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start) {
            let begin = from + at;
            from = begin + start.len();
            let before = code[..begin].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let root = start.trim_end_matches("::");
            expand(root, &code[from..], &mut found);
        }
    }
    found
}

/// Reads the path after `prefix::` (`a::b`, or a group `{a, b::{c, d}}`) into full paths.
fn expand(prefix: &str, rest: &str, found: &mut Vec<String>) {
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0;
        let mut item_start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand_item(prefix, &group[item_start..i], found);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_item(prefix, &group[item_start..i], found);
                    item_start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let path: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect();
    let path = path.trim_end_matches(':');
    if rest[path.len()..].starts_with("::{") {
        expand(&format!("{prefix}::{path}"), &rest[path.len() + 2..], found);
    } else if path.is_empty() {
        found.push(prefix.to_owned());
    } else {
        found.push(format!("{prefix}::{path}"));
    }
}

fn expand_item(prefix: &str, item: &str, found: &mut Vec<String>) {
    let item = item.trim();
    if item.is_empty() || item == "self" || item.starts_with("self ") {
        found.push(prefix.to_owned());
    } else {
        expand(prefix, item, found);
    }
}

/// `pg::conn` → `crate::pg`; a top-level module's parent is `crate`.
fn parent(module: &str) -> String {
    match module.rsplit_once("::") {
        Some((parent, _)) => format!("crate::{parent}"),
        None => "crate".to_owned(),
    }
}

/// The module a `crate::…` path names: its longest prefix that is a module.
fn resolve(modules: &BTreeSet<String>, path: &str) -> Option<String> {
    let inner = path.strip_prefix("crate")?.trim_start_matches("::");
    let segments: Vec<&str> = inner.split("::").filter(|s| !s.is_empty()).collect();
    (0..=segments.len()).rev().find_map(|n| {
        let candidate = if n == 0 {
            "crate".to_owned()
        } else {
            segments[..n].join("::")
        };
        modules.contains(&candidate).then_some(candidate)
    })
}

/// The layer of a module: of the longest `LAYERS` entry that is the module or its folder.
fn rank(module: &str) -> usize {
    LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (_, entries))| entries.iter().map(move |entry| (i, *entry)))
        .filter(|(_, entry)| module == *entry || module.starts_with(&format!("{entry}::")))
        .max_by_key(|(_, entry)| entry.len())
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("module {module} has no place in LAYERS; give it one"))
}

/// The strongly connected components of more than one module (Tarjan's algorithm).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !tarjan.index.contains_key(v.as_str()) {
            tarjan.visit(v);
        }
    }
    tarjan.found
}
