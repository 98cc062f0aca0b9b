//! Tests of the configuration: precedence, the file's errors, `--print-config`, and the
//! settings table itself (every setting's flag, environment variable, file key, default
//! and range held together).

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches};

use super::effective::explicit_source;
use super::*;
use crate::engine::EngineConfig;

#[derive(clap::Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: ServeArgs,
}

fn path() -> &'static Path {
    Path::new("twopc.toml")
}

/// Parses `argv` with clap. The real `TWOPC_*` variables are ignored (tests run in
/// parallel, and the environment of the test run is not ours); each `(id, value)` of
/// `env` is put in a variable of its own that only this test's parse reads.
fn parse_env(argv: &[&str], env: &[(&str, &str)]) -> (ServeArgs, ArgMatches) {
    let cmd = Cli::command().mut_args(|a| {
        let id = a.get_id().as_str().to_string();
        match env.iter().find(|(k, _)| *k == id) {
            Some((_, value)) => {
                let var: &'static str = Box::leak(
                    format!("TWOPC_CONFIG_UNIT_TEST_{}", id.to_uppercase()).into_boxed_str(),
                );
                std::env::set_var(var, value);
                a.env(var)
            }
            None => a.env(None::<&'static str>),
        }
    });
    let matches = cmd
        .try_get_matches_from(std::iter::once("serve").chain(argv.iter().copied()))
        .expect("valid arguments");
    let cli = Cli::from_arg_matches(&matches).expect("matches");
    (cli.args, matches)
}

fn parse(argv: &[&str]) -> (ServeArgs, ArgMatches) {
    parse_env(argv, &[])
}

#[test]
fn config_defaults_of_clap_and_default_agree() {
    let (args, matches) = parse(&[]);
    assert_eq!(args.config, ServeConfig::default());
    let eff = resolve(&args, &matches).expect("valid");
    assert!(eff.sources.iter().all(|s| *s == Source::Default));
}

#[test]
fn config_precedence_flag_over_env_over_file_over_default() {
    let file = parse_file(
        path(),
        "prepare_timeout_ms = 111\ntx_timeout_ms = 222\ncommit_wait_ms = 333\n",
    )
    .expect("valid file");
    let cli = ServeConfig {
        prepare_timeout_ms: 1,
        tx_timeout_ms: 2,
        ..ServeConfig::default()
    };
    let explicit = |key: &str| match key {
        "prepare_timeout_ms" => Some(Source::Flag),
        "tx_timeout_ms" => Some(Source::Env),
        _ => None,
    };
    let eff = merge(&cli, explicit, Some((path(), &file)));
    assert_eq!(eff.config.prepare_timeout_ms, 1);
    assert_eq!(eff.source("prepare_timeout_ms"), Some(Source::Flag));
    assert_eq!(eff.config.tx_timeout_ms, 2);
    assert_eq!(eff.source("tx_timeout_ms"), Some(Source::Env));
    assert_eq!(eff.config.commit_wait_ms, 333);
    assert_eq!(eff.source("commit_wait_ms"), Some(Source::File));
    assert_eq!(
        eff.config.rpc_timeout_ms,
        ServeConfig::default().rpc_timeout_ms
    );
    assert_eq!(eff.source("rpc_timeout_ms"), Some(Source::Default));
}

#[test]
fn config_clap_flag_and_env_beat_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "rpc_timeout_ms = 100\nconnect_timeout_ms = 200\nretry_initial_ms = 7\n\
         metrics_listen = \"127.0.0.1:9999\"\n",
    )
    .expect("write");
    let file_arg = format!("--config={}", file.display());
    let (args, matches) = parse_env(
        &["--rpc-timeout-ms=50", &file_arg],
        &[("connect_timeout_ms", "444"), ("rpc_timeout_ms", "60")],
    );
    let eff = resolve(&args, &matches).expect("valid");
    assert_eq!(
        (eff.config.rpc_timeout_ms, eff.source("rpc_timeout_ms")),
        (50, Some(Source::Flag))
    );
    assert_eq!(
        (
            eff.config.connect_timeout_ms,
            eff.source("connect_timeout_ms")
        ),
        (444, Some(Source::Env))
    );
    assert_eq!(
        (eff.config.retry_initial_ms, eff.source("retry_initial_ms")),
        (7, Some(Source::File))
    );
    assert_eq!(
        eff.config.metrics_listen,
        Some(SocketAddr::from(([127, 0, 0, 1], 9999)))
    );
    assert_eq!(eff.source("max_branches"), Some(Source::Default));
    assert_eq!(eff.file.as_deref(), Some(file.as_path()));
}

/// Resolves `argv` (with `env`), expecting an error that mentions every needle.
fn refused(argv: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let (args, matches) = parse_env(argv, env);
    let msg = resolve(&args, &matches)
        .expect_err(&format!("{argv:?} must be refused"))
        .to_string();
    for n in needles {
        assert!(msg.contains(n), "{argv:?}: {msg:?} lacks {n:?}");
    }
    msg
}

#[test]
fn config_tls_files_come_in_pairs_and_need_what_they_extend() {
    refused(&["--tls-cert=c.pem"], &[], &["tls-key", "both or neither"]);
    refused(&["--tls-key=k.pem"], &[], &["tls-cert", "both or neither"]);
    refused(
        &["--tls-client-ca=ca.pem"],
        &[],
        &["tls-client-ca", "--tls-cert"],
    );
    refused(
        &["--participant-cert=c.pem", "--participant-ca=ca.pem"],
        &[],
        &["participant-key", "both or neither"],
    );
    refused(
        &["--participant-cert=c.pem", "--participant-key=k.pem"],
        &[],
        &["participant-cert", "--participant-ca"],
    );
    let file = parse_file(path(), "tls_cert = \"\"\ntls_key = \"k.pem\"\n").expect("parses");
    let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
    let msg = eff.validate().expect_err("empty path").to_string();
    assert!(msg.contains("tls_cert") && msg.contains("empty"), "{msg}");
    let (args, matches) = parse(&[
        "--tls-cert=c.pem",
        "--tls-key=k.pem",
        "--tls-client-ca=ca.pem",
        "--participant-ca=pca.pem",
    ]);
    let eff = resolve(&args, &matches).expect("a consistent TLS set-up");
    assert_eq!(eff.config.tls_cert, Some(PathBuf::from("c.pem")));
    assert_eq!(eff.config.participant_cert, None);
}

#[test]
fn config_tokens_are_checked_and_never_shown() {
    let weak = refused(&["--client-token=short"], &[], &["client-token", "16"]);
    assert!(!weak.contains("short"), "{weak}");
    refused(
        &["--admin-token=has a space 0123456789"],
        &[],
        &["admin-token", "visible ASCII"],
    );
    refused(
        &[
            "--client-token=client-token-0123456789",
            "--client-token-file=t",
        ],
        &[],
        &["client-token-file", "not both"],
    );
    let same = refused(
        &[
            "--client-token=same-token-0123456789",
            "--admin-token=same-token-0123456789",
        ],
        &[],
        &["admin-token", "differ"],
    );
    assert!(!same.contains("same-token"), "{same}");
    // From the environment, and not printed by --print-config or Debug.
    let (args, matches) = parse_env(
        &[],
        &[
            ("client_token", "client-token-from-env-0123"),
            ("admin_token_file", "/run/secrets/admin"),
        ],
    );
    let eff = resolve(&args, &matches).expect("valid");
    assert_eq!(eff.source("client_token"), Some(Source::Env));
    assert_eq!(
        eff.config.client_token.as_ref().map(Secret::expose),
        Some("client-token-from-env-0123")
    );
    let text = eff.to_toml();
    assert!(!text.contains("client-token-from-env"), "{text}");
    assert!(text.contains("# client_token = <redacted>"), "{text}");
    assert!(
        text.contains("admin_token_file = \"/run/secrets/admin\""),
        "{text}"
    );
    assert!(text.contains("# admin_token is not set"), "{text}");
    assert!(!format!("{:?}", eff.config).contains("client-token-from-env"));
}

#[test]
fn config_security_keys_from_the_file_lose_to_flags_and_env() {
    let file = parse_file(
        path(),
        "tls_cert = \"file-cert.pem\"\ntls_key = \"file-key.pem\"\n\
         participant_ca = \"file-ca.pem\"\nadmin_token = \"admin-token-from-file-01\"\n\
         client_token_file = \"/etc/twopc/client-token\"\n",
    )
    .expect("valid file");
    let cli = ServeConfig {
        tls_cert: Some(PathBuf::from("flag-cert.pem")),
        participant_ca: Some(PathBuf::from("env-ca.pem")),
        ..ServeConfig::default()
    };
    let explicit = |key: &str| match key {
        "tls_cert" => Some(Source::Flag),
        "participant_ca" => Some(Source::Env),
        _ => None,
    };
    let eff = merge(&cli, explicit, Some((path(), &file)));
    assert_eq!(eff.config.tls_cert, Some(PathBuf::from("flag-cert.pem")));
    assert_eq!(eff.config.tls_key, Some(PathBuf::from("file-key.pem")));
    assert_eq!(eff.source("tls_key"), Some(Source::File));
    assert_eq!(eff.config.participant_ca, Some(PathBuf::from("env-ca.pem")));
    assert_eq!(
        eff.config.admin_token,
        Some(Secret::new("admin-token-from-file-01"))
    );
    assert_eq!(
        eff.config.client_token_file,
        Some(PathBuf::from("/etc/twopc/client-token"))
    );
    eff.validate().expect("valid");
    // A bad token from the file is reported against the file and key, redacted.
    let file = parse_file(path(), "admin_token = \"weak\"\n").expect("valid type");
    let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
    let msg = eff.validate().expect_err("weak token").to_string();
    assert!(
        msg.contains("twopc.toml") && msg.contains("admin_token"),
        "{msg}"
    );
    assert!(!msg.contains("weak"), "{msg}");
    // Wrong type: names the key and what is allowed.
    let err = parse_file(path(), "tls_cert = 5\n").expect_err("wrong type");
    assert!(err.to_string().contains("a path string"), "{err}");
}

#[test]
fn config_unknown_key_is_named_with_the_known_ones() {
    let err = parse_file(path(), "listen = \"127.0.0.1:1\"\nprepare_timeout = 5\n")
        .expect_err("unknown key");
    let msg = err.to_string();
    assert!(matches!(err, ConfigFileError::UnknownKey { ref key, .. } if key == "prepare_timeout"));
    assert!(msg.contains("twopc.toml"), "{msg}");
    assert!(msg.contains("`prepare_timeout`"), "{msg}");
    for key in SETTINGS.iter().map(|s| s.key) {
        assert!(msg.contains(key), "{msg} lacks {key}");
    }
}

#[test]
fn config_wrong_type_names_key_file_and_allowed() {
    for (text, key, allowed_part) in [
        (
            "prepare_timeout_ms = \"10s\"",
            "prepare_timeout_ms",
            "between 10 and 3600000",
        ),
        ("max_branches = -1", "max_branches", "between 1 and 1024"),
        ("listen = 7400", "listen", "socket address"),
        ("listen = \"nowhere\"", "listen", "socket address"),
        ("one_phase = \"yes\"", "one_phase", "true or false"),
    ] {
        let err = parse_file(path(), text).expect_err(text);
        let msg = err.to_string();
        assert!(
            matches!(err, ConfigFileError::BadValue { key: k, .. } if k == key),
            "{text}: {msg}"
        );
        assert!(msg.contains("twopc.toml"), "{msg}");
        assert!(msg.contains(allowed_part), "{msg}");
    }
}

#[test]
fn config_out_of_range_from_file_names_key_file_and_range() {
    let file = parse_file(path(), "prepare_timeout_ms = 5\n").expect("valid type");
    let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
    let err = eff.validate().expect_err("out of range");
    let msg = err.to_string();
    assert!(msg.contains("twopc.toml"), "{msg}");
    assert!(msg.contains("prepare_timeout_ms = 5"), "{msg}");
    assert!(msg.contains("between 10 and 3600000"), "{msg}");
    // The same value from a flag is reported against the flag.
    let cli = ServeConfig {
        prepare_timeout_ms: 5,
        ..ServeConfig::default()
    };
    let eff = merge(&cli, |_| Some(Source::Flag), Some((path(), &file)));
    let err = eff.validate().expect_err("out of range");
    assert!(matches!(
        err,
        ConfigFileError::Invalid(ConfigError {
            field: "prepare-timeout-ms",
            ..
        })
    ));
}

#[test]
fn config_missing_file_names_path_and_flag() {
    let err = load_file(Path::new("/nonexistent/twopc.toml")).expect_err("missing");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/twopc.toml"), "{msg}");
    assert!(msg.contains("--config"), "{msg}");
}

#[test]
fn config_syntax_error_names_the_file() {
    let err = parse_file(path(), "listen = \n").expect_err("bad toml");
    assert!(matches!(err, ConfigFileError::Syntax { .. }));
    assert!(err.to_string().contains("twopc.toml"));
}

#[test]
fn config_otlp_endpoint_must_be_an_http_url() {
    for bad in [
        "127.0.0.1:4317",
        "grpc://collector:4317",
        "http://",
        "not a url",
    ] {
        refused(
            &[&format!("--otlp-endpoint={bad}")],
            &[],
            &["otlp-endpoint", "http:// or https://"],
        );
    }
    refused(&["--otlp-service-name= "], &[], &["otlp-service-name"]);
    let (args, matches) = parse_env(
        &["--otlp-endpoint=https://otel.example:4317"],
        &[("otlp_service_name", "billing-tx")],
    );
    let eff = resolve(&args, &matches).expect("valid");
    assert_eq!(
        eff.config.otlp_endpoint.as_deref(),
        Some("https://otel.example:4317")
    );
    assert_eq!(eff.source("otlp_endpoint"), Some(Source::Flag));
    assert_eq!(eff.config.otlp_service_name, "billing-tx");
    assert_eq!(eff.source("otlp_service_name"), Some(Source::Env));
    // Off by default, with the default service name.
    let (args, matches) = parse(&[]);
    let eff = resolve(&args, &matches).expect("valid");
    assert_eq!(eff.config.otlp_endpoint, None);
    assert_eq!(eff.config.otlp_service_name, "twopc-coordinator");
    assert!(eff.to_toml().contains("# otlp_endpoint is not set"));
    // From the file: reported against the file and the key.
    let file = parse_file(path(), "otlp_endpoint = \"localhost:4317\"\n").expect("a string");
    let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
    let msg = eff.validate().expect_err("no scheme").to_string();
    assert!(
        msg.contains("twopc.toml") && msg.contains("otlp_endpoint") && msg.contains("http://"),
        "{msg}"
    );
    let err = parse_file(path(), "otlp_endpoint = 4317\n").expect_err("wrong type");
    assert!(err.to_string().contains("URL string"), "{err}");
}

#[test]
fn config_decision_log_etcd_needs_endpoints_and_a_usable_cluster_name() {
    refused(
        &["--decision-log=etcd"],
        &[],
        &["etcd-endpoints", "required with --decision-log etcd"],
    );
    refused(
        &["--etcd-endpoints=http://127.0.0.1:2379"],
        &[],
        &["etcd-endpoints", "only used with --decision-log etcd"],
    );
    for bad in [
        "127.0.0.1:2379",
        "https://etcd:2379",
        "http://",
        "http://a:1/x",
        " , ",
    ] {
        refused(
            &["--decision-log=etcd", &format!("--etcd-endpoints={bad}")],
            &[],
            &["etcd-endpoints"],
        );
    }
    refused(
        &[
            "--decision-log=etcd",
            "--etcd-endpoints=http://a:1",
            "--etcd-cluster=a/b",
        ],
        &[],
        &["etcd-cluster", "'/'"],
    );
    let (args, matches) = parse_env(
        &["--etcd-endpoints=http://10.0.0.1:2379, http://10.0.0.2:2379"],
        &[("decision_log", "etcd"), ("etcd_cluster", "prod-eu")],
    );
    let eff = resolve(&args, &matches).expect("valid");
    assert_eq!(eff.config.decision_log, DecisionLogKind::Etcd);
    assert_eq!(eff.source("decision_log"), Some(Source::Env));
    assert_eq!(
        eff.config.etcd_endpoint_list(),
        vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    );
    let opts = eff.config.etcd_log_options();
    assert_eq!(opts.cluster, "prod-eu");
    assert_eq!(opts.endpoints.len(), 2);
    assert_eq!(opts.advertise, eff.config.listen.to_string());
    // sled by default, under the default cluster name.
    let (args, matches) = parse(&[]);
    let eff = resolve(&args, &matches).expect("valid");
    assert_eq!(eff.config.decision_log, DecisionLogKind::Sled);
    assert_eq!(eff.config.etcd_cluster, "default");
    // From the file: a kind that does not exist is named with the key.
    let err = parse_file(path(), "decision_log = \"zookeeper\"\n").expect_err("unknown kind");
    assert!(err.to_string().contains("decision_log"), "{err}");
    let file = parse_file(path(), "decision_log = \"etcd\"\n").expect("a kind");
    let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
    let msg = eff.validate().expect_err("no endpoints").to_string();
    assert!(
        msg.contains("etcd") && msg.contains("required with --decision-log etcd"),
        "{msg}"
    );
}

#[test]
fn config_printed_toml_loads_back_to_the_same_config() {
    for (metrics_listen, otlp_endpoint) in [
        (None, None),
        (
            Some(SocketAddr::from(([127, 0, 0, 1], 9400))),
            Some("http://127.0.0.1:4317".to_string()),
        ),
    ] {
        let cli = ServeConfig {
            data_dir: PathBuf::from("/var/lib/twopc \"data\""),
            prepare_timeout_ms: 1234,
            one_phase: false,
            metrics_listen,
            otlp_endpoint,
            otlp_service_name: "twopc \"east\"".into(),
            ..ServeConfig::default()
        };
        let eff = merge(&cli, |_| Some(Source::Flag), None);
        let text = eff.to_toml();
        assert!(text.contains("# prepare_timeout_ms: flag\n"), "{text}");
        let file = parse_file(path(), &text).expect("printed config parses");
        let again = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
        assert_eq!(again.config, cli, "{text}");
    }
}

/// A value for every setting, as given on the command line, that differs from its
/// default. Keyed by the file key; a setting without one fails
/// `settings_flag_env_and_file_key_give_the_same_value`.
const SAMPLES: &[(&str, &str)] = &[
    ("listen", "127.0.0.1:1"),
    ("data_dir", "d"),
    ("prepare_timeout_ms", "11"),
    ("tx_timeout_ms", "12"),
    ("commit_wait_ms", "13"),
    ("rpc_timeout_ms", "14"),
    ("connect_timeout_ms", "15"),
    ("retry_initial_ms", "16"),
    ("retry_max_ms", "17"),
    ("max_branches", "18"),
    ("one_phase", "false"),
    ("metrics_listen", "127.0.0.1:2"),
    ("tls_cert", "c.pem"),
    ("tls_key", "k.pem"),
    ("tls_client_ca", "ca.pem"),
    ("participant_ca", "pca.pem"),
    ("participant_cert", "pc.pem"),
    ("participant_key", "pk.pem"),
    ("client_token", "client-token-0123456789"),
    ("client_token_file", "ct"),
    ("admin_token", "admin-token-0123456789"),
    ("admin_token_file", "at"),
    ("otlp_endpoint", "http://127.0.0.1:4317"),
    ("otlp_service_name", "svc"),
    ("group_commit_delay_us", "19"),
    ("decision_retention_ms", "20"),
    ("decision_log", "etcd"),
    ("etcd_endpoints", "http://127.0.0.1:2379"),
    ("etcd_cluster", "c1"),
];

#[test]
fn settings_are_the_clap_args_with_their_flags_and_env_vars() {
    let command = ServeConfig::augment_args(clap::Command::new("serve"));
    let args: Vec<_> = command.get_arguments().collect();
    let ids: Vec<_> = args.iter().map(|a| a.get_id().as_str()).collect();
    let keys: Vec<_> = SETTINGS.iter().map(|s| s.key).collect();
    assert_eq!(
        ids, keys,
        "one setting per clap argument, in the same order"
    );
    for (arg, setting) in args.iter().zip(SETTINGS) {
        let key = setting.key;
        assert_eq!(arg.get_long(), Some(setting.flag()), "{key}");
        assert_eq!(setting.flag(), key.replace('_', "-"), "{key}");
        let env = format!("TWOPC_{}", key.to_uppercase());
        assert_eq!(arg.get_env(), Some(OsStr::new(&env)), "{key}");
        assert!(arg.get_help().is_some(), "{key} has no help text");
        assert_eq!(Setting::find(key).map(|s| s.key), Some(key));
        assert_eq!(Setting::by_flag(setting.flag()).map(|s| s.key), Some(key));
    }
}

#[test]
fn settings_flag_env_and_file_key_give_the_same_value() {
    let sampled: Vec<_> = SAMPLES.iter().map(|(k, _)| *k).collect();
    let keys: Vec<_> = SETTINGS.iter().map(|s| s.key).collect();
    assert_eq!(sampled, keys, "a sample for every setting, in order");
    for (setting, (key, value)) in SETTINGS.iter().zip(SAMPLES) {
        let (by_flag, matches) = parse(&[&format!("--{}={value}", setting.flag())]);
        assert_eq!(explicit_source(&matches, key), Some(Source::Flag), "{key}");
        assert_ne!(
            by_flag.config,
            ServeConfig::default(),
            "{key}: sample is the default"
        );
        let (by_env, matches) = parse_env(&[], &[(key, value)]);
        assert_eq!(explicit_source(&matches, key), Some(Source::Env), "{key}");
        assert_eq!(by_env.config, by_flag.config, "{key}: env and flag differ");

        // Printed with its source; loaded back from the printed file (secrets are not
        // printed, so they do not come back).
        let printed = merge(
            &by_flag.config,
            |k| (k == *key).then_some(Source::Flag),
            None,
        );
        let text = printed.to_toml();
        assert!(text.contains(&format!("\n# {key}: flag\n")), "{text}");
        let reloaded = parse_file(path(), &text).expect("printed config parses");
        let again = merge(&ServeConfig::default(), |_| None, Some((path(), &reloaded)));
        if setting.secret {
            assert!(!text.contains(value), "{key}: secret printed:\n{text}");
            assert!(text.contains(&format!("# {key} = <redacted>")), "{text}");
            assert_eq!(again.config, ServeConfig::default(), "{key}");
        } else {
            assert!(reloaded.sets(key), "{key} not printed as a key:\n{text}");
            assert_eq!(again.config, by_flag.config, "{key}: {text}");
        }
        assert_eq!(again.sources.len(), SETTINGS.len());

        // The file key alone.
        let line = match setting.show(&by_flag.config) {
            Some(_) if setting.secret => format!("{key} = {}", toml::Value::from(*value)),
            Some(shown) => format!("{key} = {shown}"),
            None => panic!("{key}: a set sample shows as unset"),
        };
        let file = parse_file(path(), &line).expect(&line);
        assert_eq!(file.keys(), &[*key][..]);
        let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
        assert_eq!(eff.config, by_flag.config, "{line}");
        assert_eq!(eff.source(key), Some(Source::File), "{line}");
    }
}

/// The arguments that give `setting` the value `v` and keep every setting that must be
/// at least `setting` (`retry_max_ms` of `retry_initial_ms`) above it.
fn with_value(setting: &Setting, v: u64) -> Vec<String> {
    let mut argv = vec![format!("--{}={v}", setting.flag())];
    for s in SETTINGS {
        if let Allowed::Range {
            max,
            at_least: Some(floor),
            ..
        } = s.spec.allowed
        {
            if floor == setting.key {
                argv.push(format!("--{}={max}", s.flag()));
            }
        }
    }
    argv
}

#[test]
fn settings_ranges_hold_on_flags_and_in_the_file_and_contain_the_defaults() {
    let defaults = ServeConfig::default();
    let mut ranges = 0;
    for setting in SETTINGS {
        let Allowed::Range { min, max, at_least } = setting.spec.allowed else {
            assert_eq!(setting.check_range(&defaults), Ok(()));
            continue;
        };
        ranges += 1;
        let (key, flag) = (setting.key, setting.flag());
        let default = setting.number(&defaults).expect("a range is a number's");
        let low = match at_least {
            Some(floor) => {
                let floor = Setting::find(floor).expect("at_least names a setting");
                assert!(matches!(floor.spec.allowed, Allowed::Range { .. }), "{key}");
                floor.number(&defaults).expect("a number").max(min)
            }
            None => min,
        };
        assert!(
            (low..=max).contains(&default),
            "{key}: default {default} out of range"
        );
        let between = format!("between {low} and {max}");
        for v in [low, max] {
            let argv = with_value(setting, v);
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (args, matches) = parse(&argv);
            resolve(&args, &matches).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        }
        let mut outside = vec![max + 1];
        if low > 0 {
            outside.push(low - 1);
        }
        for v in outside {
            let (args, matches) = parse(&[&format!("--{flag}={v}")]);
            match resolve(&args, &matches) {
                Err(ConfigFileError::Invalid(e)) => {
                    assert_eq!(e.field, flag);
                    assert_eq!(e.value, v.to_string());
                    assert_eq!(e.allowed, format!("must be {between}"));
                }
                other => panic!("--{flag}={v}: {other:?}"),
            }
            let file = parse_file(path(), &format!("{key} = {v}")).expect("an integer");
            let eff = merge(&defaults, |_| None, Some((path(), &file)));
            let msg = eff.validate().expect_err("out of range").to_string();
            let wanted = format!("{key} = {v}: out of range; allowed: {between}");
            assert!(msg.contains(&wanted), "{msg} lacks {wanted}");
        }
        let wrong_type = parse_file(path(), &format!("{key} = \"ten\""))
            .expect_err("a string is no number")
            .to_string();
        assert!(wrong_type.contains("an integer between"), "{wrong_type}");
    }
    assert_eq!(ranges, 10, "the numeric settings");
}

#[test]
fn settings_secrets_are_the_tokens_and_notes_only_on_optional_settings() {
    let defaults = ServeConfig::default();
    for setting in SETTINGS {
        let key = setting.key;
        assert_eq!(
            setting.secret,
            setting.spec.allowed == Allowed::Token,
            "{key}"
        );
        if setting.secret {
            // The printed comment sends the reader to the token's file setting.
            assert!(Setting::find(&format!("{key}_file")).is_some(), "{key}");
        }
        if setting.spec.unset.is_some() {
            assert_eq!(setting.show(&defaults), None, "{key} is set by default");
        }
    }
}

#[test]
fn settings_give_the_engine_runtime_transport_and_log_their_options() {
    let defaults = ServeConfig::default();
    assert_eq!(defaults.engine_config(), EngineConfig::default());
    let cfg = ServeConfig {
        prepare_timeout_ms: 1,
        tx_timeout_ms: 2,
        retry_initial_ms: 3,
        retry_max_ms: 4,
        max_branches: 5,
        one_phase: false,
        commit_wait_ms: 6,
        rpc_timeout_ms: 7,
        connect_timeout_ms: 8,
        group_commit_delay_us: 9,
        ..defaults
    };
    let engine = cfg.engine_config();
    assert_eq!(
        engine,
        EngineConfig {
            prepare_timeout_ms: 1,
            tx_timeout_ms: 2,
            max_tx_timeout_ms: EngineConfig::DEFAULT.max_tx_timeout_ms,
            max_branches: 5,
            retry_initial_ms: 3,
            retry_max_ms: 4,
            one_phase: false,
        }
    );
    let runtime = cfg.runtime_options();
    assert_eq!(runtime.engine, engine);
    assert_eq!(runtime.commit_wait, Duration::from_millis(6));
    let transport = cfg.transport_options();
    assert_eq!(transport.rpc_timeout, Duration::from_millis(7));
    assert_eq!(transport.connect_timeout, Duration::from_millis(8));
    assert_eq!(cfg.log_options().group_commit_delay_us, 9);
    // tx_timeout_ms may go up to what a Begin may ask for, no further.
    let tx = Setting::find("tx_timeout_ms").expect("a setting");
    assert!(matches!(
        tx.spec.allowed,
        Allowed::Range { max, .. } if max == EngineConfig::DEFAULT.max_tx_timeout_ms
    ));
}

#[test]
fn settings_default_ignores_the_environment() {
    // No other test reads the real variables (`parse_env` replaces them all).
    std::env::set_var("TWOPC_MAX_BRANCHES", "7");
    let defaults = super::settings::built_in_defaults();
    std::env::remove_var("TWOPC_MAX_BRANCHES");
    assert_eq!(defaults.max_branches, 64);
    assert_eq!(defaults, ServeConfig::default());
    assert_eq!(defaults.listen, SocketAddr::from(([127, 0, 0, 1], 7400)));
    assert_eq!(defaults.data_dir, PathBuf::from("twopc-data"));
}

#[test]
fn token_form_is_checked_without_showing_it() {
    assert!(check_token("client-token", &Secret::new("client-token-0123456789")).is_ok());
    for bad in ["short", "has a space in it 12345", "tab\there-0123456789"] {
        let e = check_token("client-token", &Secret::new(bad)).expect_err(bad);
        assert_eq!(e.field, "client-token");
        assert_eq!(e.value, "<redacted>");
        assert!(!e.to_string().contains(bad), "{e}");
    }
    assert_eq!(
        format!("{:?}", Secret::new("client-token-0123")),
        "<redacted>"
    );
}

/// Every rule `validate` writes out by hand (addresses, data directory, OTLP, TLS pairs,
/// tokens) names a field that is a flag of the settings table, so `--config` errors
/// blame the right key (they are mapped back through `Setting::by_flag`) and a renamed
/// setting cannot leave a rule naming a flag that no longer exists.
#[test]
fn every_written_out_rule_names_a_setting() {
    let path = || Some(PathBuf::from("x.pem"));
    let token = |t: &str| Some(Secret::new(t));
    let base = ServeConfig::default;
    let cases: Vec<(&str, ServeConfig)> = vec![
        (
            "metrics-listen",
            ServeConfig {
                metrics_listen: Some(base().listen),
                ..base()
            },
        ),
        (
            "data-dir",
            ServeConfig {
                data_dir: PathBuf::new(),
                ..base()
            },
        ),
        (
            "otlp-endpoint",
            ServeConfig {
                otlp_endpoint: Some("not a url".into()),
                ..base()
            },
        ),
        (
            "otlp-service-name",
            ServeConfig {
                otlp_service_name: " ".into(),
                ..base()
            },
        ),
        (
            "tls-key",
            ServeConfig {
                tls_cert: path(),
                ..base()
            },
        ),
        (
            "tls-cert",
            ServeConfig {
                tls_key: path(),
                ..base()
            },
        ),
        (
            "tls-client-ca",
            ServeConfig {
                tls_client_ca: path(),
                ..base()
            },
        ),
        (
            "participant-key",
            ServeConfig {
                participant_cert: path(),
                ..base()
            },
        ),
        (
            "participant-cert",
            ServeConfig {
                participant_cert: path(),
                participant_key: path(),
                ..base()
            },
        ),
        (
            "client-token-file",
            ServeConfig {
                client_token: token("client-token-0123456789"),
                client_token_file: path(),
                ..base()
            },
        ),
        (
            "admin-token-file",
            ServeConfig {
                admin_token: token("admin-token-0123456789"),
                admin_token_file: path(),
                ..base()
            },
        ),
        (
            "admin-token",
            ServeConfig {
                client_token: token("same-token-0123456789"),
                admin_token: token("same-token-0123456789"),
                ..base()
            },
        ),
        (
            "client-token",
            ServeConfig {
                client_token: token("short"),
                ..base()
            },
        ),
        (
            "etcd-endpoints",
            ServeConfig {
                decision_log: DecisionLogKind::Etcd,
                ..base()
            },
        ),
        (
            "etcd-endpoints",
            ServeConfig {
                etcd_endpoints: Some("http://127.0.0.1:2379".into()),
                ..base()
            },
        ),
        (
            "etcd-cluster",
            ServeConfig {
                etcd_cluster: "no/slash".into(),
                ..base()
            },
        ),
    ];
    for (field, config) in cases {
        let e = config.validate().expect_err(field);
        assert_eq!(e.field, field, "{e}");
        assert!(
            Setting::by_flag(e.field).is_some(),
            "the rule names --{}, which is no setting",
            e.field
        );
    }
}
