//! `check-modules`: the forwarder's top-level modules (`src/*.rs`,
//! `src/*/mod.rs`, and the crate root itself, `lib`) must not import each
//! other in a cycle, so that each can be read, tested and changed from the
//! bottom up.
//!
//! A small scanner rather than a parser: it follows the `mod x;`
//! declarations from `src/lib.rs`, drops comments, strings and char
//! literals, and reads every path that starts at the crate root (`crate::`,
//! `$crate::`, enough `super::` to reach it, or a bare module name in
//! `lib.rs`), grouped `use crate::{a, b::c}` included. An item of `lib.rs`
//! itself is an edge to `lib`, unless `lib.rs` only re-exports it
//! (`pub use config::Config`). Test code (`#[cfg(test)]`) counts too: a
//! module's tests are part of what it depends on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The name of the crate root's own node.
const ROOT: &str = "lib";

/// Why `from` uses `to`: the first place found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    pub file: PathBuf,
    pub line: usize,
}

/// Top-level modules and who uses whom.
#[derive(Debug, Default)]
pub struct Graph {
    pub modules: BTreeSet<String>,
    pub edges: BTreeMap<String, BTreeMap<String, Evidence>>,
}

impl Graph {
    pub fn edge_count(&self) -> usize {
        self.edges.values().map(BTreeMap::len).sum()
    }

    /// Per strongly connected component of more than one module: its
    /// members, and the shortest cycle through the first of them.
    pub fn cycles(&self) -> Vec<(Vec<String>, Vec<String>)> {
        let mut cycles = Vec::new();
        let mut seen = BTreeSet::new();
        for start in &self.modules {
            if seen.contains(start) {
                continue;
            }
            if let Some(cycle) = self.cycle_through(start) {
                let from_start = self.reachable(start);
                let component: Vec<String> = from_start
                    .into_iter()
                    .filter(|m| self.reachable(m).contains(start))
                    .collect();
                seen.extend(component.iter().cloned());
                cycles.push((component, cycle));
            }
        }
        cycles
    }

    fn reachable(&self, start: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.to_string()];
        while let Some(at) = stack.pop() {
            for next in self.uses(&at) {
                if seen.insert(next.to_string()) {
                    stack.push(next.to_string());
                }
            }
        }
        seen
    }

    /// The shortest path from `start` back to itself, if any (breadth first).
    fn cycle_through(&self, start: &str) -> Option<Vec<String>> {
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        while let Some(at) = queue.pop_front() {
            for next in self.uses(at) {
                if next == start {
                    let mut path = vec![at.to_string()];
                    let mut cur = at;
                    while cur != start {
                        cur = parent[cur];
                        path.push(cur.to_string());
                    }
                    path.reverse();
                    return Some(path);
                }
                if !parent.contains_key(next) {
                    parent.insert(next, at);
                    queue.push_back(next);
                }
            }
        }
        None
    }

    fn uses(&self, module: &str) -> impl Iterator<Item = &str> {
        self.edges
            .get(module)
            .into_iter()
            .flat_map(|m| m.keys().map(String::as_str))
    }

    /// One line per module: what it uses.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for m in &self.modules {
            let uses: Vec<&str> = self.uses(m).collect();
            let uses = if uses.is_empty() {
                "(nothing)".to_string()
            } else {
                uses.join(", ")
            };
            let _ = writeln!(out, "  {m} -> {uses}");
        }
        out
    }
}

/// Scans the crate whose `lib.rs` is `src/lib.rs` under `src`.
pub fn scan(src: &Path) -> io::Result<Graph> {
    let root = fs::read_to_string(src.join("lib.rs"))?;
    let root_tokens = tokenize(&root);
    let top: Vec<String> = child_mods(&root_tokens);
    let reexports = reexports(&root_tokens, &top);
    let mut graph = Graph {
        modules: top.iter().cloned().chain([ROOT.to_string()]).collect(),
        edges: BTreeMap::new(),
    };
    let ctx = Ctx {
        top: &top,
        reexports: &reexports,
    };
    let mut files = vec![(src.join("lib.rs"), Vec::<String>::new())];
    while let Some((file, path)) = files.pop() {
        let text = fs::read_to_string(&file)?;
        let tokens = tokenize(&text);
        for (name, child) in file_mods(&file, &path, &tokens) {
            let mut p = path.clone();
            p.push(name);
            files.push((child, p));
        }
        let from = path.first().map_or(ROOT, String::as_str).to_string();
        for (to, line) in ctx.crate_paths(&tokens, &path) {
            if to != from {
                graph
                    .edges
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert(Evidence {
                        file: file.clone(),
                        line,
                    });
            }
        }
    }
    Ok(graph)
}

/// Runs the check: the graph and either its cycles (an error) or one line.
pub fn check(src: &Path) -> Result<String, String> {
    let graph = scan(src).map_err(|e| format!("reading {}: {e}", src.display()))?;
    let mut report = format!("module graph (what each uses):\n{}", graph.render());
    let shown = |file: &Path| {
        let base = src.parent().unwrap_or(src);
        file.strip_prefix(base)
            .unwrap_or(file)
            .display()
            .to_string()
    };
    let cycles = graph.cycles();
    if cycles.is_empty() {
        let _ = write!(
            report,
            "module graph: {} modules, {} edges, no cycle",
            graph.modules.len(),
            graph.edge_count()
        );
        return Ok(report);
    }
    for (component, cycle) in &cycles {
        let _ = writeln!(report, "cycle: {} -> {}", cycle.join(" -> "), cycle[0]);
        let _ = writeln!(report, "  (all in one cycle: {})", component.join(", "));
        for (i, from) in cycle.iter().enumerate() {
            let to = &cycle[(i + 1) % cycle.len()];
            let e = &graph.edges[from][to];
            let _ = writeln!(report, "  {from} -> {to}: {}:{}", shown(&e.file), e.line);
        }
    }
    let _ = write!(
        report,
        "module graph: {} modules, {} edges, {} cycle(s)",
        graph.modules.len(),
        graph.edge_count(),
        cycles.len()
    );
    Err(report)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Tokens with their line, comments, strings and char literals dropped.
fn tokenize(text: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            '/' if at(i + 1) == '/' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if at(i + 1) == '*' => {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && at(i + 1) == '*' {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && at(i + 1) == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        line += usize::from(chars[i] == '\n');
                        i += 1;
                    }
                }
            }
            '"' => i = skip_string(&chars, i + 1, &mut line),
            '\'' => {
                // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a).
                if at(i + 1) == '\\' {
                    i += 2;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if at(i + 2) == '\'' {
                    line += usize::from(at(i + 1) == '\n');
                    i += 3;
                } else {
                    i += 1;
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                // Raw and byte strings: r"..", r#".."#, b"..", br#".."#.
                if matches!(word.as_str(), "r" | "br" | "b" | "cr" | "c")
                    && matches!(at(i), '"' | '#')
                {
                    let mut hashes = 0;
                    while at(i + hashes) == '#' {
                        hashes += 1;
                    }
                    if at(i + hashes) == '"' {
                        let raw = word.contains('r');
                        i = if raw {
                            skip_raw_string(&chars, i + hashes + 1, hashes, &mut line)
                        } else {
                            skip_string(&chars, i + 1, &mut line)
                        };
                        continue;
                    }
                }
                if word == "r" && at(i) == '#' {
                    // A raw identifier: r#type.
                    i += 1;
                    continue;
                }
                out.push((Tok::Ident(word), line));
            }
            ':' if at(i + 1) == ':' => {
                out.push((Tok::PathSep, line));
                i += 2;
            }
            c if c.is_whitespace() => i += 1,
            c => {
                out.push((Tok::Punct(c), line));
                i += 1;
            }
        }
    }
    out
}

/// Past the closing quote of an escaped string that starts at `i`.
fn skip_string(chars: &[char], mut i: usize, line: &mut usize) -> usize {
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            c => {
                *line += usize::from(c == '\n');
                i += 1;
            }
        }
    }
    i
}

/// Past the closing `"###` of a raw string that starts at `i`.
fn skip_raw_string(chars: &[char], mut i: usize, hashes: usize, line: &mut usize) -> usize {
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        *line += usize::from(chars[i] == '\n');
        i += 1;
    }
    i
}

fn ident(tokens: &[(Tok, usize)], i: usize) -> Option<&str> {
    match tokens.get(i) {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

fn is(tokens: &[(Tok, usize)], i: usize, t: &Tok) -> bool {
    tokens.get(i).map(|(x, _)| x) == Some(t)
}

/// The `mod x;` declared at the outermost level of a file.
fn child_mods(tokens: &[(Tok, usize)]) -> Vec<String> {
    let mut mods = Vec::new();
    let mut depth = 0usize;
    for (i, (t, _)) in tokens.iter().enumerate() {
        match t {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => depth = depth.saturating_sub(1),
            Tok::Ident(w) if w == "mod" && depth == 0 => {
                if let Some(name) = ident(tokens, i + 1) {
                    if is(tokens, i + 2, &Tok::Punct(';')) {
                        mods.push(name.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    mods
}

/// The files of the `mod x;` a file declares, at any depth of inline modules.
fn file_mods(file: &Path, path: &[String], tokens: &[(Tok, usize)]) -> Vec<(String, PathBuf)> {
    let is_dir_owner = path.is_empty()
        || file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
    let base = if is_dir_owner {
        file.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        file.with_extension("")
    };
    let mut out = Vec::new();
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    for (i, (t, _)) in tokens.iter().enumerate() {
        match t {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(w) if w == "mod" => {
                let Some(name) = ident(tokens, i + 1) else {
                    continue;
                };
                if is(tokens, i + 2, &Tok::Punct('{')) {
                    inline.push((name.to_string(), depth));
                } else if is(tokens, i + 2, &Tok::Punct(';')) {
                    let mut dir = base.clone();
                    for (m, _) in &inline {
                        dir.push(m);
                    }
                    let flat = dir.join(format!("{name}.rs"));
                    let nested = dir.join(name).join("mod.rs");
                    let child = if flat.exists() { flat } else { nested };
                    out.push((name.to_string(), child));
                }
            }
            _ => {}
        }
    }
    out
}

/// `pub use m::...::Item;` in `lib.rs`: `crate::Item` is `m`'s.
fn reexports(tokens: &[(Tok, usize)], top: &[String]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for i in 0..tokens.len() {
        let (Some("pub"), Some("use"), Some(m)) =
            (ident(tokens, i), ident(tokens, i + 1), ident(tokens, i + 2))
        else {
            continue;
        };
        if !top.iter().any(|t| t == m) {
            continue;
        }
        let mut j = i + 3;
        let mut last = None;
        while let Some((t, _)) = tokens.get(j) {
            match t {
                Tok::Ident(w) if w != "as" => last = Some(w.clone()),
                Tok::Punct(';') => break,
                // Grouped re-exports are rare in a crate root: each name counts.
                Tok::Punct(',' | '}') => {
                    if let Some(name) = last.take() {
                        map.insert(name, m.to_string());
                    }
                }
                _ => {}
            }
            j += 1;
        }
        if let Some(name) = last {
            map.insert(name, m.to_string());
        }
    }
    map
}

struct Ctx<'a> {
    top: &'a [String],
    reexports: &'a BTreeMap<String, String>,
}

impl Ctx<'_> {
    /// The top-level module (or `lib`) each crate-rooted path reaches.
    fn crate_paths(&self, tokens: &[(Tok, usize)], file_path: &[String]) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut inline: Vec<(String, usize)> = Vec::new();
        let mut depth = 0usize;
        let mut i = 0;
        while i < tokens.len() {
            let (t, line) = &tokens[i];
            match t {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    depth = depth.saturating_sub(1);
                    if inline.last().is_some_and(|(_, d)| *d == depth) {
                        inline.pop();
                    }
                }
                Tok::Ident(w) if w == "mod" && is(tokens, i + 2, &Tok::Punct('{')) => {
                    if let Some(name) = ident(tokens, i + 1) {
                        inline.push((name.to_string(), depth));
                    }
                }
                Tok::Ident(w)
                    if w == "crate"
                        && is(tokens, i + 1, &Tok::PathSep)
                        && !is_after_path_sep(tokens, i) =>
                {
                    self.tree(tokens, i + 2, *line, &mut out);
                }
                Tok::Ident(w) if w == "super" && !is_after_path_sep(tokens, i) => {
                    let mut here: Vec<&str> = file_path
                        .iter()
                        .map(String::as_str)
                        .chain(inline.iter().map(|(m, _)| m.as_str()))
                        .collect();
                    let mut j = i;
                    while ident(tokens, j) == Some("super") && is(tokens, j + 1, &Tok::PathSep) {
                        here.pop();
                        j += 2;
                    }
                    if j > i && here.is_empty() {
                        self.tree(tokens, j, *line, &mut out);
                    }
                    i = j.max(i + 1);
                    continue;
                }
                // In the crate root, a module's bare name starts a path.
                Tok::Ident(w)
                    if file_path.is_empty()
                        && inline.is_empty()
                        && self.top.contains(w)
                        && is(tokens, i + 1, &Tok::PathSep)
                        && !is_after_path_sep(tokens, i) =>
                {
                    out.push((w.clone(), *line));
                }
                _ => {}
            }
            i += 1;
        }
        out
    }

    /// Reads the path tree after `crate::` at `i`: `a::..`, `{a, b::c}`, `*`.
    fn tree(&self, tokens: &[(Tok, usize)], i: usize, line: usize, out: &mut Vec<(String, usize)>) {
        match tokens.get(i) {
            Some((Tok::Ident(first), _)) => out.push((self.owner(first), line)),
            Some((Tok::Punct('{'), _)) => {
                let mut depth = 0;
                let mut j = i;
                let mut expect_first = true;
                while let Some((t, l)) = tokens.get(j) {
                    match t {
                        Tok::Punct('{') => {
                            depth += 1;
                            expect_first = depth == 1;
                        }
                        Tok::Punct('}') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        Tok::Punct(',') => expect_first = depth == 1,
                        Tok::Ident(w) if expect_first => {
                            out.push((self.owner(w), *l));
                            expect_first = false;
                        }
                        Tok::Punct('*') if expect_first => {
                            out.push((ROOT.to_string(), *l));
                            expect_first = false;
                        }
                        _ => expect_first = false,
                    }
                    j += 1;
                }
            }
            _ => out.push((ROOT.to_string(), line)),
        }
    }

    /// The module that owns `crate::name`.
    fn owner(&self, name: &str) -> String {
        if self.top.iter().any(|t| t == name) {
            name.to_string()
        } else if let Some(m) = self.reexports.get(name) {
            m.clone()
        } else {
            ROOT.to_string()
        }
    }
}

/// `x::crate` or `x::super` is not a path from the root.
fn is_after_path_sep(tokens: &[(Tok, usize)], i: usize) -> bool {
    i > 0 && is(tokens, i - 1, &Tok::PathSep)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway crate source tree under the system temp dir.
    fn tree(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-modules-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn finds_a_cycle_through_a_submodule_and_a_grouped_use() {
        let src = tree(
            "cycle",
            &[
                ("lib.rs", "pub mod a;\nmod b;\nmod c;\n"),
                ("a/mod.rs", "mod inner;\n"),
                ("a/inner.rs", "use crate::{c::X, b};\n"),
                ("b.rs", "fn f() { super::a::g() }\n"),
                ("c.rs", "use crate::b::Y;\n"),
            ],
        );
        let err = check(&src).unwrap_err();
        fs::remove_dir_all(&src).unwrap();
        assert!(err.contains("cycle: a -> b -> a"), "{err}");
        assert!(err.contains("a/inner.rs:1"), "{err}");
        assert!(err.contains("(all in one cycle: a, b, c)"), "{err}");
        assert!(err.ends_with("4 modules, 4 edges, 1 cycle(s)"), "{err}");
    }

    #[test]
    fn comments_strings_and_local_super_are_not_edges() {
        let src = tree(
            "clean",
            &[
                (
                    "lib.rs",
                    "pub mod a;\nmod b;\npub use b::Thing;\nfn run() { a::go(); }\n",
                ),
                (
                    "a.rs",
                    "// crate::b::x\n/* crate::b */ const S: &str = \"crate::b::y\";\n\
                     const R: &str = r#\"crate::b\"#; fn f<'a>(c: char) -> char { '\"' }\n\
                     #[cfg(test)] mod tests { use super::*; }\n",
                ),
                ("b.rs", "pub struct Thing; use crate::Thing as _;\n"),
            ],
        );
        let ok = check(&src).unwrap();
        fs::remove_dir_all(&src).unwrap();
        assert!(ok.contains("lib -> a, b\n"), "{ok}");
        assert!(ok.contains("a -> (nothing)"), "{ok}");
        assert!(ok.ends_with("3 modules, 2 edges, no cycle"), "{ok}");
    }

    #[test]
    fn an_item_of_the_crate_root_is_an_edge_to_lib() {
        let src = tree(
            "root",
            &[
                (
                    "lib.rs",
                    "mod a;\npub const X: u8 = 1;\nfn f() { a::g() }\n",
                ),
                ("a.rs", "pub fn g() -> u8 { crate::X }\n"),
            ],
        );
        let err = check(&src).unwrap_err();
        fs::remove_dir_all(&src).unwrap();
        assert!(err.contains("cycle: a -> lib -> a"), "{err}");
    }
}
