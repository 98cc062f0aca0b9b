//! `twopc serve --config FILE` and `--print-config` on the real binary: precedence of
//! flag > environment variable > config file > default, errors that name the key, and
//! a round trip of the printed configuration through `--config`.
//!
//! `--print-config` neither opens the data directory nor binds a port, so these tests
//! start no server; each has its own temp directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `twopc serve ARGS` with `env` as the only `TWOPC_*` variables.
fn serve(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twopc"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TWOPC_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1").env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run twopc")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `key -> (value, source)` from `--print-config` output (`# key: source` precedes
/// `key = value`).
fn parse_printed(text: &str) -> BTreeMap<String, (String, String)> {
    let mut map = BTreeMap::new();
    let mut source = None;
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            if let Some((key, src)) = comment.split_once(": ") {
                source = Some((key.to_string(), src.to_string()));
            }
        } else if let Some((key, value)) = line.split_once(" = ") {
            let (skey, src) = source.take().expect("a source comment before each key");
            assert_eq!(skey, key, "source comment belongs to the key:\n{text}");
            map.insert(key.to_string(), (value.to_string(), src));
        }
    }
    map
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config file");
    path.to_string_lossy().into_owned()
}

fn print_config(
    args: &[&str],
    env: &[(&str, &str)],
) -> (String, BTreeMap<String, (String, String)>) {
    let mut all = vec!["--print-config"];
    all.extend_from_slice(args);
    let out = serve(&all, env);
    assert!(
        out.status.success(),
        "--print-config failed: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    let map = parse_printed(&text);
    (text, map)
}

/// A temp dir and a data directory in it that a refused start must not create.
fn never_created() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("never-created");
    (dir, data_dir)
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let (dir, data_dir) = never_created();
    let file = write(
        dir.path(),
        "twopc.toml",
        &format!(
            "prepare_timeout_ms = 111\ntx_timeout_ms = 222\ncommit_wait_ms = 333\n\
             data_dir = {:?}\n",
            data_dir.to_string_lossy()
        ),
    );
    let (text, map) = print_config(
        &["--config", &file, "--prepare-timeout-ms", "100"],
        &[
            ("TWOPC_PREPARE_TIMEOUT_MS", "150"),
            ("TWOPC_TX_TIMEOUT_MS", "200"),
        ],
    );
    let get = |k: &str| {
        map.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{k} missing:\n{text}"))
    };
    assert_eq!(
        get("prepare_timeout_ms"),
        ("100".into(), "flag".into()),
        "{text}"
    );
    assert_eq!(get("tx_timeout_ms"), ("200".into(), "env".into()), "{text}");
    assert_eq!(
        get("commit_wait_ms"),
        ("333".into(), "file".into()),
        "{text}"
    );
    assert_eq!(
        get("rpc_timeout_ms"),
        ("5000".into(), "default".into()),
        "{text}"
    );
    assert_eq!(
        get("listen"),
        ("\"127.0.0.1:7400\"".into(), "default".into()),
        "{text}"
    );
    assert!(text.contains("# metrics_listen: default"), "{text}");
    // Printing opened nothing.
    assert!(
        !data_dir.exists(),
        "--print-config created the data directory"
    );

    // The file may also come from TWOPC_CONFIG.
    let (_, map) = print_config(&[], &[("TWOPC_CONFIG", &file)]);
    assert_eq!(map["commit_wait_ms"], ("333".into(), "file".into()));
}

#[test]
fn unknown_key_is_an_error_listing_the_known_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        dir.path(),
        "bad.toml",
        "listen = \"127.0.0.1:0\"\nprepare_timout_ms = 5\n",
    );
    let out = serve(&["--config", &file, "--print-config"], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&file), "{err}");
    assert!(err.contains("unknown key `prepare_timout_ms`"), "{err}");
    assert!(err.contains("prepare_timeout_ms"), "{err}");
    assert!(err.contains("metrics_listen"), "{err}");
    assert!(stdout(&out).is_empty(), "printed despite the error");
}

#[test]
fn out_of_range_and_wrong_type_name_the_key_file_and_range() {
    let (dir, data_dir) = never_created();
    let data_dir = data_dir.to_string_lossy();
    for (text, needles) in [
        (
            "max_branches = 5000\n",
            &["max_branches = 5000", "between 1 and 1024"][..],
        ),
        (
            "prepare_timeout_ms = \"ten seconds\"\n",
            &["prepare_timeout_ms", "between 10 and 3600000"][..],
        ),
        (
            "group_commit_delay_us = 250000\n",
            &["group_commit_delay_us = 250000", "between 0 and 100000"][..],
        ),
    ] {
        let file = write(dir.path(), "range.toml", text);
        // Without --print-config too: the server must refuse before touching the disk.
        let out = serve(
            &[
                "--config",
                &file,
                "--data-dir",
                &data_dir,
                "--listen",
                "127.0.0.1:0",
            ],
            &[],
        );
        assert!(!out.status.success(), "{text}: started anyway");
        let err = stderr(&out);
        assert!(err.contains(&file), "{err}");
        for n in needles {
            assert!(err.contains(n), "{text}: {err} lacks {n}");
        }
    }
    assert!(!Path::new(&*data_dir).exists());
}

#[test]
fn missing_file_names_the_path_and_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.toml");
    let missing = missing.to_string_lossy();
    let out = serve(&["--config", &missing, "--print-config"], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&*missing) && err.contains("--config"), "{err}");
}

#[test]
fn printed_config_loads_back_to_the_same_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data dir \"quoted\"");
    let (first_text, first) = print_config(
        &[
            "--data-dir",
            &data_dir.to_string_lossy(),
            "--one-phase",
            "false",
            "--metrics-listen",
            "127.0.0.1:9464",
            "--retry-max-ms",
            "700",
        ],
        &[
            ("TWOPC_MAX_BRANCHES", "9"),
            ("TWOPC_GROUP_COMMIT_DELAY_US", "0"),
        ],
    );
    let file = write(dir.path(), "printed.toml", &first_text);
    let (second_text, second) = print_config(&["--config", &file], &[]);
    let values = |m: &BTreeMap<String, (String, String)>| {
        m.iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        values(&first),
        values(&second),
        "{first_text}\n---\n{second_text}"
    );
    assert_eq!(first.len(), 17, "{first_text}");
    assert_eq!(
        first["group_commit_delay_us"],
        ("0".to_string(), "env".to_string())
    );
    assert!(
        second.values().all(|(_, src)| src == "file"),
        "{second_text}"
    );
    assert!(!data_dir.exists());
}

#[test]
fn bad_otlp_endpoint_is_refused_naming_the_flag() {
    let (_dir, data_dir) = never_created();
    let data_dir = data_dir.to_string_lossy();
    for (flags, env) in [
        (&["--otlp-endpoint", "localhost:4317"][..], &[][..]),
        (
            &[][..],
            &[("TWOPC_OTLP_ENDPOINT", "grpc://collector:4317")][..],
        ),
    ] {
        let mut args = vec!["--data-dir", &*data_dir, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let out = serve(&args, env);
        assert!(!out.status.success(), "{flags:?} {env:?}: started anyway");
        let err = stderr(&out);
        assert!(err.contains("otlp-endpoint"), "{err}");
        assert!(err.contains("http:// or https://"), "{err}");
    }
    assert!(!Path::new(&*data_dir).exists());
    // A valid one is accepted and printed with where it came from; off by default.
    let (text, map) = print_config(&["--otlp-endpoint", "http://127.0.0.1:4317"], &[]);
    assert_eq!(
        map["otlp_endpoint"],
        ("\"http://127.0.0.1:4317\"".into(), "flag".into()),
        "{text}"
    );
    assert_eq!(
        map["otlp_service_name"],
        ("\"twopc-coordinator\"".into(), "default".into()),
        "{text}"
    );
    let (text, map) = print_config(&[], &[]);
    assert!(!map.contains_key("otlp_endpoint"), "{text}");
    assert!(text.contains("# otlp_endpoint is not set"), "{text}");
}
