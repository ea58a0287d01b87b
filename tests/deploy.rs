//! The shipping files agree with the code: the Dockerfile with the Cargo build, the Kubernetes
//! manifests with the proxy.toml they mount, and the alert rules and dashboard with the metrics a
//! running proxy really exports. Nothing here needs a program beyond the Rust toolchain and
//! `redis-server`: linters with tools of their own (hadolint, kubernetes-validate on the kustomize
//! output, promtool on the alert rules, their unit tests and the dashboard queries) run in
//! `.ci/lint-deploy`.

mod support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use support::redis::{free_port, TestRedis};
use support::{get, send, BinaryProxy, TestUpstream};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every document of a YAML file, as JSON values.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    yaml_serde::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml(path: &str) -> Value {
    let mut docs = yaml_docs(&repo(path));
    assert_eq!(docs.len(), 1, "{path} holds one document");
    docs.remove(0)
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The port of a `host:port` listen address.
fn port_of(listen: SocketAddr) -> u64 {
    u64::from(listen.port())
}

// ---------------------------------------------------------------- the Kubernetes manifests

const CONFIGMAP_TOML: &str = "deploy/kubernetes/proxy.toml";

fn configmap_config() -> sidecache::Config {
    sidecache::Config::from_sources(&read(CONFIGMAP_TOML), &HashMap::new()).expect("ConfigMap proxy.toml is valid")
}

fn deployment() -> Value {
    yaml("deploy/kubernetes/deployment.yaml")
}

fn sidecar(deployment: &Value) -> &Value {
    let init = deployment["spec"]["template"]["spec"]["initContainers"].as_array().expect("initContainers");
    init.iter().find(|c| c["name"] == "sidecache").expect("a sidecache init container")
}

/// A container port given by number or by name.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("port is a number or a name");
    let ports = container["ports"].as_array().expect("ports");
    let found = ports.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no port named {name}"));
    found["containerPort"].as_u64().unwrap()
}

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut files = Vec::new();
    files_under(&repo("deploy"), &mut files);
    let mut documents = 0;
    for file in &files {
        match file.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                for doc in yaml_docs(file) {
                    let kind = doc["kind"].as_str();
                    let api = doc["apiVersion"].as_str();
                    let is_promtool_test = doc.get("rule_files").is_some();
                    assert!(
                        (kind.is_some() && api.is_some()) || is_promtool_test,
                        "{}: a document without kind and apiVersion",
                        file.display()
                    );
                    documents += 1;
                }
            }
            Some("json") => {
                let text = std::fs::read_to_string(file).unwrap();
                serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                documents += 1;
            }
            Some("toml") => {}
            _ => panic!("{}: an unexpected file under deploy/", file.display()),
        }
    }
    // deployment, service, 2 kustomizations, redis (2), alerts, alert tests, podmonitor, dashboard.
    assert!(documents >= 10, "found only {documents} documents in {files:?}");
}

#[test]
fn configmap_proxy_toml_passes_sidecache_check() {
    // The kustomization generates the ConfigMap from this very file, under the key the pod reads.
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let generator = kustomization["configMapGenerator"].as_array().unwrap();
    let config_map = generator.iter().find(|g| g["name"] == "sidecache-config").expect("sidecache-config generator");
    assert_eq!(config_map["files"], json!(["proxy.toml"]));
    // Pods reload the mounted file in place: the name must not change with the content.
    assert_eq!(config_map["options"]["disableNameSuffixHash"], true);

    // The overlay's Redis URL is checked too, as the Secret hands it to the binary.
    let overlay = yaml("deploy/examples/redis/kustomization.yaml");
    let secret = &overlay["secretGenerator"][0];
    assert_eq!(secret["name"], "sidecache-redis");
    let literal = secret["literals"][0].as_str().unwrap();
    let redis_url = literal.strip_prefix("url=").expect("url= literal");

    for (file, redis) in [(CONFIGMAP_TOML, None), (CONFIGMAP_TOML, Some(redis_url)), ("proxy.toml", None)] {
        let mut check = Command::new(env!("CARGO_BIN_EXE_sidecache"));
        check.arg("--config").arg(repo(file)).arg("--check");
        for var in [
            "SIDECACHE_REDIS_URL",
            "SIDECACHE_UPSTREAM_URL",
            "SIDECACHE_CACHE_ENABLED",
            "SIDECACHE_RATE_LIMIT_ENABLED",
            "SIDECACHE_CONFIG",
            "SIDECACHE_ADMIN_TOKEN",
            "SIDECACHE_CACHE_KEY",
        ] {
            check.env_remove(var);
        }
        if let Some(url) = redis {
            check.env("SIDECACHE_REDIS_URL", url);
        }
        let out = check.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file} --check: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.starts_with("ok: "), "{stdout}");
        if let Some(url) = redis {
            assert!(stdout.contains(url), "the Secret's URL is used: {stdout}");
        }
    }
}

#[test]
fn manifests_match_the_config_they_mount() {
    let config = configmap_config();
    let deployment = deployment();
    let pod = &deployment["spec"]["template"]["spec"];
    let sidecar = sidecar(&deployment);
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    let (proxy_port, admin_port) = (port_of(config.server.listen), port_of(config.admin.listen));
    assert_eq!(resolve_port(sidecar, &json!("http")), proxy_port);
    assert_eq!(resolve_port(sidecar, &json!("admin")), admin_port);

    // Probes: on the admin port, at paths the admin listener serves; readiness is /readyz, which
    // never looks at Redis (the running-binary test below proves it with this very config).
    for (probe, path) in [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(resolve_port(sidecar, &get["port"]), admin_port, "{probe} port");
    }
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The Service targets the proxy port, never the app or the admin port.
    let service = yaml("deploy/kubernetes/service.yaml");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "one client port");
    assert_eq!(resolve_port(sidecar, &ports[0]["targetPort"]), proxy_port);
    assert_eq!(service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]);

    // The upstream is the app container in the same pod.
    let app = &pod["containers"][0];
    assert_eq!(config.upstream.url.host(), Some("127.0.0.1"));
    assert_eq!(u64::from(config.upstream.url.port_u16().unwrap()), resolve_port(app, &json!("app")));

    // Termination: the app's preStop sleep, then sidecache's drain and the flush of its traces,
    // all inside the grace period.
    let pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap_or(0);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let sidecache_stop = config.server.shutdown_grace + sidecache::telemetry::FLUSH_TIMEOUT;
    assert!(grace > pre_stop + sidecache_stop.as_secs(), "grace {grace}s is too short");

    // One worker per CPU of the limit.
    let cpu = sidecar["resources"]["limits"]["cpu"].as_str().unwrap();
    assert_eq!(cpu.parse::<usize>().ok(), Some(config.server.workers), "workers = cpu limit");
    assert!(sidecar["resources"]["limits"]["memory"].is_string() && sidecar["resources"]["requests"].is_object());

    // The Redis URL comes from an optional Secret: without it, the embedded store.
    let env = sidecar["env"].as_array().unwrap();
    let redis = env.iter().find(|e| e["name"] == "SIDECACHE_REDIS_URL").expect("SIDECACHE_REDIS_URL");
    let secret = &redis["valueFrom"]["secretKeyRef"];
    assert_eq!(
        (&secret["name"], &secret["key"], &secret["optional"]),
        (&json!("sidecache-redis"), &json!("url"), &json!(true))
    );

    // Hardened, and the config mounted where the image looks for it.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    for c in [sidecar, app] {
        let sc = &c["securityContext"];
        assert_eq!((&sc["readOnlyRootFilesystem"], &sc["allowPrivilegeEscalation"]), (&json!(true), &json!(false)));
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    }
    let mount = &sidecar["volumeMounts"][0];
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(volume["configMap"]["name"], "sidecache-config");
    let config_path = format!("{}/proxy.toml", mount["mountPath"].as_str().unwrap());
    let image = dockerfile();
    assert_eq!(image.env["SIDECACHE_CONFIG"], config_path);
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(image.uid));

    // The kustomization's image entry is the one the sidecar names.
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    assert_eq!(kustomization["images"][0]["name"], sidecar["image"]);
}

/// The ConfigMap's proxy.toml on loopback: listeners on port 0, this upstream; nothing else changed.
fn configmap_toml_for_test(upstream: SocketAddr) -> String {
    let mut doc: toml::Table = read(CONFIGMAP_TOML).parse().unwrap();
    let mut set = |table: &str, key: &str, value: String| {
        doc[table].as_table_mut().unwrap().insert(key.into(), toml::Value::String(value));
    };
    set("server", "listen", "127.0.0.1:0".into());
    set("admin", "listen", "127.0.0.1:0".into());
    set("upstream", "url", format!("http://{upstream}"));
    toml::to_string(&doc).unwrap()
}

#[tokio::test]
async fn manifest_probes_answer_while_redis_is_unreachable() {
    let upstream = TestUpstream::spawn().await;
    let dead_redis = format!("redis://127.0.0.1:{}/0", free_port());
    let proxy =
        BinaryProxy::spawn_with_env(&configmap_toml_for_test(upstream.addr), &[("SIDECACHE_REDIS_URL", &dead_redis)]);
    let sidecar = sidecar(&deployment()).clone();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let path = sidecar[probe]["httpGet"]["path"].as_str().unwrap();
        let answer = get(&format!("http://{}{path}", proxy.admin)).await;
        assert_eq!(answer.status, StatusCode::OK, "{probe} {path} with Redis down");
    }
    let status = get(&format!("http://{}/status", proxy.admin)).await.json();
    assert_eq!(status["cache_store"], "redis", "{status}");
    assert_eq!(status["redis"]["connected"], false, "{status}");
    // And traffic still flows through the Service's port.
    assert_eq!(get(&proxy.url("/api/models/1")).await.status, StatusCode::OK);
}

// ---------------------------------------------------------------- the Dockerfile

struct Dockerfile {
    rust_version: String,
    /// Build-context paths copied in (`COPY` without `--from`).
    copies: Vec<String>,
    runs: Vec<String>,
    env: HashMap<String, String>,
    expose: BTreeSet<u64>,
    uid: u64,
    stop_signal: String,
    entrypoint: String,
}

fn dockerfile() -> Dockerfile {
    let text = read("Dockerfile").replace("\\\n", " ");
    let mut d = Dockerfile {
        rust_version: String::new(),
        copies: Vec::new(),
        runs: Vec::new(),
        env: HashMap::new(),
        expose: BTreeSet::new(),
        uid: 0,
        stop_signal: String::new(),
        entrypoint: String::new(),
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (instruction, args) = line.split_once(' ').unwrap_or((line, ""));
        let words: Vec<&str> = args.split_whitespace().collect();
        match instruction {
            "ARG" if args.starts_with("RUST_VERSION=") => d.rust_version = args["RUST_VERSION=".len()..].into(),
            "COPY" if !args.starts_with("--from") => {
                d.copies.extend(words[..words.len() - 1].iter().map(|w| w.trim_end_matches('/').to_string()))
            }
            "RUN" => d.runs.push(args.into()),
            "ENV" => {
                let (k, v) = args.split_once('=').unwrap();
                d.env.insert(k.into(), v.into());
            }
            "EXPOSE" => d.expose.extend(words.iter().map(|p| p.parse::<u64>().unwrap())),
            "USER" => d.uid = words[0].split(':').next().unwrap().parse().expect("USER is numeric"),
            "STOPSIGNAL" => d.stop_signal = args.into(),
            "ENTRYPOINT" => d.entrypoint = args.into(),
            _ => {}
        }
    }
    d
}

/// `major.minor` as a comparable pair.
fn version(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

#[test]
fn dockerfile_is_in_step_with_the_cargo_build() {
    let d = dockerfile();
    let cargo: toml::Table = read("Cargo.toml").parse().unwrap();
    let package = &cargo["package"];
    assert!(
        version(&d.rust_version) >= version(package["rust-version"].as_str().unwrap()),
        "Dockerfile RUST_VERSION {} is below Cargo.toml rust-version",
        d.rust_version
    );

    // The release build of the binary Cargo.toml declares, with the lock file, from copied sources.
    let bin = cargo["bin"].as_array().unwrap()[0]["name"].as_str().unwrap();
    let build = d.runs.iter().find(|r| r.contains("cargo build")).expect("a cargo build step");
    assert!(build.contains("--release") && build.contains("--locked"), "{build}");
    assert!(build.contains(&format!("--bin {bin}")) && build.contains(&format!("target/release/{bin} ")), "{build}");
    assert!(d.entrypoint.contains(&format!("/{bin}\"")), "{}", d.entrypoint);
    let lib = cargo["lib"]["path"].as_str().unwrap();
    let bin_path = cargo["bin"].as_array().unwrap()[0]["path"].as_str().unwrap();
    for needed in ["Cargo.toml", "Cargo.lock", lib, bin_path] {
        assert!(
            d.copies.iter().any(|c| needed == c || needed.starts_with(&format!("{c}/"))),
            "the build stage does not copy {needed}"
        );
    }

    // What is copied exists and is let through by .dockerignore (an allowlist).
    let ignore = read(".dockerignore");
    let allowed: Vec<&str> = ignore.lines().filter_map(|l| l.strip_prefix('!')).collect();
    assert!(ignore.lines().any(|l| l == "*"), ".dockerignore starts from nothing");
    for copy in &d.copies {
        assert!(repo(copy).exists(), "COPY {copy}: no such file");
        assert!(allowed.contains(&copy.as_str()), "COPY {copy} is not in .dockerignore's allowlist");
    }

    // Runtime: non-root, the ports and config path the manifests use, SIGTERM for the drain.
    assert!(d.uid != 0);
    assert_eq!(d.stop_signal, "SIGTERM");
    assert_eq!(d.env["SIDECACHE_CONFIG"], "/etc/sidecache/proxy.toml");
    for config in [configmap_config(), sidecache::Config::from_sources(&read("proxy.toml"), &HashMap::new()).unwrap()] {
        let ports: BTreeSet<u64> = [port_of(config.server.listen), port_of(config.admin.listen)].into();
        assert_eq!(d.expose, ports, "EXPOSE matches the listen ports");
    }
}

// ---------------------------------------------------------------- alerts and dashboard

/// Labels Prometheus adds from the scrape target, not the proxy.
const TARGET_LABELS: [&str; 4] = ["namespace", "pod", "job", "instance"];

/// The PrometheusRule's rules, as (alert name, rule).
fn alert_rules() -> Vec<Value> {
    let rule = yaml("deploy/prometheus/alerts.yaml");
    assert_eq!(rule["kind"], "PrometheusRule");
    let groups = rule["spec"]["groups"].as_array().unwrap();
    groups.iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect()
}

/// Every PromQL expression of the dashboard (panels and variables), with Grafana's variables
/// replaced so Prometheus can parse them, and the legend of each panel query.
fn dashboard_queries() -> Vec<(String, Option<String>)> {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/sidecache.json")).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let legend = target["legendFormat"].as_str().map(String::from);
            queries.push((target["expr"].as_str().unwrap().to_string(), legend));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            let inner = q.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).unwrap();
            let (selector, _label) = inner.rsplit_once(", ").unwrap();
            queries.push((selector.to_string(), None));
        }
    }
    assert!(queries.len() >= 15, "{queries:?}");
    queries
        .into_iter()
        .map(|(q, l)| (q.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$route", ".*"), l))
        .collect()
}

/// Label names and values of every series in a Prometheus text exposition.
type Exported = HashMap<String, HashMap<String, HashSet<String>>>;

fn parse_exposition(text: &str) -> Exported {
    let mut out: Exported = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let series = line.rsplit_once(' ').unwrap().0;
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let entry = out.entry(name.to_string()).or_default();
        for pair in labels.trim_end_matches('}').split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            entry.entry(k.to_string()).or_default().insert(v.trim_end_matches('"').to_string());
        }
    }
    out
}

/// A metric selector in a PromQL expression: the name and its (label, operator, value) matchers.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

fn selectors(expr: &str) -> Vec<Selector> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("sidecache_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let mut selector = Selector { name: tail[..end].to_string(), matchers: Vec::new() };
        rest = &tail[end..];
        if let Some(body) = rest.strip_prefix('{') {
            let close = body.find('}').unwrap();
            for m in body[..close].split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let op_at = m.find(['=', '!']).unwrap();
                let op_len = if m[op_at + 1..].starts_with(['=', '~']) { 2 } else { 1 };
                let value = m[op_at + op_len..].trim().trim_matches('"');
                selector.matchers.push((m[..op_at].trim().into(), m[op_at..op_at + op_len].into(), value.into()));
            }
            rest = &body[close..];
        }
        out.push(selector);
    }
    out
}

/// Label names of every `by (...)` clause.
fn by_labels(expr: &str) -> Vec<String> {
    expr.match_indices("by (")
        .flat_map(|(i, _)| {
            let list = &expr[i + 4..];
            list[..list.find(')').unwrap()].split(',').map(|l| l.trim().to_string()).collect::<Vec<_>>()
        })
        .collect()
}

/// `{{label}}` and `$labels.label` references in a legend or an annotation.
fn referenced_labels(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (open, close) in [("{{", "}}"), ("$labels.", " ")] {
        for (i, _) in text.match_indices(open) {
            let inner = &text[i + open.len()..];
            let name = inner[..inner.find(close).unwrap_or(inner.len())].trim();
            if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !name.is_empty() {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// Checks one expression against what the proxy exports; returns the problems found.
fn check_expr(expr: &str, exported: &Exported, used_by: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut known_labels: HashSet<&str> = TARGET_LABELS.into_iter().collect();
    known_labels.insert("le");
    for s in selectors(expr) {
        let Some(labels) = exported.get(&s.name) else {
            problems.push(format!("{used_by}: {} is not exported", s.name));
            continue;
        };
        known_labels.extend(labels.keys().map(String::as_str));
        for (label, op, value) in &s.matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            let Some(values) = labels.get(label) else {
                problems.push(format!("{used_by}: {} has no label {label}", s.name));
                continue;
            };
            // Literal values (and alternatives of a regex of literals) must be ones the proxy uses.
            let literals: Vec<&str> = if op.ends_with('~') { value.split('|').collect() } else { vec![value] };
            for v in literals.into_iter().filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
                if !values.contains(v) {
                    problems.push(format!("{used_by}: {}{{{label}}} never has the value {v:?} ({values:?})", s.name));
                }
            }
        }
    }
    for label in by_labels(expr) {
        if !known_labels.contains(label.as_str()) {
            problems.push(format!("{used_by}: groups by {label}, which no metric in it has"));
        }
    }
    problems
}

#[tokio::test]
async fn alerts_and_dashboard_use_only_exported_metrics() {
    // The ConfigMap's config with a real Redis, after traffic on a cached and rate-limited route
    // (catalog), a rate-limited POST route pushed past its burst (login) and an unmatched path.
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let proxy =
        BinaryProxy::spawn_with_env(&configmap_toml_for_test(upstream.addr), &[("SIDECACHE_REDIS_URL", &redis.url())]);
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/api/models/1")).await.status, StatusCode::OK);
    }
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(send(Method::POST, &proxy.url("/login"), &[], "").await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429], "login: burst 5");
    assert_eq!(get(&proxy.url("/elsewhere")).await.status, StatusCode::OK);
    let text = get(&format!("http://{}/metrics", proxy.admin)).await.text();
    let exported = parse_exposition(&text);
    assert!(exported["sidecache_redis_up"]["client"].contains("ratelimit"), "{text}");

    let mut problems = Vec::new();
    let mut used = HashSet::new();
    for rule in alert_rules() {
        let name = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap();
        problems.extend(check_expr(expr, &exported, name));
        let grouped: HashSet<String> = by_labels(expr).into_iter().collect();
        for text in [&rule["annotations"]["summary"], &rule["annotations"]["description"]] {
            for label in referenced_labels(text.as_str().unwrap()) {
                if !grouped.contains(&label) && expr.contains(" by (") {
                    problems.push(format!("{name}: annotation uses $labels.{label}, which the expression drops"));
                }
            }
        }
    }
    for (expr, legend) in dashboard_queries() {
        problems.extend(check_expr(&expr, &exported, &format!("dashboard {expr:?}")));
        used.extend(selectors(&expr).into_iter().map(|s| s.name));
        let grouped: HashSet<String> = by_labels(&expr).into_iter().collect();
        for label in legend.as_deref().map(referenced_labels).unwrap_or_default() {
            if !grouped.contains(&label) {
                problems.push(format!("dashboard: legend {{{{{label}}}}} is not a label of {expr:?}"));
            }
        }
    }
    // And the other way round: every metric family the proxy exports has a place on the dashboard.
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap()) {
        if !used.iter().any(|u| u == family || u.strip_prefix(family).is_some_and(|s| s.starts_with('_'))) {
            problems.push(format!("dashboard: no panel shows {family}"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_a_summary_and_a_runbook_section() {
    let runbook = read("docs/operations.md");
    let anchors: HashSet<String> =
        runbook.lines().filter(|l| l.starts_with('#')).map(|l| anchor(l.trim_start_matches('#'))).collect();
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for wanted in
        ["RedisDown", "RedisErrorRate", "CacheHitRatioLow", "LatencyHigh", "UpstreamErrors", "RateLimiterFailingOpen"]
    {
        assert!(names.contains(&format!("Sidecache{wanted}").as_str()), "no alert for {wanted}: {names:?}");
    }
    for rule in &rules {
        let name = rule["alert"].as_str().unwrap();
        let annotations = &rule["annotations"];
        assert!(annotations["summary"].as_str().is_some_and(|s| s.len() > 10), "{name}: summary");
        assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
        let url = annotations["runbook_url"].as_str().unwrap_or_else(|| panic!("{name}: runbook_url"));
        let (page, fragment) = url.split_once('#').unwrap();
        assert!(page.starts_with("https://") && page.ends_with("/docs/operations.md"), "{name}: {url}");
        assert_eq!(fragment, anchor(name), "{name}: the runbook section is named after the alert");
        assert!(anchors.contains(fragment), "{name}: docs/operations.md has no section #{fragment}");
    }
}

#[test]
fn the_network_policy_admits_the_proxy_port_and_keeps_the_admin_port_for_monitoring() {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    assert!(kustomization["resources"].as_array().unwrap().contains(&json!("networkpolicy.yaml")));
    let (policy, deployment) =
        (yaml("deploy/kubernetes/networkpolicy.yaml"), yaml("deploy/kubernetes/deployment.yaml"));
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let config = configmap_config();
    let (proxy, admin) = (u64::from(config.server.listen.port()), u64::from(config.admin.listen.port()));
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let from = |port: u64| -> Vec<&Value> {
        rules
            .iter()
            .filter(|r| r["ports"].as_array().unwrap().iter().any(|p| p["port"].as_u64() == Some(port)))
            .flat_map(|r| r["from"].as_array().unwrap())
            .collect()
    };
    assert_eq!(from(proxy), [&json!({ "podSelector": {} })], "the proxy port: the namespace's pods");
    let monitoring = json!({ "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "monitoring" } } });
    assert_eq!(from(admin), [&monitoring], "the admin port: monitoring only");
    assert_eq!(rules.len(), 2, "nothing else is admitted");
}
