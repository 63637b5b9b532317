//! What `run` would refuse, checked before anything connects: `check-config` runs these
//! checks and exits 2, and so does `run` at start, with the same messages.
//!
//! [`Config::load`] checks the file itself (syntax, types, values, URLs, addresses); this
//! module checks the machine the config points at: model files and their vector size, the
//! ONNX Runtime library, secret and certificate files, the index directory, and that at least
//! one table is configured (without a rule every event is acked and dropped).

use std::path::{Path, PathBuf};

use crate::config::{Config, EmbeddingProvider, SinkKind, TlsFiles};

/// The files fastembed loads from `embedding.model_dir`.
pub const MODEL_FILES: [&str; 5] = [
    "model.onnx",
    "tokenizer.json",
    "config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
];

/// Every problem found, each as `key: what is wrong and what is expected`. With `host`
/// false only the config itself is checked, not the files it names on this machine.
pub fn check(config: &Config, host: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if config.tables.is_empty() {
        problems.push(
            "tables: no [[tables]] rule; without one every event is acked and dropped. Add a \
             [[tables]] entry (table, id_columns, text) per captured table"
                .to_string(),
        );
    }
    if !host {
        return problems;
    }
    let b = &config.broker;
    if let Some(file) = &b.password_file {
        secret_file("broker.password_file", file, &mut problems);
    }
    tls_files("broker", &b.tls(), &mut problems);

    let e = &config.embedding;
    match e.provider {
        EmbeddingProvider::Fastembed => model(config, &mut problems),
        EmbeddingProvider::Http => {
            if let Some(file) = &e.api_key_file {
                secret_file("embedding.api_key_file", file, &mut problems);
            }
            tls_files("embedding", &e.tls(), &mut problems);
        }
    }

    let s = &config.sink;
    match s.kind {
        SinkKind::Embedded => {
            if let Err(why) = creatable_dir(&s.path) {
                problems.push(format!("sink.path: {}: {why}", s.path.display()));
            }
        }
        SinkKind::Qdrant | SinkKind::Llamaindex => {
            if let Some(file) = &s.api_key_file {
                secret_file("sink.api_key_file", file, &mut problems);
            }
            tls_files("sink", &s.tls(), &mut problems);
        }
    }
    if config.http.search_listen.is_some()
        && let Some(file) = &config.http.search_token_file
    {
        secret_file("http.search_token_file", file, &mut problems);
    }
    if let Some(file) = &config.reconcile.password_file {
        secret_file("reconcile.password_file", file, &mut problems);
    }
    problems
}

/// The ONNX Runtime library fastembed will load: `ORT_DYLIB_PATH` wins over the config.
pub fn onnxruntime_lib(config: &Config) -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| config.embedding.onnxruntime_lib.clone())
}

fn model(config: &Config, problems: &mut Vec<String>) {
    let e = &config.embedding;
    let dir = &e.model_dir;
    if !dir.is_dir() {
        problems.push(format!(
            "embedding.model_dir: {} is not a directory; run scripts/setup-models.sh or point \
             embedding.model_dir at a directory with {}",
            dir.display(),
            MODEL_FILES.join(", ")
        ));
    } else {
        let missing: Vec<&str> = MODEL_FILES
            .iter()
            .copied()
            .filter(|f| std::fs::File::open(dir.join(f)).is_err())
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "embedding.model_dir: {} lacks (or cannot read) {}; run scripts/setup-models.sh",
                dir.display(),
                missing.join(", ")
            ));
        }
        match hidden_size(&dir.join("config.json")) {
            Some(size) if size != e.dimensions => problems.push(format!(
                "embedding.dimensions: {} but the model in {} gives {size}-dimensional vectors \
                 (config.json hidden_size); set embedding.dimensions = {size}",
                e.dimensions,
                dir.display()
            )),
            _ => {}
        }
    }
    let lib = onnxruntime_lib(config);
    let key = if std::env::var_os("ORT_DYLIB_PATH").is_some() {
        "ORT_DYLIB_PATH"
    } else {
        "embedding.onnxruntime_lib"
    };
    if !lib.is_file() {
        problems.push(format!(
            "{key}: {} not found; run scripts/setup-models.sh or point it at libonnxruntime.so",
            lib.display()
        ));
    } else if let Err(why) = loads_onnxruntime(&lib) {
        problems.push(format!(
            "{key}: {} does not load as ONNX Runtime: {why}",
            lib.display()
        ));
    }
}

/// `hidden_size` of a Hugging Face `config.json`: the model's vector size.
fn hidden_size(path: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("hidden_size")?
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
}

/// Opens the library and finds ONNX Runtime's entry point. The library stays loaded: ort
/// opens the same one later, and unloading a C++ runtime to load it again gains nothing.
fn loads_onnxruntime(lib: &Path) -> Result<(), String> {
    // SAFETY: loading runs the library's initialisers; it is the library ONNX Runtime's
    // loader (ort) would open next in this process anyway.
    let library = unsafe { libloading::Library::new(lib) }.map_err(|e| e.to_string())?;
    // SAFETY: only the symbol's presence is checked; it is never called here.
    let found = unsafe { library.get::<unsafe extern "C" fn() -> *const u8>(b"OrtGetApiBase") }
        .map(|_| ())
        .map_err(|_| "it has no OrtGetApiBase symbol (not ONNX Runtime)".to_string());
    std::mem::forget(library);
    found
}

fn secret_file(key: &str, path: &Path, problems: &mut Vec<String>) {
    match std::fs::read_to_string(path) {
        Err(e) => problems.push(format!("{key}: cannot read {}: {e}", path.display())),
        Ok(text) if text.lines().next().unwrap_or("").trim().is_empty() => problems.push(format!(
            "{key}: {} is empty; its first line is the secret",
            path.display()
        )),
        Ok(_) => {}
    }
}

fn tls_files(section: &str, tls: &TlsFiles, problems: &mut Vec<String>) {
    let files = [
        ("tls_ca_file", &tls.ca_file),
        ("tls_client_cert_file", &tls.client_cert_file),
        ("tls_client_key_file", &tls.client_key_file),
    ];
    for (key, path) in files {
        let Some(path) = path else { continue };
        match std::fs::read(path) {
            Err(e) => problems.push(format!(
                "{section}.{key}: cannot read {}: {e}",
                path.display()
            )),
            Ok(bytes) if !bytes.windows(11).any(|w| w == b"-----BEGIN ") => problems.push(format!(
                "{section}.{key}: {} is not a PEM file (no -----BEGIN line)",
                path.display()
            )),
            Ok(_) => {}
        }
    }
}

/// `path` is a writable directory, or the nearest existing ancestor is one (so the daemon
/// can create it). Nothing is created.
fn creatable_dir(path: &Path) -> Result<(), String> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("no working directory: {e}"))?
            .join(path)
    };
    let mut at = absolute.as_path();
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => {
                return if writable(at) {
                    Ok(())
                } else if at == absolute {
                    Err("the directory is not writable by this user".into())
                } else {
                    Err(format!(
                        "cannot be created: {} is not writable by this user",
                        at.display()
                    ))
                };
            }
            Ok(_) => {
                return Err(if at == absolute {
                    "exists and is not a directory".into()
                } else {
                    format!("cannot be created: {} is not a directory", at.display())
                });
            }
            Err(_) => match at.parent() {
                Some(parent) => at = parent,
                None => return Err("no existing ancestor directory".into()),
            },
        }
    }
}

fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "[[tables]]\ntable = \"public.p\"\nid_columns = [\"id\"]\ntext = \"{n}\"\n";

    fn config(text: &str) -> Config {
        Config::from_toml("c.toml", text, std::iter::empty()).expect("parses")
    }

    #[test]
    fn no_tables_is_a_problem() {
        let c = config("[embedding]\nprovider = \"http\"\n");
        let problems = check(&c, true);
        assert!(
            problems.iter().any(|p| p.starts_with("tables: ")),
            "{problems:?}"
        );
    }

    #[test]
    fn missing_model_dir_and_runtime_are_named() {
        let c = config(&format!(
            "[embedding]\nmodel_dir = \"/nonexistent/m\"\nonnxruntime_lib = \"/nonexistent/o.so\"\n{TABLE}"
        ));
        let problems = check(&c, true);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("embedding.model_dir: /nonexistent/m")),
            "{problems:?}"
        );
        if std::env::var_os("ORT_DYLIB_PATH").is_none() {
            assert!(
                problems.iter().any(
                    |p| p.starts_with("embedding.onnxruntime_lib: /nonexistent/o.so not found")
                ),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn index_path_must_be_creatable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(creatable_dir(&dir.path().join("a/b/c")).is_ok());
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(creatable_dir(&file).is_err());
        assert!(creatable_dir(&file.join("below")).is_err());
    }

    #[test]
    fn dimensions_are_checked_against_the_model_config() {
        let dir = tempfile::tempdir().unwrap();
        for f in MODEL_FILES {
            std::fs::write(dir.path().join(f), "{}").unwrap();
        }
        std::fs::write(dir.path().join("config.json"), r#"{"hidden_size": 384}"#).unwrap();
        let c = config(&format!(
            "[embedding]\nmodel_dir = \"{}\"\ndimensions = 768\n{TABLE}",
            dir.path().display()
        ));
        let problems = check(&c, true);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("embedding.dimensions: 768 but the model")
                    && p.ends_with("set embedding.dimensions = 384")),
            "{problems:?}"
        );
    }
}
