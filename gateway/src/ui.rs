//! The web UI: the files `npm run build` leaves in `web/dist`, read once at
//! startup and served from memory. The bundle is small (tens of KiB), so a
//! disk read per request would buy nothing, and a file changed under a
//! running gateway cannot be half-served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Files past this many, or larger in all than [`MAX_TOTAL_BYTES`], mean the
/// directory is not a UI build: refuse to start rather than hold it all.
const MAX_FILES: usize = 256;
const MAX_TOTAL_BYTES: u64 = 32 * 1024 * 1024;
/// How deep `assets/` may nest.
const MAX_DEPTH: usize = 4;

/// One file, ready to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Asset {
    pub body: Bytes,
    pub content_type: &'static str,
    /// Vite names everything under `assets/` by its content hash, so those
    /// may be cached for good; `index.html` must be checked every time.
    pub immutable: bool,
}

/// The UI's files by URL path (`/`, `/assets/index-3f2a.js`).
#[derive(Clone, Debug, Default)]
pub struct Ui {
    files: HashMap<String, Asset>,
}

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("cannot read the UI directory {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0} has no index.html: build the UI with `npm --prefix web run build`")]
    NoIndex(PathBuf),
    #[error("{0} holds more than {MAX_FILES} files or {MAX_TOTAL_BYTES} bytes: not a UI build")]
    TooLarge(PathBuf),
}

impl Ui {
    /// Reads the build in `dir`.
    pub fn load(dir: &Path) -> Result<Self, UiError> {
        let mut ui = Ui::default();
        let mut total = 0u64;
        ui.read_dir(dir, dir, 0, &mut total)?;
        if !ui.files.contains_key("/") {
            return Err(UiError::NoIndex(dir.to_path_buf()));
        }
        Ok(ui)
    }

    fn read_dir(&mut self, root: &Path, dir: &Path, depth: usize, total: &mut u64) -> Result<(), UiError> {
        for entry in std::fs::read_dir(dir).map_err(read(dir))? {
            let entry = entry.map_err(read(dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(read(&path))?;
            if kind.is_dir() && depth < MAX_DEPTH {
                self.read_dir(root, &path, depth + 1, total)?;
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let body = std::fs::read(&path).map_err(read(&path))?;
            *total += body.len() as u64;
            if self.files.len() >= MAX_FILES || *total > MAX_TOTAL_BYTES {
                return Err(UiError::TooLarge(root.to_path_buf()));
            }
            let Some(url) = url_path(root, &path) else { continue };
            let asset = Asset {
                body: Bytes::from(body),
                content_type: content_type(&url),
                immutable: url.starts_with("/assets/"),
            };
            let url = if url == "/index.html" { "/".to_string() } else { url };
            self.files.insert(url, asset);
        }
        Ok(())
    }

    /// The file for a request path. Every page of the single-page app is
    /// `index.html` (the views are the URL's fragment), so only `/`, the
    /// hashed assets and files at the top level are served.
    pub fn get(&self, path: &str) -> Option<&Asset> {
        self.files.get(path)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

fn read(path: &Path) -> impl FnOnce(std::io::Error) -> UiError + '_ {
    move |source| UiError::Read { path: path.to_path_buf(), source }
}

/// `root/assets/x.js` as `/assets/x.js`; `None` for a name that is not
/// plain UTF-8 or holds characters a URL would have to escape.
fn url_path(root: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(root).ok()?;
    let mut url = String::new();
    for part in relative.components() {
        let part = part.as_os_str().to_str()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return None;
        }
        url.push('/');
        url.push_str(part);
    }
    Some(url)
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// What a UI page may load and talk to: only this origin (and its
/// WebSockets), no inline script or style, never framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    fn build(files: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (path, text) in files {
            let path = dir.0.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let path = std::env::temp_dir().join(format!("tidepool-ui-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_build_is_served_from_memory_with_its_types_and_caching() {
        let dir = build(&[("index.html", "<html>"), ("assets/index-1a2b.js", "x"), ("assets/index-1a2b.css", "y")]);
        let ui = Ui::load(&dir.0).unwrap();
        assert_eq!(ui.len(), 3);
        let index = ui.get("/").unwrap();
        assert_eq!(
            (index.content_type, index.immutable, &index.body[..]),
            ("text/html; charset=utf-8", false, &b"<html>"[..])
        );
        let script = ui.get("/assets/index-1a2b.js").unwrap();
        assert_eq!((script.content_type, script.immutable), ("text/javascript; charset=utf-8", true));
        assert_eq!(ui.get("/assets/index-1a2b.css").unwrap().content_type, "text/css; charset=utf-8");
        assert!(ui.get("/index.html").is_none());
        assert!(ui.get("/assets/../index.html").is_none());
    }

    #[test]
    fn a_directory_without_an_index_or_too_large_is_refused() {
        let dir = build(&[("assets/a.js", "x")]);
        assert!(matches!(Ui::load(&dir.0), Err(UiError::NoIndex(_))));
        assert!(matches!(Ui::load(&dir.0.join("missing")), Err(UiError::Read { .. })));
        let many: Vec<(String, &str)> = (0..=MAX_FILES).map(|i| (format!("assets/{i}.js"), "x")).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(p, t)| (p.as_str(), *t)).collect();
        let dir = build(&many);
        assert!(matches!(Ui::load(&dir.0), Err(UiError::TooLarge(_))));
    }

    #[test]
    fn names_a_url_would_escape_are_left_out() {
        let dir = build(&[("index.html", "<html>"), ("odd name.js", "x"), ("ok-name_1.js", "y")]);
        let ui = Ui::load(&dir.0).unwrap();
        assert!(ui.get("/ok-name_1.js").is_some());
        assert_eq!(ui.len(), 2);
        assert_eq!(content_type("/a.unknown"), "application/octet-stream");
    }
}
