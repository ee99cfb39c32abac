//! The docs back their claims by naming the tests that check them and the
//! files that do the work: every test and source file they name exists,
//! so a renamed or deleted one cannot leave a claim pointing at nothing.
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every file under `dir` whose name ends in `suffix`.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.is_dir() {
            found.extend(files(&path, suffix));
        } else if path.to_string_lossy().ends_with(suffix) {
            found.push(path);
        }
    }
    found
}

/// What the text puts in backquotes.
fn quoted(text: &str) -> impl Iterator<Item = &str> {
    text.split('`').skip(1).step_by(2)
}

/// Names in backquotes that read as a test's name: five or more
/// lowercase words joined by `_` (shorter ones are field and function
/// names as often as tests).
fn test_names(text: &str) -> Vec<&str> {
    let is_name = |s: &&str| {
        let words: Vec<&str> = s.split('_').collect();
        words.len() >= 5
            && words.iter().all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
    };
    quoted(text).filter(is_name).collect()
}

/// Names in backquotes that read as a source file or script: a path
/// ending in `.rs` or `.sh`.
fn file_names(text: &str) -> Vec<&str> {
    let is_path = |s: &&str| {
        (s.ends_with(".rs") || s.ends_with(".sh")) && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c))
    };
    quoted(text).filter(is_path).collect()
}

/// The names `names_in` finds in README and the docs themselves (not the
/// studies' generated reports below them) that `exists` does not know,
/// each with the doc that names it; at least 20 must be found.
fn named_but_missing(names_in: fn(&str) -> Vec<&str>, exists: impl Fn(&str) -> bool) -> Vec<String> {
    let root = Path::new(ROOT);
    let docs = std::fs::read_dir(root.join("docs")).unwrap().flatten().map(|e| e.path());
    let docs = docs.filter(|p| p.extension().is_some_and(|e| e == "md")).chain([root.join("README.md")]);
    let mut named = 0;
    let mut missing = Vec::new();
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for name in names_in(&text) {
            named += 1;
            if !exists(name) {
                missing.push(format!("{}: {name}", doc.strip_prefix(root).unwrap().display()));
            }
        }
    }
    assert!(named >= 20, "only {named} names found in the docs: the scan is broken");
    missing
}

#[test]
fn every_source_file_the_docs_name_exists() {
    let root = Path::new(ROOT);
    let mut sources: Vec<String> = Vec::new();
    for dir in ["src", "tests", "rpc-schema", "benches", "scripts", ".ci"] {
        sources.extend(files(&root.join(dir), "").iter().map(|p| p.to_string_lossy().into_owned()));
    }
    let missing = named_but_missing(file_names, |name| sources.iter().any(|s| s.ends_with(&format!("/{name}"))));
    assert!(missing.is_empty(), "the docs name files that do not exist: {missing:#?}");
}

#[test]
fn every_test_the_docs_name_exists() {
    let root = Path::new(ROOT);
    let mut functions = String::new();
    for dir in ["src", "tests", "rpc-schema", "benches"] {
        for file in files(&root.join(dir), ".rs") {
            functions.push_str(&std::fs::read_to_string(&file).unwrap());
        }
    }
    let missing = named_but_missing(test_names, |name| functions.contains(&format!("fn {name}(")));
    assert!(missing.is_empty(), "the docs name tests that do not exist: {missing:#?}");
}
