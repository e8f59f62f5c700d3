//! The docs check: every command in README.md and docs/*.md is one that the
//! repository's scripts or tests run, or is visibly marked as one they
//! cannot; every flag the docs give the binary exists; every relative link
//! between the docs resolves. docs/development.md ("The docs check") says
//! the same for readers. This file is over 500 lines because the rules and
//! the tests that show each of them failing belong together.
//!
//! The rules:
//!
//! 1. **Fences.** Every fenced block names its language: a bare ``` fails, so
//!    that no command can hide in an unlabelled block. `sh`, `bash`, `shell`
//!    and `console` blocks hold commands; any other (`text`, `json`, `toml`,
//!    `yaml`) holds none.
//! 2. **Command lines.** In a command block, a line ending in `\` goes on
//!    on the next line, and so does one ending in `|`, `&&` or `||`. A `#`
//!    that starts a word outside quotes starts a comment. A line that is
//!    empty without its comment holds no command. Whitespace is collapsed.
//! 3. **Marks.** A command is marked when its own comment, or a
//!    comment-only line above it in the same block, says `on a Kata host`
//!    (it needs a real Kata host, which CI has not) or `not run by CI` (a
//!    developer's command that CI does not run, and the reader is told so).
//! 4. **Unmarked commands are run by the repository.** With `sudo ` before
//!    it and `./` before any word dropped (on both sides), a command passes
//!    when:
//!    - a. it appears whole in a line of a file under scripts/, tests/, .ci/,
//!      crates/, deploy/ or dist/ (this file excepted; continuations joined;
//!      comment lines and trailing shell comments left out), where a
//!      command starts (the line's start, after one of `(;|&!{`, or after
//!      a word of `COMMAND_WORDS` such as `exec` or `bash`) and ends (the
//!      line's end, or one of `;|&)"`), so that neither
//!      `kata-trace-forwarder --help` nor `Name: kata-trace-forwarder`
//!      passes `kata-trace-forwarder` alone;
//!    - b. it runs one of scripts/*, and every option (`-x`, `--x`) it passes
//!      appears in that script, or, when the script hands `"$@"` on, in a
//!      file under crates/ (bench.sh passes its arguments to the harness);
//!    - c. it runs `kata-trace-forwarder` with at least one flag, and its
//!      flags (without `=value`), in order, are consecutive among the
//!      flag-like string literals of one file under tests/: the tests pass
//!      values made at run time (ports, temporary paths), so values are
//!      not compared.
//! 5. **Flags.** Every flag given to `kata-trace-forwarder`, marked or not,
//!    is listed by its `--help` (a subcommand's by `SUB --help`).
//! 6. **Links.** Every relative link `[..](target)` outside code resolves to
//!    a file or directory, and a `#anchor` to a heading of the target
//!    Markdown file, slugged as GitHub does.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::BIN;

/// The phrases that mark a command (rule 3).
const MARKS: &[&str] = &["on a Kata host", "not run by CI"];

/// Where the commands that run the repository live (rule 4a).
const CORPUS_DIRS: &[&str] = &["scripts", "tests", ".ci", "crates", "deploy", "dist"];

const COMMAND_LANGS: &[&str] = &["sh", "bash", "shell", "console"];

const PROGRAM: &str = "kata-trace-forwarder";

/// One command line of a doc.
#[derive(Debug)]
struct DocCommand {
    file: String,
    line: usize,
    text: String,
    marked: bool,
}

/// Everything the checks need from the repository, so that tests can plant
/// their own.
#[derive(Default)]
struct Repo {
    /// Normalised non-comment lines of every corpus file (rule 4a).
    lines: Vec<String>,
    /// Flag-like string literals, in order, per Rust file under tests/ (rule 4c).
    test_flags: Vec<Vec<String>>,
    /// scripts/ by file name: their text (rule 4b).
    scripts: HashMap<String, String>,
    /// The text of every file under crates/ (rule 4b, `"$@"`).
    crates_text: String,
    /// Flags `--help` lists, per subcommand ("" for the top level); `None`:
    /// the binary has no such subcommand.
    help: HashMap<String, Option<BTreeSet<String>>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Text files under `dir`, recursively, in a stable order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            if e.file_name() != "target" && e.file_name() != ".git" {
                walk(&path, out);
            }
        } else if ft.is_file() && e.metadata().map(|m| m.len() < 1 << 20).unwrap_or(false) {
            out.push(path);
        }
    }
}

/// README.md and docs/*.md, as (path relative to the root, text).
fn doc_files() -> Vec<(String, String)> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (rel(&p), text)
        })
        .collect()
}

/// The comment of a shell line, split off: `#` starting a word outside
/// quotes (rule 2).
fn split_comment(line: &str) -> (&str, &str) {
    let (mut single, mut double, mut escaped) = (false, false, false);
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' && !single {
            escaped = true;
        } else if c == '\'' && !double {
            single = !single;
        } else if c == '"' && !single {
            double = !double;
        } else if c == '#' && !single && !double && prev_space {
            return (&line[..i], &line[i + 1..]);
        }
        prev_space = c.is_whitespace();
    }
    (line, "")
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Rule 4's normal form: whitespace collapsed, `sudo ` in front dropped,
/// and `./` dropped where a word or a `$(`, `(` or quote starts.
fn normalise(s: &str) -> String {
    let s = collapse(s);
    let mut out = String::with_capacity(s.len());
    let mut prev: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let at_start = prev.is_none_or(|p| p == ' ' || "(\"'".contains(p));
        if c == '.' && at_start && chars.peek() == Some(&'/') {
            chars.next();
            continue;
        }
        out.push(c);
        prev = Some(c);
    }
    let mut s = out.as_str();
    while let Some(rest) = s.strip_prefix("sudo ") {
        s = rest;
    }
    s.to_string()
}

fn continues(code: &str) -> bool {
    let t = code.trim_end();
    t.ends_with('\\') || t.ends_with('|') || t.ends_with("&&")
}

/// The fence's language, if `line` opens or closes a fence.
fn fence(line: &str) -> Option<&str> {
    line.trim_start().strip_prefix("```").map(str::trim)
}

/// Command lines of one doc (rules 1 to 3); fence problems go to `problems`.
fn commands(file: &str, text: &str, problems: &mut Vec<String>) -> Vec<DocCommand> {
    let mut out = Vec::new();
    let mut in_block: Option<bool> = None; // Some(is a command block)
    let mut block_marked = false;
    let mut pending: Option<(usize, String, bool)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(lang) = fence(line) {
            match in_block {
                None => {
                    if lang.is_empty() {
                        problems.push(format!(
                            "{file}:{n}: a fence without a language (```text for output, ```sh for commands)"
                        ));
                    }
                    in_block = Some(COMMAND_LANGS.contains(&lang));
                    block_marked = false;
                }
                Some(_) => {
                    if let Some((start, text, marked)) = pending.take() {
                        out.push(DocCommand {
                            file: file.into(),
                            line: start,
                            text: collapse(&text),
                            marked,
                        });
                    }
                    in_block = None;
                }
            }
            continue;
        }
        if in_block != Some(true) {
            continue;
        }
        let (code, comment) = split_comment(line);
        let marks = MARKS.iter().any(|m| comment.contains(m));
        if code.trim().is_empty() && pending.is_none() {
            block_marked |= marks;
            continue;
        }
        let (start, mut joined, marked) =
            pending.take().unwrap_or((n, String::new(), block_marked));
        joined.push(' ');
        joined.push_str(code.trim_end().trim_end_matches('\\'));
        if continues(code) {
            pending = Some((start, joined, marked || marks));
        } else {
            out.push(DocCommand {
                file: file.into(),
                line: start,
                text: collapse(&joined),
                marked: marked || marks,
            });
        }
    }
    if in_block.is_some() {
        problems.push(format!("{file}: a fence is never closed"));
    }
    out
}

/// Shell words, quotes removed (enough for the docs' commands).
fn words(cmd: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut any = false;
    let (mut single, mut double) = (false, false);
    for c in cmd.chars() {
        match c {
            '\'' if !double => {
                single = !single;
                any = true;
            }
            '"' if !single => {
                double = !double;
                any = true;
            }
            c if c.is_whitespace() && !single && !double => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The flags and subcommand of each `kata-trace-forwarder` run in `cmd`
/// (after `sudo`, at the start of the command or of a part of a pipeline).
fn forwarder_runs(cmd: &str) -> Vec<(String, Vec<String>)> {
    let mut runs = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    let mut at_start = true;
    for w in words(cmd) {
        if ["|", "&&", "||", ";", "&"].contains(&w.as_str()) {
            runs.extend(current.take());
            at_start = true;
            continue;
        }
        if let Some((sub, flags)) = current.as_mut() {
            if w.starts_with('-') && w.len() > 1 {
                let flag = w.split('=').next().unwrap_or(&w).to_string();
                flags.push(flag);
            } else if flags.is_empty() && sub.is_empty() && !w.contains('/') && !w.contains('$') {
                *sub = w;
            }
            continue;
        }
        if at_start && w == "sudo" {
            continue;
        }
        if at_start && w.trim_start_matches("./") == PROGRAM {
            current = Some((String::new(), Vec::new()));
        }
        at_start = false;
    }
    runs.extend(current);
    runs
}

/// Words after which a command starts (rule 4a).
const COMMAND_WORDS: &[&str] = &[
    "exec", "bash", "sh", "then", "do", "else", "if", "nice", "time", "env",
];

/// Rule 4a: `needle` whole in `line`, where a command starts.
fn appears_whole(line: &str, needle: &str) -> bool {
    let mut from = 0;
    while let Some(at) = line[from..].find(needle) {
        let start = from + at;
        let end = start + needle.len();
        let before = line[..start].trim_end();
        let before_ok = before.is_empty()
            || before.ends_with(|c: char| "(;|&!{".contains(c))
            || COMMAND_WORDS.contains(&before.rsplit(' ').next().unwrap_or(""));
        let after_ok = line[end..]
            .chars()
            .next()
            .is_none_or(|c| ";|&)\"".contains(c));
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
    }
    false
}

/// String literals of Rust source, in order (enough for tests/: plain and
/// raw strings; char literals and lifetimes skipped; comments skipped).
fn rust_literals(src: &str) -> Vec<String> {
    let b: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            '/' if b.get(i + 1) == Some(&'/') => {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
            }
            '/' if b.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == '*' && b[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
            }
            'r' if matches!(b.get(i + 1), Some('"') | Some('#'))
                && (i == 0 || !(b[i - 1].is_alphanumeric() || b[i - 1] == '_')) =>
            {
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&'"') {
                    i += 1;
                    continue;
                }
                j += 1;
                let start = j;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                        break;
                    }
                    j += 1;
                }
                out.push(b[start..j.min(b.len())].iter().collect());
                i = j + 1 + hashes;
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                while i < b.len() && b[i] != '"' {
                    if b[i] == '\\' {
                        i += 1;
                    }
                    if let Some(&c) = b.get(i) {
                        s.push(c);
                    }
                    i += 1;
                }
                out.push(s);
                i += 1;
            }
            '\'' => {
                // '\x', 'x' or a lifetime.
                if b.get(i + 1) == Some(&'\\') {
                    i += 2;
                    while i < b.len() && b[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if b.get(i + 2) == Some(&'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

fn flag_literals(src: &str) -> Vec<String> {
    rust_literals(src)
        .into_iter()
        .filter(|s| s.starts_with('-') && s.len() > 1 && !s.contains(' '))
        .map(|s| s.split('=').next().unwrap_or(&s).to_string())
        .collect()
}

/// Flags a `--help` text lists.
fn help_flags(help: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for w in help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        let long = w.len() > 2
            && w.starts_with("--")
            && w[2..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric());
        let short = w.len() == 2 && w.starts_with('-') && w.as_bytes()[1].is_ascii_alphabetic();
        if long || short {
            out.insert(w.to_string());
        }
    }
    out
}

fn run_help(args: &[&str]) -> Option<BTreeSet<String>> {
    let out = Command::new(BIN).args(args).arg("--help").output().ok()?;
    out.status
        .success()
        .then(|| help_flags(&String::from_utf8_lossy(&out.stdout)))
}

impl Repo {
    fn load() -> Repo {
        let mut files = Vec::new();
        for d in CORPUS_DIRS {
            walk(&root().join(d), &mut files);
        }
        let this = root().join("tests/docs.rs");
        let mut repo = Repo::default();
        for f in files.iter().filter(|f| **f != this) {
            let Ok(text) = std::fs::read_to_string(f) else {
                continue;
            };
            let is_rust = f.extension().is_some_and(|e| e == "rs");
            repo.add_source(&text, is_rust);
            let r = rel(f);
            if is_rust && r.starts_with("tests/") {
                repo.test_flags.push(flag_literals(&text));
            }
            if let Some(name) = r.strip_prefix("scripts/") {
                repo.scripts.insert(name.to_string(), text.clone());
            }
            if r.starts_with("crates/") {
                repo.crates_text.push_str(&text);
            }
        }
        repo.help.insert(String::new(), run_help(&[]));
        repo
    }

    /// Rule 4a's lines of one source file.
    fn add_source(&mut self, text: &str, is_rust: bool) {
        let mut joined = String::new();
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with('#') || t.starts_with("//") {
                continue;
            }
            let code = if is_rust { line } else { split_comment(line).0 };
            joined.push(' ');
            joined.push_str(code.trim_end().trim_end_matches('\\'));
            if !code.trim_end().ends_with('\\') {
                self.lines.push(normalise(&joined));
                joined.clear();
            }
        }
        if !joined.is_empty() {
            self.lines.push(normalise(&joined));
        }
    }

    fn help_for(&mut self, sub: &str) -> Option<BTreeSet<String>> {
        if !self.help.contains_key(sub) {
            self.help.insert(sub.to_string(), run_help(&[sub]));
        }
        self.help[sub].clone()
    }

    /// Rule 4: why an unmarked command is run by the repository, if it is.
    fn runs(&self, cmd: &str) -> Option<String> {
        let norm = normalise(cmd);
        if self.lines.iter().any(|l| appears_whole(l, &norm)) {
            return Some("appears in the corpus".into());
        }
        let w = words(&norm);
        if let Some(script) = w.first().and_then(|p| p.strip_prefix("scripts/")) {
            let text = self.scripts.get(script)?;
            let passes_on = text.contains("\"$@\"");
            let ok = w[1..].iter().filter(|a| a.starts_with('-')).all(|a| {
                let opt = a.split('=').next().unwrap_or(a);
                text.contains(opt) || (passes_on && self.crates_text.contains(opt))
            });
            return ok.then(|| format!("runs scripts/{script}"));
        }
        if w.first().map(String::as_str) == Some(PROGRAM) {
            if let [(sub, flags)] = forwarder_runs(&norm).as_slice() {
                let found = sub.is_empty()
                    && !flags.is_empty()
                    && self
                        .test_flags
                        .iter()
                        .any(|lits| lits.windows(flags.len()).any(|win| win == flags.as_slice()));
                return found.then(|| "its flags are a test's".into());
            }
        }
        None
    }
}

/// Rules 1 to 5 over `docs`.
fn check_commands(docs: &[(String, String)], repo: &mut Repo) -> Vec<String> {
    let mut problems = Vec::new();
    for (file, text) in docs {
        for c in commands(file, text, &mut problems) {
            for (sub, flags) in forwarder_runs(&c.text) {
                let listed = repo.help_for(&sub);
                let Some(listed) = listed else {
                    problems.push(format!(
                        "{}:{}: `{PROGRAM} {sub}` is no subcommand of the binary: {}",
                        c.file, c.line, c.text
                    ));
                    continue;
                };
                for f in flags.iter().filter(|f| !listed.contains(*f)) {
                    problems.push(format!(
                        "{}:{}: {f} is not in `{PROGRAM} {sub} --help`: {}",
                        c.file, c.line, c.text
                    ));
                }
            }
            let why = if c.marked {
                Some("marked".to_string())
            } else {
                repo.runs(&c.text)
            };
            // Shown with --nocapture: what passed each command.
            println!(
                "{}:{}: {}: {}",
                c.file,
                c.line,
                why.as_deref().unwrap_or("FAILS"),
                c.text
            );
            if why.is_none() {
                problems.push(format!(
                    "{}:{}: no script or test runs this command, and it is not marked \
                     (# on a Kata host, # not run by CI): {}",
                    c.file, c.line, c.text
                ));
            }
        }
    }
    problems
}

/// GitHub's heading anchors of a Markdown text.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut in_code = false;
    for line in text.lines() {
        if fence(line).is_some() {
            in_code = !in_code;
            continue;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// Relative link targets of a Markdown text, with their lines; code left out.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_code = false;
    for (i, line) in text.lines().enumerate() {
        if fence(line).is_some() {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // Inline code spans are not links.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(k, _)| k % 2 == 0)
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .join(" ");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let target = &after[..end];
            if !target.contains("://") && !target.starts_with("mailto:") {
                out.push((i + 1, target.to_string()));
            }
            rest = &after[end..];
        }
    }
    out
}

/// Rule 6: `docs` are (path relative to `base`, text).
fn check_links(docs: &[(String, String)], base: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for (file, text) in docs {
        let dir = base
            .join(file)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for (n, target) in links(text) {
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let target_text = if path.is_empty() {
                text.clone()
            } else {
                let Ok(resolved) = dir.join(path).canonicalize() else {
                    problems.push(format!("{file}:{n}: link to {target}: no such file"));
                    continue;
                };
                std::fs::read_to_string(&resolved).unwrap_or_default()
            };
            if let Some(anchor) = anchor {
                if !anchors(&target_text).contains(anchor) {
                    problems.push(format!(
                        "{file}:{n}: link to {target}: no heading #{anchor} there"
                    ));
                }
            }
        }
    }
    problems
}

fn report(problems: &[String]) -> String {
    format!(
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    )
}

#[test]
fn every_command_in_the_docs_is_run_or_marked() {
    let docs = doc_files();
    let mut repo = Repo::load();
    assert!(
        repo.help[""].is_some(),
        "`{PROGRAM} --help` must succeed for the flag check"
    );
    let problems = check_commands(&docs, &mut repo);
    assert!(problems.is_empty(), "{}", report(&problems));
    // The check looked at something: the README's two commands at least.
    let mut none = Vec::new();
    let readme = commands("README.md", &docs[0].1, &mut none);
    let texts: Vec<&str> = readme.iter().map(|c| c.text.as_str()).collect();
    assert!(texts.contains(&"./scripts/demo.sh"), "{texts:?}");
    assert!(texts.contains(&"./scripts/test.sh"), "{texts:?}");
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let problems = check_links(&doc_files(), &root());
    assert!(problems.is_empty(), "{}", report(&problems));
}

/// The README's test command is exactly what CI runs.
#[test]
fn ci_runs_the_readmes_test_command() {
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    let mut repo = Repo::default();
    repo.add_source(&ci, false);
    assert!(repo.runs("./scripts/test.sh").is_some(), "{:?}", repo.lines);
}

// The checker itself, on planted docs: each rule can fail.

fn planted(doc: &str) -> Vec<String> {
    let mut repo = Repo::load();
    check_commands(&[("planted.md".to_string(), doc.to_string())], &mut repo)
}

/// Asserts that `doc` has exactly one problem, and that it says `needle`.
fn fails_once(doc: &str, needle: &str) {
    let problems = planted(doc);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains(needle), "{problems:?}");
}

#[test]
fn a_planted_unmarked_command_fails() {
    fails_once(
        "```sh\nkata-trace-forwarder --vsock-port 1234 --trace-name planted\n```\n",
        "planted.md:2: no script or test runs",
    );
    // A bare binary does not pass on the strength of `kata-trace-forwarder --help`.
    fails_once(
        "```sh\nsudo kata-trace-forwarder\n```\n",
        "no script or test runs",
    );
}

#[test]
fn marks_and_the_repositorys_commands_pass() {
    let doc = "```sh\n\
               # on a Kata host\n\
               kata-trace-forwarder --vsock-port 1234 --trace-name planted\n\
               ```\n\
               ```sh\n\
               sudo kata-trace-forwarder --socket-path /x --trace-name y   # on a Kata host\n\
               cargo run --release -p nowhere -- --nothing   # not run by CI\n\
               ./scripts/test.sh\n\
               ./scripts/demo.sh --json\n\
               kata-trace-forwarder --kata-host --print \\\n    --kata-root tests/fixtures/kata-host\n\
               ```\n";
    assert_eq!(planted(doc), Vec::<String>::new());
}

#[test]
fn a_mark_covers_only_its_own_block() {
    fails_once(
        "```sh\n# on a Kata host\n```\n```sh\nkata-trace-forwarder --vsock-port 1234 --trace-name planted\n```\n",
        "planted.md:5: no script or test runs",
    );
}

#[test]
fn a_script_option_it_does_not_take_fails() {
    fails_once(
        "```sh\n./scripts/demo.sh --no-such-option\n```\n",
        "no script or test runs",
    );
}

#[test]
fn an_unknown_flag_fails_even_when_marked() {
    fails_once(
        "```sh\nkata-trace-forwarder --no-such-flag   # on a Kata host\n```\n",
        "--no-such-flag is not in",
    );
    fails_once(
        "```sh\nkata-trace-forwarder frobnicate   # on a Kata host\n```\n",
        "is no subcommand",
    );
}

#[test]
fn a_fence_without_a_language_fails() {
    fails_once(
        "```\nkata-trace-forwarder --trace-name planted\n```\n",
        "without a language",
    );
    // Output blocks hold no commands.
    assert!(planted("```text\nkata-trace-forwarder --trace-name planted\n```\n").is_empty());
}

#[test]
fn continuations_and_comments_make_one_command() {
    let mut p = Vec::new();
    let doc = "```sh\na --x \\\n  --y |\n  b '#not a comment' # comment\n```\n";
    let cmds = commands("d.md", doc, &mut p);
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0].text, "a --x --y | b '#not a comment'");
    assert_eq!(cmds[0].line, 2);
}

#[test]
fn a_broken_link_or_anchor_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.md"), "# Title\n## A `flag` (here)\n").unwrap();
    let ok = "[b](b.md) [t](b.md#title) [h](b.md#a-flag-here) [self](#top)\n# Top\n";
    let bad = "[x](missing.md) [y](b.md#nowhere) `[z](in-code.md)`\n";
    let docs = vec![
        ("ok.md".to_string(), ok.to_string()),
        ("bad.md".to_string(), bad.to_string()),
    ];
    let problems = check_links(&docs, dir.path());
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("missing.md"), "{problems:?}");
    assert!(problems[1].contains("#nowhere"), "{problems:?}");
}
