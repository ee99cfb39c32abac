//! The docs back their claims by naming the tests that check them: every
//! test they name exists, so a renamed or deleted test cannot leave a
//! claim pointing at nothing.
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

/// Names in backquotes that read as a test's name: five or more
/// lowercase words joined by `_` (shorter ones are field and function
/// names as often as tests).
fn test_names(text: &str) -> Vec<&str> {
    let is_name = |s: &&str| {
        let words: Vec<&str> = s.split('_').collect();
        words.len() >= 5
            && words.iter().all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
    };
    text.split('`').skip(1).step_by(2).filter(is_name).collect()
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
    // README and the docs themselves (not the studies' generated reports below them).
    let docs = std::fs::read_dir(root.join("docs")).unwrap().flatten().map(|e| e.path());
    let docs: Vec<PathBuf> = docs.filter(|p| p.extension().is_some_and(|e| e == "md")).collect();
    let mut named = 0;
    let mut missing = Vec::new();
    for doc in docs.iter().chain([&root.join("README.md")]) {
        let text = std::fs::read_to_string(doc).unwrap();
        for name in test_names(&text) {
            named += 1;
            if !functions.contains(&format!("fn {name}(")) {
                missing.push(format!("{}: {name}", doc.strip_prefix(root).unwrap().display()));
            }
        }
    }
    assert!(named >= 20, "only {named} test names found in the docs: the scan is broken");
    assert!(missing.is_empty(), "the docs name tests that do not exist: {missing:#?}");
}
