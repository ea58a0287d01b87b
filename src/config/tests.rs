use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn ok(text: &str) -> Config {
    Config::from_sources(text, &HashMap::new()).unwrap_or_else(|e| panic!("{e}"))
}

/// The errors of an invalid config, as `field: message` lines.
fn errors(text: &str) -> Vec<String> {
    errors_with(text, &HashMap::new())
}

fn errors_with(text: &str, env: &HashMap<String, String>) -> Vec<String> {
    match Config::from_sources(text, env) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts that exactly one error names `field` and its message contains `needle`.
fn assert_error(text: &str, field: &str, needle: &str) {
    let errs = errors(text);
    assert!(
        errs.iter().any(|e| e.starts_with(&format!("{field}: ")) && e.contains(needle)),
        "expected {field}: …{needle}… in {errs:#?}"
    );
}

const UP: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

#[test]
fn minimal_config_takes_every_default() {
    let c = ok(UP);
    assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.admin.listen, "0.0.0.0:9090".parse().unwrap());
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(20));
    assert_eq!(c.server.max_header_bytes, 65536);
    assert_eq!(c.server.workers, std::thread::available_parallelism().unwrap().get(), "one worker per core");
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(1));
    assert_eq!(c.upstream.response_timeout, Duration::from_secs(30));
    assert!(c.redis.is_none(), "no [redis] means the embedded store");
    assert_eq!(c.log.format, LogFormat::Json);
    assert!(c.routes.is_empty());
    assert!(c.cache_enabled && c.rate_limit_enabled);
    assert_eq!(c.cache_memory_max, 64 << 20);
    assert_eq!(c.cache_hot_ttl, Duration::from_secs(1));
}

#[test]
fn the_shipped_example_is_valid() {
    let c = ok(include_str!("../../proxy.toml"));
    assert_eq!(c.routes.len(), 2);
}

#[test]
fn full_shape_is_typed() {
    let c = ok(r#"
[server]
listen = "127.0.0.1:8081"
trusted_proxies = ["10.0.0.0/8", "192.168.1.1"]
shutdown_grace = "5s"
tls = { cert = "/tls/tls.crt", key = "/tls/tls.key" }
[admin]
listen = "127.0.0.1:9091"
[upstream]
url = "https://backend:3443"
connect_timeout = "250ms"
response_timeout = "2m"
[redis]
url = "redis://127.0.0.1:6379/0"
key_prefix = "sc:"
op_timeout = "20ms"
breaker_failures = 5
breaker_cooldown = "1s"
[log]
format = "pretty"
level = "sidecache=debug,info"
[[route]]
name = "catalog"
path = "/api/models/*"
cache = { ttl = "5m", vary = ["Accept-Encoding"], query = ["page", "limit"], stale_while_revalidate = "30s", stale_if_error = "10m", statuses = [200, 404], max_body = 2048, respect_origin = false }
rate_limit = { burst = 100, rate = "100/1m", key = "header:X-Api-Key", on_redis_error = "local" }
"#);
    assert_eq!(c.server.trusted_proxies.len(), 2);
    assert_eq!(c.upstream.url.scheme_str(), Some("https"));
    let redis = c.redis.unwrap();
    assert_eq!((redis.op_timeout, redis.breaker_failures.get()), (Duration::from_millis(20), 5));
    let r = &c.routes[0];
    let cache = r.cache.as_ref().unwrap();
    assert_eq!(cache.ttl, Some(Duration::from_secs(300)));
    assert_eq!(cache.vary, vec![HeaderName::from_static("accept-encoding")]);
    assert_eq!(cache.query, QueryMode::Only(vec!["limit".into(), "page".into()]));
    assert_eq!(cache.statuses, vec![StatusCode::OK, StatusCode::NOT_FOUND]);
    assert_eq!((cache.max_body, cache.respect_origin), (2048, false));
    let rl = r.rate_limit.as_ref().unwrap();
    assert_eq!(rl.burst.get(), 100);
    assert_eq!(rl.rate.per, Duration::from_secs(60));
    assert_eq!(rl.key, ClientKey::Header(HeaderName::from_static("x-api-key")));
    assert_eq!(rl.on_redis_error, OnRedisError::Local);
    assert_eq!(r.methods, vec![Method::GET, Method::HEAD]);
}

#[test]
fn structural_errors_name_their_field() {
    assert_error(&format!("{UP}[server]\nlisen = \"x\"\n"), "server.lisen", "unknown field `lisen`");
    assert_error(&format!("{UP}[bogus]\n"), "bogus", "unknown field `bogus`");
    assert_error(
        &format!("{UP}[[route]]\nname = \"a\"\npath = \"/a\"\ncache = {{ ttl = 5 }}\n"),
        "route[0].cache.ttl",
        "invalid type",
    );
    assert_error(
        &format!("{UP}[[route]]\nname = \"a\"\npath = \"/a\"\ncache = {{ tll = \"5m\" }}\n"),
        "route[0].cache.tll",
        "unknown field",
    );
    assert_error(&format!("{UP}[[route]]\nname = \"a\"\n"), "route[0]", "missing field `path`");
    assert_error("[upstream\n", "proxy.toml", "TOML parse error");
}

#[test]
fn value_errors_are_all_reported_with_fields() {
    let errs = errors(
        r#"
[server]
listen = "nowhere"
trusted_proxies = ["10.0.0.0/99"]
shutdown_grace = "soon"
max_header_bytes = 10
workers = 0
[upstream]
url = "ftp://x"
connect_timeout = "0s"
[redis]
url = "http://redis"
op_timeout = "5x"
breaker_failures = 0
[log]
format = "xml"
level = "=bad=="
[cache]
memory_max = 10
[[route]]
name = "a"
path = "api"
methods = ["GET", "G E T", "GET"]
cache = { ttl = "5x", vary = ["bad header"], query = "shuffle", statuses = [99, 700], max_body = -1 }
rate_limit = { burst = 0, rate = "fast", key = "cookie", on_redis_error = "panic" }
[[route]]
name = "a"
path = "/b/*/c"
"#,
    );
    let fields: Vec<&str> = errs.iter().map(|e| e.split(": ").next().unwrap()).collect();
    for expected in [
        "server.listen",
        "server.trusted_proxies[0]",
        "server.shutdown_grace",
        "server.max_header_bytes",
        "server.workers",
        "upstream.url",
        "upstream.connect_timeout",
        "redis.url",
        "redis.op_timeout",
        "redis.breaker_failures",
        "log.format",
        "log.level",
        "cache.memory_max",
        "route[0].path",
        "route[0].methods[1]",
        "route[0].methods[2]",
        "route[0].cache.ttl",
        "route[0].cache.vary[0]",
        "route[0].cache.query",
        "route[0].cache.statuses[0]",
        "route[0].cache.statuses[1]",
        "route[0].cache.max_body",
        "route[0].rate_limit.burst",
        "route[0].rate_limit.rate",
        "route[0].rate_limit.key",
        "route[0].rate_limit.on_redis_error",
        "route[1].name",
        "route[1].path",
    ] {
        assert!(fields.contains(&expected), "no error for {expected} in {errs:#?}");
    }
    assert_eq!(fields.len(), 28, "{errs:#?}");
}

#[test]
fn specific_messages() {
    assert_error("", "upstream.url", "is required");
    assert_error("[upstream]\nurl = \"127.0.0.1:3000\"\n", "upstream.url", "http:// or https://");
    assert_error("[upstream]\nurl = \"http://\"\n", "upstream.url", "");
    assert_error("[upstream]\nurl = \"http://x:3000/base\"\n", "upstream.url", "must not have a path");
    assert_error(
        &format!("{UP}[[route]]\nname = \"a\"\npath = \"/a\"\n[[route]]\nname = \"a\"\npath = \"/b\"\n"),
        "route[1].name",
        "used by an earlier route",
    );
    assert_error(&format!("{UP}[[route]]\nname = \"has space\"\npath = \"/a\"\n"), "route[0].name", "characters");
    assert_error(&format!("{UP}[[route]]\nname = \"-\"\npath = \"/a\"\n"), "route[0].name", "starting with");
    assert_error(&format!("{UP}[[route]]\nname = \"a\"\npath = \"/a/{{x\"\n"), "route[0].path", "whole segment");
    assert_error(
        &format!("{UP}[[route]]\nname = \"a\"\npath = \"/a\"\nmethods = [\"POST\"]\ncache = {{ ttl = \"1m\" }}\n"),
        "route[0].cache",
        "no GET",
    );
    assert_error(
        &format!("{UP}[server]\nlisten = \"127.0.0.1:8080\"\n[admin]\nlisten = \"127.0.0.1:8080\"\n"),
        "admin.listen",
        "same address",
    );
    let secret = errors("[upstream]\nurl = \"http://x\"\n[redis]\nurl = \"memcached://user:hunter2@h\"\n");
    assert!(!secret.iter().any(|e| e.contains("hunter2")), "passwords never reach error text: {secret:?}");
}

#[test]
fn cache_settings_that_could_never_store_or_would_store_a_part() {
    let route = |cache: &str| format!("{UP}[[route]]\nname = \"a\"\npath = \"/a\"\ncache = {{ {cache} }}\n");
    for status in [206, 304, 101] {
        assert_error(
            &route(&format!("ttl = \"1m\", statuses = [200, {status}]")),
            "route[0].cache.statuses[1]",
            "storable",
        );
    }
    assert_error(&route("respect_origin = false"), "route[0].cache.respect_origin", "no ttl");
    ok(&route("respect_origin = false, ttl = \"1m\""));
    ok(&route("statuses = [200, 203, 301, 404, 410]"));
    let c = ok(&format!("{UP}[cache]\nlock_timeout = \"250ms\"\n"));
    assert_eq!(c.cache_lock_timeout, Duration::from_millis(250));
    assert_eq!(ok(UP).cache_lock_timeout, Duration::from_secs(5), "nginx's default");
    assert_error(&format!("{UP}[cache]\nlock_timeout = \"soon\"\n"), "cache.lock_timeout", "not a duration");
}

#[test]
fn limits_may_fail_closed_or_run_in_shadow() {
    let route = |rl: &str| {
        format!("{UP}[[route]]\nname = \"a\"\npath = \"/a\"\nrate_limit = {{ burst = 1, rate = \"1/s\", {rl} }}\n")
    };
    let rl = |text: &str| ok(text).routes[0].rate_limit.clone().unwrap();
    assert_eq!(rl(&route("on_redis_error = \"deny\"")).on_redis_error, OnRedisError::Deny);
    assert_eq!(rl(&route("mode = \"shadow\"")).mode, LimitMode::Shadow);
    assert_eq!(rl(&route("mode = \"enforce\"")).mode, LimitMode::Enforce);
    assert_eq!(rl(&route("key = \"ip\"")).mode, LimitMode::Enforce, "the default");
    assert_error(&route("mode = \"loud\""), "route[0].rate_limit.mode", "enforce, shadow");
    assert_error(&route("on_redis_error = \"panic\""), "route[0].rate_limit.on_redis_error", "allow, local, deny");
}

#[test]
fn environment_overrides_and_kill_switches() {
    let text = format!(
        "{UP}[redis]\nurl = \"redis://file:6379\"\n[[route]]\nname = \"a\"\npath = \"/a\"\ncache = {{ ttl = \"1m\" }}\nrate_limit = {{ burst = 1, rate = \"1/s\" }}\n"
    );
    let c = Config::from_sources(
        &text,
        &env(&[
            ("SIDECACHE_UPSTREAM_URL", "http://env-backend:8000"),
            ("SIDECACHE_REDIS_URL", "redis://env-redis:6379"),
            ("SIDECACHE_CACHE_ENABLED", "false"),
            ("SIDECACHE_RATE_LIMIT_ENABLED", "0"),
        ]),
    )
    .unwrap();
    assert_eq!(c.upstream.url.to_string(), "http://env-backend:8000/");
    assert_eq!(c.redis.as_ref().unwrap().url, "redis://env-redis:6379");
    assert!(!c.cache_enabled && !c.rate_limit_enabled);
    assert!(c.routes[0].cache.is_none() && c.routes[0].rate_limit.is_none());

    let c = Config::from_sources(&text, &env(&[("SIDECACHE_REDIS_URL", "")])).unwrap();
    assert!(c.redis.is_none(), "an empty SIDECACHE_REDIS_URL selects the embedded store");
    let c = Config::from_sources("", &env(&[("SIDECACHE_UPSTREAM_URL", "http://only-env:1")])).unwrap();
    assert_eq!(c.upstream.url.host(), Some("only-env"));

    let errs =
        errors_with(&text, &env(&[("SIDECACHE_CACHE_ENABLED", "maybe"), ("SIDECACHE_UPSTREAM_URL", "gopher://x")]));
    assert!(errs.iter().any(|e| e.starts_with("SIDECACHE_CACHE_ENABLED: ")), "{errs:?}");
    assert!(errs.iter().any(|e| e.starts_with("SIDECACHE_UPSTREAM_URL: ")), "{errs:?}");
}

#[test]
fn summary_hides_redis_passwords() {
    let c = ok("[upstream]\nurl = \"http://x\"\n[redis]\nurl = \"rediss://app:hunter2@redis:6380\"\n");
    let s = c.summary();
    assert!(s.contains("rediss://app:***@redis:6380") && !s.contains("hunter2"), "{s}");
}

#[test]
fn redis_topologies_credentials_and_tls() {
    let c = ok(&format!(
        "{UP}[redis]\nurl = \"rediss://app:from-url@redis:6380/2\"\ntls = {{ ca_file = \"/ca.pem\", cert_file = \"/c.pem\", key_file = \"/k.pem\" }}\n"
    ));
    let r = c.redis.unwrap();
    assert_eq!(r.topology, RedisTopology::Standalone(RedisNode { host: "redis".into(), port: 6380 }));
    assert_eq!((r.username.as_deref(), r.password.as_deref(), r.database), (Some("app"), Some("from-url"), Some(2)));
    let tls = r.tls.unwrap();
    assert_eq!(tls.ca_file.as_deref(), Some(std::path::Path::new("/ca.pem")));
    assert_eq!(tls.client_cert.map(|f| f.key), Some(PathBuf::from("/k.pem")));
    assert!(!tls.insecure_skip_verify);

    // Credentials from the environment win over the URL's; TLS without a table uses the defaults.
    let text = format!("{UP}[redis]\nurl = \"rediss-sentinel://u:p@s1,s2:26380/mymaster\"\n");
    let secrets = env(&[
        ("SIDECACHE_REDIS_USERNAME", "acl-user"),
        ("SIDECACHE_REDIS_PASSWORD", "env-secret"),
        ("SIDECACHE_REDIS_SENTINEL_PASSWORD", "sentinel-secret"),
    ]);
    let r = Config::from_sources(&text, &secrets).unwrap().redis.unwrap();
    assert_eq!((r.username.as_deref(), r.password.as_deref()), (Some("acl-user"), Some("env-secret")));
    assert_eq!((r.sentinel_username, r.sentinel_password.as_deref()), (None, Some("sentinel-secret")));
    assert!(r.tls.is_some_and(|t| t.ca_file.is_none() && t.client_cert.is_none()));
    assert_eq!(r.topology.mode(), "sentinel");
    let summary = Config::from_sources(&text, &secrets).unwrap().summary();
    assert!(summary.contains("sentinel rediss-sentinel://u:***@s1,s2:26380/mymaster (TLS)"), "{summary}");
    assert!(!summary.contains("secret"), "{summary}");

    let insecure = format!("{UP}[redis]\nurl = \"rediss://h\"\ntls = {{ insecure_skip_verify = true }}\n");
    assert!(ok(&insecure).summary().contains("NOT verified"));
}

#[test]
fn redis_settings_that_do_not_fit_are_errors() {
    assert_error(
        &format!("{UP}[redis]\nurl = \"redis://h\"\ntls = {{ ca_file = \"/ca.pem\" }}\n"),
        "redis.tls",
        "rediss://",
    );
    assert_error(
        &format!("{UP}[redis]\nurl = \"rediss://h\"\ntls = {{ cert_file = \"/c.pem\" }}\n"),
        "redis.tls.key_file",
        "required with cert_file",
    );
    assert_error(&format!("{UP}[redis]\nurl = \"redis-cluster://a:7000/3\"\n"), "redis.url", "database 0");
    assert_error(
        &format!("{UP}[redis]\nurl = \"redis://h\"\ntls = {{ verify = false }}\n"),
        "redis.tls.verify",
        "unknown field",
    );
    let errs = errors_with(
        &format!("{UP}[redis]\nurl = \"redis://h\"\n"),
        &env(&[("SIDECACHE_REDIS_SENTINEL_PASSWORD", "x")]),
    );
    assert!(errs.iter().any(|e| e.starts_with("SIDECACHE_REDIS_SENTINEL_PASSWORD: ")), "{errs:?}");
}

#[test]
fn a_reload_keeps_the_running_values_of_restart_only_settings_and_names_them() {
    let running = ok(&format!("[server]\nlisten = \"127.0.0.1:8080\"\nworkers = 2\n{UP}[log]\nformat = \"json\"\n"));
    let text = "[server]\nlisten = \"127.0.0.1:8081\"\nworkers = 2\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
                [upstream]\nurl = \"http://127.0.0.1:4000\"\n\
                [redis]\nurl = \"redis://127.0.0.1:6380\"\n\
                [cache]\nhot_ttl = \"2s\"\n\
                [log]\nformat = \"pretty\"\nlevel = \"debug\"\n\
                [[route]]\nname = \"a\"\npath = \"/a\"\n";
    let mut new = ok(text);
    let changed = new.keep_restart_only(&running);
    assert_eq!(changed, ["server.listen", "upstream", "redis", "log.format", "cache.hot_ttl"]);
    assert_eq!(new.server.listen, running.server.listen);
    assert_eq!((new.upstream.url.clone(), new.redis.is_none()), (running.upstream.url.clone(), true));
    assert_eq!((new.log.format, new.cache_hot_ttl), (running.log.format, running.cache_hot_ttl));
    // What a reload does apply is left as loaded.
    assert_eq!(new.server.trusted_proxies, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    assert_eq!((new.log.level.as_str(), new.routes.len(), new.hash.as_str()), ("debug", 1, text_hash(text).as_str()));
    assert!(new.clone().keep_restart_only(&running).is_empty(), "nothing left to keep");
}

#[test]
fn telemetry_is_off_unless_an_endpoint_is_configured() {
    assert_eq!(ok(UP).telemetry, None);
    assert_eq!(ok(&format!("{UP}[telemetry]\nservice_name = \"edge\"\nsample_ratio = 0.5\n")).telemetry, None);
    let table = format!("{UP}[telemetry]\notlp_endpoint = \"http://collector:4318/\"\n");
    let on = |pairs: &[(&str, &str)]| Config::from_sources(&table, &env(pairs)).unwrap().telemetry;
    assert_eq!(
        on(&[]),
        Some(TelemetryConfig {
            traces_endpoint: Some("http://collector:4318/v1/traces".into()),
            service_name: Some("sidecache".into()),
            sample_ratio: None,
            timeout: Duration::from_secs(10),
            ca_file: None,
        })
    );
    assert_eq!(on(&[("OTEL_SDK_DISABLED", "TRUE")]), None);
    assert_eq!(on(&[("OTEL_TRACES_EXPORTER", "none")]), None);
    assert!(on(&[("OTEL_SDK_DISABLED", "false"), ("OTEL_TRACES_EXPORTER", "otlp")]).is_some());
    // A variable alone turns traces on; the exporter reads it itself.
    let from_env = Config::from_sources(UP, &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318")])).unwrap();
    assert_eq!(from_env.telemetry.map(|t| t.traces_endpoint), Some(None));
    let traces_only = env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://otel/v1/traces")]);
    assert!(Config::from_sources(UP, &traces_only).unwrap().telemetry.is_some());
    assert_eq!(Config::from_sources(UP, &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap().telemetry, None);
}

#[test]
fn telemetry_variables_win_over_the_table() {
    let table = format!(
        "{UP}[telemetry]\notlp_endpoint = \"http://collector:4318\"\nservice_name = \"edge\"\nsample_ratio = 0.25\n"
    );
    let with = |pairs: &[(&str, &str)]| Config::from_sources(&table, &env(pairs)).unwrap().telemetry.unwrap();
    let table_only = with(&[]);
    assert_eq!((table_only.service_name.as_deref(), table_only.sample_ratio), (Some("edge"), Some(0.25)));
    assert_eq!(with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4318")]).traces_endpoint, None);
    assert_eq!(with(&[("OTEL_SERVICE_NAME", "from-env")]).service_name, None);
    assert_eq!(with(&[("OTEL_RESOURCE_ATTRIBUTES", "team=a, service.name=from-env")]).service_name, None);
    assert_eq!(with(&[("OTEL_RESOURCE_ATTRIBUTES", "service.namespace=a")]).service_name.as_deref(), Some("edge"));
    assert_eq!(with(&[("OTEL_TRACES_SAMPLER", "always_on")]).sample_ratio, None);
}

#[test]
fn invalid_telemetry_settings_are_refused_with_their_field() {
    let table = |body: &str| format!("{UP}[telemetry]\n{body}\n");
    assert_error(&table("sample_ratio = 1.5"), "telemetry.sample_ratio", "1.5 is not a ratio from 0 to 1");
    assert_error(&table("sample_ratio = -0.1"), "telemetry.sample_ratio", "is not a ratio");
    assert_error(&table("otlp_endpoint = \"collector:4318\""), "telemetry.otlp_endpoint", "http:// or https://");
    assert_error(&table("otlp_endpoint = \"grpc://c:4317\""), "telemetry.otlp_endpoint", "http:// or https://");
    assert_error(&table("service_name = \" \""), "telemetry.service_name", "must not be empty");
    assert_error(&table("endpoint = \"http://c\""), "telemetry.endpoint", "unknown field");
    let on = format!("{UP}[telemetry]\notlp_endpoint = \"http://c:4318\"\n");
    let refused = |pairs: &[(&str, &str)], field: &str, needle: &str| {
        let errs = errors_with(&on, &env(pairs));
        assert!(
            errs.iter().any(|e| e.starts_with(&format!("{field}: ")) && e.contains(needle)),
            "expected {field}: …{needle}… in {errs:#?}"
        );
    };
    refused(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")], "OTEL_EXPORTER_OTLP_PROTOCOL", "\"grpc\" is not supported");
    refused(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")], "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json");
    refused(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")], "OTEL_EXPORTER_OTLP_ENDPOINT", "http://");
    refused(&[("OTEL_TRACES_EXPORTER", "console")], "OTEL_TRACES_EXPORTER", "otlp, none");
    refused(&[("OTEL_TRACES_SAMPLER", "ratio")], "OTEL_TRACES_SAMPLER", "\"ratio\" is not supported");
    let ratio = |arg| [("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", arg)];
    refused(&ratio("10%"), "OTEL_TRACES_SAMPLER_ARG", "not a ratio");
    refused(&ratio("1.5"), "OTEL_TRACES_SAMPLER_ARG", "not a ratio");
    refused(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "5s")], "OTEL_EXPORTER_OTLP_TIMEOUT", "milliseconds");
    refused(&[("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")], "OTEL_EXPORTER_OTLP_CLIENT_KEY", "not supported");
    let set = |pairs: &[(&str, &str)]| Config::from_sources(&on, &env(pairs)).unwrap().telemetry.unwrap();
    assert_eq!(set(&ratio("0.25")).sample_ratio, None, "the SDK reads the sampler itself");
    let timeouts = [("OTEL_EXPORTER_OTLP_TIMEOUT", "3000"), ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1500")];
    assert_eq!(set(&timeouts[..1]).timeout, Duration::from_secs(3));
    assert_eq!(set(&timeouts).timeout, Duration::from_millis(1500), "the traces variable wins");
    let ca = set(&[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem")]).ca_file;
    assert_eq!(ca, Some(PathBuf::from("/etc/ca.pem")));
    // Variables of the SDK that is switched off are not its business any more.
    let off = env(&[("OTEL_SDK_DISABLED", "true"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
    assert!(Config::from_sources(&on, &off).unwrap().telemetry.is_none());
    let accepted = env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]);
    assert!(Config::from_sources(&on, &accepted).unwrap().telemetry.is_some());
}

#[test]
fn encryption_keys_come_from_the_environment_or_files_and_bad_ones_are_named_not_shown() {
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const OLD: &str = "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo";
    let by_env = format!("{UP}[cache]\nencryption_key_env = \"SIDECACHE_CACHE_KEY\"\n");
    let keys = |pairs: &[(&str, &str)]| Config::from_sources(&by_env, &env(pairs)).map(|c| c.cache_encryption.unwrap());
    let current = keys(&[("SIDECACHE_CACHE_KEY", KEY)]).unwrap();
    assert_eq!((current.current.bytes()[31], current.previous.is_none()), (31, true));
    let rotating = keys(&[("SIDECACHE_CACHE_KEY", KEY), ("SIDECACHE_CACHE_KEY_PREVIOUS", OLD)]).unwrap();
    assert_eq!(rotating.previous.as_ref().map(|k| k.bytes()[0]), Some(31), "unpadded base64 is fine");
    assert_ne!(rotating.current.id(), rotating.previous.unwrap().id());
    let printed = format!("{current:?}");
    assert!(
        printed.contains(&current.current.id_hex()) && !printed.contains("AAECAw") && !printed.contains("[0, 1, 2")
    );
    assert_eq!(ok(UP).cache_encryption, None, "off by default");

    let named = |pairs: &[(&str, &str)], field: &str, needle: &str| {
        let errs = errors_with(&by_env, &env(pairs));
        assert!(
            errs.iter().any(|e| e.starts_with(&format!("{field}: ")) && e.contains(needle)),
            "{field} {needle}: {errs:#?}"
        );
        assert!(!errs.iter().any(|e| e.contains("not-base64") || e.contains("AAECAw")), "no key material: {errs:#?}");
    };
    named(&[], "cache.encryption_key_env", "SIDECACHE_CACHE_KEY, which is not set");
    named(&[("SIDECACHE_CACHE_KEY", "not-base64!")], "SIDECACHE_CACHE_KEY", "is not base64");
    named(&[("SIDECACHE_CACHE_KEY", "AAECAwQFBgcICQoLDA0ODw==")], "SIDECACHE_CACHE_KEY", "is 16 bytes once decoded");
    named(
        &[("SIDECACHE_CACHE_KEY", KEY), ("SIDECACHE_CACHE_KEY_PREVIOUS", "AAECAw==")],
        "SIDECACHE_CACHE_KEY_PREVIOUS",
        "is 4 bytes",
    );

    named(
        &[("SIDECACHE_CACHE_KEY", KEY), ("SIDECACHE_CACHE_KEY_PREVIOUS", KEY)],
        "SIDECACHE_CACHE_KEY_PREVIOUS",
        "is the current key",
    );

    let dir = std::env::temp_dir().join(format!("sidecache-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("current"), format!("{KEY}\n")).unwrap();
    let file = |extra: &str| format!("{UP}[cache]\nencryption_key_file = {:?}\n{extra}", dir.join("current"));
    assert!(ok(&file("")).cache_encryption.is_some_and(|k| k.current.bytes()[1] == 1), "a trailing newline is fine");
    let missing = format!("previous_encryption_key_file = {:?}\n", dir.join("absent"));
    assert_error(&file(&missing), "cache.previous_encryption_key_file", "cannot read");
    assert_error(&file("encryption_key_env = \"K\"\n"), "cache.encryption_key_file", "not both");
    assert_error(
        &format!("{UP}[cache]\nprevious_encryption_key_file = \"/k\"\n"),
        "cache.previous_encryption_key_file",
        "needs encryption_key_file",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_admin_token_comes_from_the_environment_and_is_never_printed() {
    let token = |value: &str| Config::from_sources(UP, &env(&[("SIDECACHE_ADMIN_TOKEN", value)]));
    assert!(ok(UP).admin.token.is_none());
    assert!(token("  ").unwrap().admin.token.is_none(), "empty is unset");
    let config = token("0123456789abcdef\n").unwrap();
    assert!(config.admin.token.as_ref().is_some_and(|t| t.matches(b"0123456789abcdef")));
    assert!(!format!("{config:?}").contains("0123456789abcdef"));
    for bad in ["short", "0123456789abcdef with spaces"] {
        let errs = errors_with(UP, &env(&[("SIDECACHE_ADMIN_TOKEN", bad)]));
        assert!(errs.iter().any(|e| e.starts_with("SIDECACHE_ADMIN_TOKEN: ") && !e.contains(bad)), "{errs:?}");
    }
}

#[test]
fn upgrades_default_to_websocket_and_never_include_h2c() {
    assert_eq!(ok(UP).server.upgrades, ["websocket"]);
    let listed = |list: &str| format!("[server]\nupgrades = {list}\n{UP}");
    assert_eq!(ok(&listed("[\"WebSocket\", \"TLS\"]")).server.upgrades, ["websocket", "tls"]);
    assert!(ok(&listed("[]")).server.upgrades.is_empty());
    assert_error(&listed("[\"h2c\"]"), "server.upgrades[0]", "cannot be tunnelled");
    assert_error(&listed("[\"web socket\"]"), "server.upgrades[0]", "is not a protocol name");
}

#[test]
fn connection_deadlines_default_and_are_bounded() {
    assert_eq!(ok(UP).server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(ok(UP).server.idle_timeout, Duration::from_secs(60));
    let server = |line: &str| format!("[server]\n{line}\n{UP}");
    assert_eq!(ok(&server("idle_timeout = \"5m\"")).server.idle_timeout, Duration::from_secs(300));
    assert_error(&server("header_read_timeout = \"0s\""), "server.header_read_timeout", "greater than zero");
    assert_error(&server("idle_timeout = \"1ms\""), "server.idle_timeout", "at least 1s");
    assert_error(&server("header_read_timeout = \"2h\""), "server.header_read_timeout", "at most 1h");
    assert_error(&server("idle_timeout = \"100000000y\""), "server.idle_timeout", "at most 1day");
}

#[test]
fn route_matching_options() {
    let route = |extra: &str| format!("{UP}[[route]]\nname = \"login\"\npath = \"/login\"\n{extra}\n");
    let plain = ok(&route("")).routes[0].pattern.clone();
    assert!(plain.matches("/login/") && !plain.matches("/Login"));
    let strict = ok(&route("trailing_slash = \"distinct\"\ncase_insensitive = true")).routes[0].pattern.clone();
    assert!(!strict.matches("/login/") && strict.matches("/LOGIN"));
    assert_error(&route("trailing_slash = \"ignore\""), "route[0].trailing_slash", "same, distinct");
}
