//! `sc-master new <path>`: writes a ready app crate from the templates in
//! `crates/sc-master/templates/app/`, which ship inside this binary (`include_str!`).
//!
//! The app is a worker binary with one procedure, one event, one HTTP route, a page that uses
//! the stock browser client, a cluster config (`sc.toml`) whose `[worker] command` is the app,
//! a test and a README; its `main` is `sc_worker::launch`, so `cargo run` in it starts a whole
//! cluster serving it.
//!
//! Its dependency on sc-worker (and, for the test, sc-client) is by path to an sc-rs source
//! tree: `--sc-path`, else the tree this binary was built from when it is still there. That
//! tree's `Cargo.lock` is copied too, so the app builds with the versions sc-rs was tested
//! with. Without a tree, the dependencies are a git placeholder with a comment to fix it.
//!
//! Entry point: [`generate`].

use std::path::{Path, PathBuf};

/// The template files: their path in the app and their text.
const FILES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../templates/app/Cargo.toml.tmpl")),
    (".gitignore", include_str!("../templates/app/gitignore")),
    ("README.md", include_str!("../templates/app/README.md")),
    ("sc.toml", include_str!("../templates/app/sc.toml")),
    ("src/lib.rs", include_str!("../templates/app/src/lib.rs")),
    ("src/main.rs", include_str!("../templates/app/src/main.rs")),
    ("tests/app.rs", include_str!("../templates/app/tests/app.rs")),
    ("public/index.html", include_str!("../templates/app/public/index.html")),
    ("public/package.json", include_str!("../templates/app/public/package.json")),
];

/// Why an app could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    /// The folder exists and is not empty.
    #[error("{0}: the folder exists and is not empty; give a new or empty folder")]
    NotEmpty(PathBuf),
    /// The folder's name is not a valid package name.
    #[error("{0:?} is not a valid app name: use ASCII letters, digits, '-' and '_', starting with a letter")]
    BadName(String),
    /// `--sc-path` does not hold the sc-rs crates.
    #[error("{0}: not an sc-rs source tree (no crates/sc-worker/Cargo.toml)")]
    NotScTree(PathBuf),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// What [`generate`] made.
#[derive(Debug)]
pub struct NewApp {
    /// The package name (the folder's name).
    pub name: String,
    /// The sc-rs tree it depends on by path, if any.
    pub sc_path: Option<PathBuf>,
}

/// The sc-rs source tree this binary was built from, if it is still there.
pub fn default_sc_path() -> Option<PathBuf> {
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tree = tree.canonicalize().ok()?;
    is_sc_tree(&tree).then_some(tree)
}

fn is_sc_tree(path: &Path) -> bool {
    path.join("crates/sc-worker/Cargo.toml").is_file()
}

/// Writes the app into `dir` (created; it must not exist or be empty), depending on the sc-rs
/// tree `sc_path` (else [`default_sc_path`], else a git placeholder).
pub fn generate(dir: &Path, sc_path: Option<&Path>) -> Result<NewApp, NewError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NewError::Io { path, source }
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| NewError::BadName(dir.display().to_string()))?;
    if !is_valid_name(&name) {
        return Err(NewError::BadName(name));
    }
    let sc_path = match sc_path {
        Some(path) => {
            let tree = path.canonicalize().map_err(io(path))?;
            if !is_sc_tree(&tree) {
                return Err(NewError::NotScTree(tree));
            }
            Some(tree)
        }
        None => default_sc_path(),
    };
    if dir.exists() && std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        return Err(NewError::NotEmpty(dir.to_path_buf()));
    }

    let crate_name = name.replace('-', "_");
    let (sc_worker, sc_client, sc_shown) = match &sc_path {
        Some(tree) => (
            format!("sc-worker = {{ path = {:?} }}", tree.join("crates/sc-worker")),
            format!("sc-client = {{ path = {:?} }}", tree.join("crates/sc-client")),
            tree.display().to_string(),
        ),
        None => {
            let repository = env!("CARGO_PKG_REPOSITORY");
            (
                format!(
                    "# sc-rs was not found where this sc-master was built: point this (and sc-client\n\
                     # below) at an sc-rs checkout, `{{ path = \"/path/to/sc-rs/crates/sc-worker\" }}`,\n\
                     # or at its git repository, `{{ git = \"<sc-rs repository URL>\" }}`.\n\
                     sc-worker = {{ git = \"{repository}\" }}"
                ),
                format!("sc-client = {{ git = \"{repository}\" }}"),
                "/path/to/sc-rs".to_owned(),
            )
        }
    };
    for (file, template) in FILES {
        let text = template
            .replace("{{sc_worker}}", &sc_worker)
            .replace("{{sc_client}}", &sc_client)
            .replace("{{sc_path}}", &sc_shown)
            .replace("{{crate}}", &crate_name)
            .replace("{{name}}", &name);
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    // The versions sc-rs was built and tested with; cargo drops the entries the app does not use.
    if let Some(tree) = &sc_path {
        let lock = tree.join("Cargo.lock");
        if lock.is_file() {
            std::fs::copy(&lock, dir.join("Cargo.lock")).map_err(io(&lock))?;
        }
    }
    Ok(NewApp { name, sc_path })
}

/// A cargo package name that is also a valid crate name once `-` becomes `_`.
fn is_valid_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(is_valid_name("my-app"));
        assert!(is_valid_name("chat_2"));
        for bad in ["", "2app", "-app", "my app", "app.rs", "ünï"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn writes_every_file_with_the_name_and_the_path_filled_in() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("my-app");
        let tree = default_sc_path().expect("built from a source tree");
        let made = generate(&dir, Some(&tree)).unwrap();
        assert_eq!(made.name, "my-app");
        for (file, _) in FILES {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(!text.contains("{{"), "{file} has a placeholder left: {text}");
        }
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains(&format!("{:?}", tree.join("crates/sc-worker"))), "{manifest}");
        let main = std::fs::read_to_string(dir.join("src/main.rs")).unwrap();
        assert!(main.contains("sc_worker::launch(my_app::app)"), "{main}");
        assert!(dir.join("Cargo.lock").is_file());
    }

    #[test]
    fn refuses_a_folder_with_something_in_it_and_a_tree_that_is_not_sc_rs() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("app");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("keep.txt"), "mine").unwrap();
        assert!(matches!(generate(&dir, None), Err(NewError::NotEmpty(_))));
        assert_eq!(std::fs::read_to_string(dir.join("keep.txt")).unwrap(), "mine", "left alone");
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(matches!(generate(&empty, Some(root.path())), Err(NewError::NotScTree(_))));
        assert!(generate(&empty, None).is_ok(), "an empty folder is fine");
    }
}
