//! deploy/: the Kustomize base and overlays render (`kubectl kustomize`, offline) and every
//! object parses into its typed k8s-openapi struct; every pod template is locked down, the
//! worker's Role grants nothing beyond what the kube runner needs, and no secret is written
//! inline. Network: a default-deny policy selects every patchflow pod (gateway, worker and
//! the agent Jobs' labels), only the gateway takes ingress (and the metrics port, from the
//! monitoring namespace only), and no egress rule reaches the cloud metadata address or the
//! cluster at large. Metrics: a ServiceMonitor scrapes every gateway and worker, and the
//! Grafana dashboard reads only metrics that exist. Admission: the worker's Jobs are held to
//! the agent's shape by a ValidatingAdmissionPolicy that fails closed. Nothing is evaluated
//! against a cluster: these are static checks of the rendered objects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{
    IPBlock, Ingress, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::support::repo_root;

fn render(overlay: &str) -> Vec<Value> {
    let dir = repo_root().join("deploy/k8s").join(overlay);
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl is needed to render deploy/ (apt-get install kubectl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple::<Value>(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

fn of_kind<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| o["kind"] == kind)
}

/// Parses every object into its typed struct (an unknown kind fails the test).
fn parse_all(objects: &[Value]) {
    for o in objects {
        let v = o.clone();
        let ok = match o["kind"].as_str().unwrap() {
            "Namespace" => serde_json::from_value::<Namespace>(v).is_ok(),
            "ConfigMap" => serde_json::from_value::<ConfigMap>(v).is_ok(),
            "ServiceAccount" => serde_json::from_value::<ServiceAccount>(v).is_ok(),
            "Role" => serde_json::from_value::<Role>(v).is_ok(),
            "RoleBinding" => serde_json::from_value::<RoleBinding>(v).is_ok(),
            "Deployment" => serde_json::from_value::<Deployment>(v).is_ok(),
            "Service" => serde_json::from_value::<Service>(v).is_ok(),
            "Ingress" => serde_json::from_value::<Ingress>(v).is_ok(),
            "NetworkPolicy" => serde_json::from_value::<NetworkPolicy>(v).is_ok(),
            "HorizontalPodAutoscaler" => {
                serde_json::from_value::<HorizontalPodAutoscaler>(v).is_ok()
            }
            "PodDisruptionBudget" => serde_json::from_value::<PodDisruptionBudget>(v).is_ok(),
            "ValidatingAdmissionPolicy" => {
                serde_json::from_value::<ValidatingAdmissionPolicy>(v).is_ok()
            }
            "ValidatingAdmissionPolicyBinding" => {
                serde_json::from_value::<ValidatingAdmissionPolicyBinding>(v).is_ok()
            }
            // The Prometheus Operator's; k8s-openapi has no type for it (its own test below).
            "ServiceMonitor" => {
                o["apiVersion"] == "monitoring.coreos.com/v1"
                    && o["spec"]["selector"]["matchLabels"].is_object()
                    && o["spec"]["endpoints"].is_array()
            }
            other => panic!("unexpected kind {other}"),
        };
        assert!(ok, "does not parse as its kind: {o}");
    }
}

fn assert_locked_down(name: &str, pod: &PodSpec) {
    let psc = pod
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: no pod securityContext"));
    assert_eq!(psc.run_as_non_root, Some(true), "{name}");
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "{name}"
    );
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let sc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{name}/{}: no securityContext", c.name));
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{name}/{}",
            c.name
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{name}/{}",
            c.name
        );
        assert_eq!(sc.run_as_non_root, Some(true), "{name}/{}", c.name);
        let drop = sc
            .capabilities
            .as_ref()
            .and_then(|c| c.drop.clone())
            .unwrap_or_default();
        assert_eq!(drop, ["ALL"], "{name}/{}", c.name);
        let res = c
            .resources
            .as_ref()
            .unwrap_or_else(|| panic!("{name}/{}: no resources", c.name));
        assert!(
            res.limits
                .as_ref()
                .is_some_and(|l| l.contains_key("cpu") && l.contains_key("memory")),
            "{name}/{}",
            c.name
        );
        for e in c.env.iter().flatten() {
            let secret_like = [
                "KEY",
                "SECRET",
                "TOKEN",
                "PASSWORD",
                "DATABASE_URL",
                "REDIS_URL",
            ]
            .iter()
            .any(|s| e.name.contains(s));
            if secret_like {
                assert!(e.value.is_none(), "{name}/{}: {} is inline", c.name, e.name);
                assert!(
                    e.value_from
                        .as_ref()
                        .and_then(|v| v.secret_key_ref.as_ref())
                        .is_some(),
                    "{name}/{}: {} must come from a Secret",
                    c.name,
                    e.name
                );
            }
        }
    }
}

#[test]
fn manifests_render_parse_and_are_locked_down() {
    for overlay in ["base", "overlays/dev", "overlays/prod"] {
        let objects = render(overlay);
        parse_all(&objects);
        let deployments: Vec<Deployment> = of_kind(&objects, "Deployment")
            .map(|d| serde_json::from_value(d.clone()).unwrap())
            .collect();
        assert_eq!(deployments.len(), 2, "{overlay}");
        for d in &deployments {
            let name = d.metadata.name.clone().unwrap();
            let pod = d.spec.template.spec.as_ref().unwrap();
            assert_locked_down(&format!("{overlay}/{name}"), pod);
            if name == "patchflow-gateway" {
                assert_eq!(
                    pod.automount_service_account_token,
                    Some(false),
                    "the gateway needs no API token"
                );
            }
        }
        // The worker's Role: Jobs create/get/list/watch/delete, pods list/watch (the runner
        // watches them by label, never gets one by name), pods/log get. Nothing more.
        let roles: Vec<Role> = of_kind(&objects, "Role")
            .map(|r| serde_json::from_value(r.clone()).unwrap())
            .collect();
        assert_eq!(roles.len(), 1);
        let mut grants: Vec<String> = Vec::new();
        for rule in roles[0].rules.iter().flatten() {
            for group in rule.api_groups.iter().flatten() {
                for res in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        grants.push(format!("{group}/{res}:{verb}"));
                    }
                }
            }
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        }
        grants.sort();
        assert_eq!(
            grants,
            [
                "/pods/log:get",
                "/pods:list",
                "/pods:watch",
                "batch/jobs:create",
                "batch/jobs:delete",
                "batch/jobs:get",
                "batch/jobs:list",
                "batch/jobs:watch",
            ]
        );
        // No Secret is shipped; the pods only reference one.
        assert_eq!(of_kind(&objects, "Secret").count(), 0);
    }
    let dev = render("overlays/dev");
    for d in of_kind(&dev, "Deployment") {
        assert_eq!(d["spec"]["replicas"], 1);
    }
    let prod = render("overlays/prod");
    assert_eq!(of_kind(&prod, "HorizontalPodAutoscaler").count(), 2);
    assert_eq!(of_kind(&prod, "PodDisruptionBudget").count(), 2);
    for d in of_kind(&prod, "Deployment") {
        assert_eq!(d["spec"]["replicas"], 3);
    }
}

#[test]
fn the_configmap_holds_valid_settings_and_runs_agents_on_the_deployed_image() {
    for overlay in ["base", "overlays/dev", "overlays/prod"] {
        let objects = render(overlay);
        let maps: Vec<ConfigMap> = of_kind(&objects, "ConfigMap")
            .map(|m| serde_json::from_value(m.clone()).unwrap())
            .filter(|m: &ConfigMap| m.metadata.name.as_deref() == Some("patchflow-config"))
            .collect();
        assert_eq!(maps.len(), 1, "{overlay}");
        let data = maps[0].data.clone().unwrap();
        // Every entry is a setting patchflow knows, with a value it accepts: a typo would
        // otherwise be silently ignored by the pods.
        let mut config = patchflow_core::Config::default();
        let env = |name: &str| data.get(name).cloned();
        config.apply_env(env).unwrap();
        for name in data.keys() {
            let known = patchflow_core::config::ENV_ALIASES
                .iter()
                .any(|(alias, _)| alias == name)
                || name.strip_prefix("PATCHFLOW_").is_some_and(|k| {
                    patchflow_core::Config::KEYS.contains(&k.to_ascii_lowercase().as_str())
                });
            assert!(known, "{overlay}: {name} is not a patchflow setting");
        }
        config.validate().unwrap();
        assert_eq!(config.kube.runner, patchflow_core::config::Runner::Kube);
        // The agent Jobs run the image the Deployments run.
        let deployed: Vec<String> = of_kind(&objects, "Deployment")
            .map(|d| {
                d["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert!(
            deployed.iter().all(|i| *i == config.kube.kube_image),
            "{overlay}: agents run {} but the Deployments run {deployed:?}",
            config.kube.kube_image
        );
        // The agent service account exists and mounts no token.
        let sa: Vec<ServiceAccount> = of_kind(&objects, "ServiceAccount")
            .map(|s| serde_json::from_value(s.clone()).unwrap())
            .filter(|s: &ServiceAccount| {
                s.metadata.name.as_deref() == config.kube.kube_service_account.as_deref()
            })
            .collect();
        assert_eq!(sa.len(), 1, "{overlay}: the agents' service account");
        assert_eq!(sa[0].automount_service_account_token, Some(false));
        // A worker's pod outlives its drain: Kubernetes must not SIGKILL agents the drain
        // lets finish.
        let workers: Vec<&Value> = of_kind(&objects, "Deployment")
            .filter(|d| d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker")
            .collect();
        assert!(!workers.is_empty(), "{overlay}: no worker Deployment");
        for d in workers {
            let grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30);
            assert!(
                grace >= config.temporal.drain_timeout_secs + 30,
                "{overlay}: the worker's terminationGracePeriodSeconds {grace} is shorter than drain_timeout_secs {} + 30",
                config.temporal.drain_timeout_secs
            );
        }
    }
}

const OVERLAYS: [&str; 3] = ["base", "overlays/dev", "overlays/prod"];

/// The labels an agent Job's pod carries: those `build_job`
/// (activities/src/runner/kube/job.rs) sets on the pod template, and those the Job
/// controller adds. The runner creates these pods at run time, so no manifest holds them.
fn agent_pod_labels() -> BTreeMap<String, String> {
    let job_rs =
        std::fs::read_to_string(repo_root().join("activities/src/runner/kube/job.rs")).unwrap();
    for needle in ["\"app.kubernetes.io/name\"", "\"patchflow-agent\""] {
        assert!(
            job_rs.contains(needle),
            "job.rs no longer labels agent pods with {needle}: update the NetworkPolicies, \
             the admission policy and this test"
        );
    }
    [
        ("app.kubernetes.io/name", "patchflow-agent"),
        ("patchflow.dev/task-id", "t-0123"),
        ("patchflow.dev/tenant", "acme"),
        ("patchflow.dev/batch-id", "b-1"),
        ("batch.kubernetes.io/job-name", "patchflow-t-0123-1"),
        ("job-name", "patchflow-t-0123-1"),
        ("controller-uid", "5f0c1d2e"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Every patchflow pod: the Deployments' templates and an agent Job's pod.
fn patchflow_pods(objects: &[Value]) -> Vec<(String, BTreeMap<String, String>)> {
    let mut pods: Vec<(String, BTreeMap<String, String>)> = of_kind(objects, "Deployment")
        .map(|d| {
            let d: Deployment = serde_json::from_value(d.clone()).unwrap();
            let labels = d.spec.template.metadata.unwrap().labels.unwrap();
            (d.metadata.name.unwrap(), labels)
        })
        .collect();
    let names: Vec<&str> = pods.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["patchflow-gateway", "patchflow-worker"]);
    pods.push(("patchflow-agent".to_string(), agent_pod_labels()));
    pods
}

fn network_policies(objects: &[Value]) -> Vec<(String, NetworkPolicySpec)> {
    of_kind(objects, "NetworkPolicy")
        .map(|n| {
            let n: NetworkPolicy = serde_json::from_value(n.clone()).unwrap();
            (n.metadata.name.unwrap(), n.spec.unwrap())
        })
        .collect()
}

/// Whether `selector` selects a pod with `labels` (no selector selects every pod).
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(s) = selector else { return true };
    let by_label = s
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = s.match_expressions.iter().flatten().all(|r| {
        let values = r.values.clone().unwrap_or_default();
        let got = labels.get(&r.key);
        match r.operator.as_str() {
            "In" => got.is_some_and(|v| values.contains(v)),
            "NotIn" => !got.is_some_and(|v| values.contains(v)),
            "Exists" => got.is_some(),
            "DoesNotExist" => got.is_none(),
            op => panic!("unknown selector operator {op}"),
        }
    });
    by_label && by_expression
}

fn is_default_deny(spec: &NetworkPolicySpec) -> bool {
    let types = spec.policy_types.clone().unwrap_or_default();
    types.iter().any(|t| t == "Ingress")
        && types.iter().any(|t| t == "Egress")
        && spec.ingress.as_ref().is_none_or(|r| r.is_empty())
        && spec.egress.as_ref().is_none_or(|r| r.is_empty())
}

/// Whether the CIDR `cidr` (IPv4 or IPv6) holds `ip`. A family mismatch holds nothing.
fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let (net, len) = cidr
        .split_once('/')
        .unwrap_or_else(|| panic!("{cidr} is not a CIDR"));
    let len: u32 = len.parse().unwrap_or_else(|_| panic!("{cidr}: prefix"));
    match (net.parse::<IpAddr>().unwrap(), ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            assert!(len <= 32, "{cidr}");
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            assert!(len <= 128, "{cidr}");
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// Whether the ipBlock lets traffic to `ip` through (in its CIDR, in none of its excepts).
fn block_allows(block: &IPBlock, ip: IpAddr) -> bool {
    cidr_contains(&block.cidr, ip) && !block.except.iter().flatten().any(|e| cidr_contains(e, ip))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `(protocol, port)` of a rule's port; named ports are not used by these policies.
fn port_of(p: &NetworkPolicyPort) -> (String, i32) {
    assert!(p.end_port.is_none(), "a port range: {p:?}");
    let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
    match &p.port {
        Some(IntOrString::Int(n)) => (proto, *n),
        other => panic!("a rule without a numbered port: {other:?}"),
    }
}

fn namespace_of(peer: &NetworkPolicyPeer) -> Option<&str> {
    peer.namespace_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|m| m.get("kubernetes.io/metadata.name"))
        .map(String::as_str)
}

fn is_kube_dns(peer: &NetworkPolicyPeer) -> bool {
    namespace_of(peer) == Some("kube-system")
        && peer
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .is_some_and(|m| m.get("k8s-app").map(String::as_str) == Some("kube-dns"))
}

#[test]
fn every_patchflow_pod_is_selected_by_the_default_deny_policy_and_its_own_allow_policy() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let policies = network_policies(&objects);
        let deny: Vec<&(String, NetworkPolicySpec)> = policies
            .iter()
            .filter(|(_, s)| is_default_deny(s))
            .collect();
        assert!(!deny.is_empty(), "{overlay}: no default-deny NetworkPolicy");
        for (pod, labels) in patchflow_pods(&objects) {
            assert!(
                deny.iter()
                    .any(|(_, s)| selects(s.pod_selector.as_ref(), &labels)),
                "{overlay}: no default-deny policy selects {pod} {labels:?}"
            );
            // Allow policies add up: a pod selected by another component's policy would get
            // that component's traffic too (an agent with the worker's database access).
            let allows: Vec<&str> = policies
                .iter()
                .filter(|(_, s)| !is_default_deny(s) && selects(s.pod_selector.as_ref(), &labels))
                .map(|(n, _)| n.as_str())
                .collect();
            let own = if pod == "patchflow-agent" {
                "patchflow-agent-egress"
            } else {
                pod.as_str()
            };
            // Besides its own, a gateway or worker is open to Prometheus on its metrics
            // port (checked in the ingress test); an agent never is.
            let allows: Vec<&str> = allows
                .into_iter()
                .filter(|n| !(*n == "patchflow-metrics" && pod != "patchflow-agent"))
                .collect();
            assert_eq!(allows, [own], "{overlay}: the allow policies of {pod}");
        }
    }
}

#[test]
fn no_egress_rule_reaches_cloud_metadata_or_the_cluster() {
    // The CIDR check itself, so a broken one cannot pass everything.
    assert!(cidr_contains("0.0.0.0/0", ip("169.254.169.254")));
    assert!(cidr_contains("169.254.0.0/16", ip("169.254.169.254")));
    assert!(cidr_contains("169.254.169.254/32", ip("169.254.169.254")));
    assert!(!cidr_contains("169.254.169.0/32", ip("169.254.169.254")));
    assert!(cidr_contains("172.16.0.0/12", ip("172.31.255.255")));
    assert!(!cidr_contains("172.16.0.0/12", ip("172.32.0.0")));
    assert!(!cidr_contains("192.0.2.0/24", ip("169.254.169.254")));
    assert!(cidr_contains("::/0", ip("fd00:ec2::254")));
    assert!(cidr_contains("fc00::/7", ip("fd00:ec2::254")));
    assert!(!cidr_contains("fe80::/10", ip("fd00:ec2::254")));
    assert!(!cidr_contains("::/0", ip("169.254.169.254")));
    let open = IPBlock {
        cidr: "0.0.0.0/0".into(),
        except: Some(vec!["10.0.0.0/8".into()]),
    };
    assert!(block_allows(&open, ip("169.254.169.254")) && !block_allows(&open, ip("10.1.2.3")));

    // Cloud metadata (AWS, GCP, Azure; AWS's IPv6 one): no ipBlock may reach them.
    let metadata = ["169.254.169.254", "fd00:ec2::254"].map(ip);
    // The cluster's own addresses: an "anywhere" block must except all of them.
    let internal = [
        "10.0.0.1",
        "10.96.0.1",
        "10.255.255.254",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.0.1",
        "100.64.0.1",
        "100.127.255.254",
        "169.254.20.10",
        "fc00::1",
        "fd00:ec2::254",
        "fe80::1",
    ]
    .map(ip);
    for overlay in OVERLAYS {
        let objects = render(overlay);
        for (name, spec) in network_policies(&objects) {
            for (i, rule) in spec.egress.iter().flatten().enumerate() {
                let at = format!("{overlay}: {name} egress[{i}]");
                let peers = rule.to.clone().unwrap_or_default();
                assert!(!peers.is_empty(), "{at}: no `to` is every destination");
                assert!(
                    rule.ports.as_ref().is_some_and(|p| !p.is_empty()),
                    "{at}: no `ports` is every port"
                );
                for peer in &peers {
                    if let Some(block) = &peer.ip_block {
                        assert!(
                            peer.namespace_selector.is_none() && peer.pod_selector.is_none(),
                            "{at}"
                        );
                        for m in metadata {
                            assert!(!block_allows(block, m), "{at}: {} reaches {m}", block.cidr);
                        }
                        if block.cidr.ends_with("/0") {
                            for a in internal {
                                assert!(
                                    !block_allows(block, a),
                                    "{at}: {} does not except {a}",
                                    block.cidr
                                );
                            }
                        }
                    } else {
                        // A pod peer names one namespace (never every namespace, nor this
                        // one: nothing here may reach the agent pods).
                        assert!(
                            namespace_of(peer).is_some_and(|ns| ns != "patchflow"),
                            "{at}: a peer in no named namespace: {peer:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn each_component_gets_only_the_egress_it_needs() {
    let port = |p: &str, n: i32| (p.to_string(), n);
    let dns = [port("UDP", 53), port("TCP", 53)];
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let policies: BTreeMap<String, NetworkPolicySpec> =
            network_policies(&objects).into_iter().collect();
        // Agent pods: DNS to kube-dns, and HTTPS (the model provider) on public addresses.
        let agent = &policies["patchflow-agent-egress"];
        assert!(agent.ingress.as_ref().is_none_or(|r| r.is_empty()));
        let mut saw_https = false;
        for rule in agent.egress.iter().flatten() {
            let ports: Vec<(String, i32)> = rule.ports.iter().flatten().map(port_of).collect();
            let peers = rule.to.clone().unwrap_or_default();
            if peers.iter().all(is_kube_dns) {
                assert_eq!(ports, dns, "{overlay}: agent DNS");
            } else {
                assert!(
                    peers.iter().all(|p| p.ip_block.is_some()),
                    "{overlay}: {rule:?}"
                );
                assert_eq!(ports, [port("TCP", 443)], "{overlay}: agent egress");
                let cidrs: Vec<&str> = peers
                    .iter()
                    .map(|p| p.ip_block.as_ref().unwrap().cidr.as_str())
                    .collect();
                saw_https |= cidrs.contains(&"0.0.0.0/0");
            }
        }
        assert!(
            saw_https,
            "{overlay}: agents cannot reach the model provider"
        );
        // Gateway and worker: their services and nothing else.
        let services = [
            port("UDP", 53),
            port("TCP", 53),
            port("TCP", 7233),
            port("TCP", 5432),
            port("TCP", 3306),
            port("TCP", 6379),
            port("TCP", 9092),
            port("TCP", 443),
            port("TCP", 9000),
            // The OTLP/HTTP trace collector.
            port("TCP", 4318),
        ];
        for (name, extra) in [
            ("patchflow-gateway", vec![]),
            // The Kubernetes API server, for the agent Jobs.
            ("patchflow-worker", vec![port("TCP", 6443)]),
        ] {
            let mut ports: Vec<(String, i32)> = policies[name]
                .egress
                .iter()
                .flatten()
                .flat_map(|r| r.ports.iter().flatten().map(port_of))
                .collect();
            ports.sort();
            ports.dedup();
            let mut want: Vec<(String, i32)> = services.iter().cloned().chain(extra).collect();
            want.sort();
            assert_eq!(ports, want, "{overlay}: {name} egress ports");
            let temporal = policies[name]
                .egress
                .iter()
                .flatten()
                .find(|r| r.ports.iter().flatten().any(|p| port_of(p).1 == 7233))
                .unwrap();
            assert!(
                temporal
                    .to
                    .iter()
                    .flatten()
                    .all(|p| namespace_of(p) == Some("temporal")),
                "{overlay}: {name} reaches Temporal only in its namespace"
            );
        }
    }
}

/// The metric names this build exports (counters with `_total`, histograms with their
/// series), from the process registry's own exposition once every family has a sample (an
/// empty family is not printed).
fn exported_metrics() -> Vec<String> {
    let m = patchflow_platform::metrics::global();
    m.submitted("http", "t");
    m.finished("COMPLETED", None);
    m.step("agent", 1.0);
    m.tool_call("read_file_content", true, 0.01);
    m.http("/api/tasks", 202);
    m.grpc("SubmitTask", "OK");
    m.kafka("started");
    m.set_agent_slots(2);
    m.agent_ran(
        &serde_json::from_value(serde_json::json!({
            "outcome": "finished", "summary": "", "model": "m", "steps": 1,
            "tool_calls": 0, "prompt_tokens": 1, "completion_tokens": 1,
            "total_tokens": 2, "cached_tokens": 1, "reasoning_tokens": 1, "cost_usd": 0.1,
            "wall_ms": 0, "files_changed": []
        }))
        .unwrap(),
        "t",
    );
    let text = m.encode();
    let mut names = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => names.push(format!("{name}_total")),
            "histogram" => {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
            _ => names.push(name.to_string()),
        }
    }
    names
}

/// The `patchflow_*` names a PromQL expression reads.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("patchflow_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        found.push(name);
    }
    found
}

#[test]
fn prometheus_scrapes_every_gateway_and_worker_and_the_dashboard_reads_metrics_that_exist() {
    let exported = exported_metrics();
    assert!(
        exported.contains(&"patchflow_tasks_finished_total".to_string()),
        "{exported:?}"
    );
    for overlay in OVERLAYS {
        let objects = render(overlay);
        // The processes listen where the Services point.
        let maps: Vec<ConfigMap> = of_kind(&objects, "ConfigMap")
            .map(|m| serde_json::from_value(m.clone()).unwrap())
            .filter(|m: &ConfigMap| m.metadata.name.as_deref() == Some("patchflow-config"))
            .collect();
        let addr = maps[0].data.as_ref().unwrap()["PATCHFLOW_METRICS_ADDR"].clone();
        assert_eq!(
            addr, "0.0.0.0:9898",
            "{overlay}: metrics must listen beyond loopback"
        );
        let monitors: Vec<&Value> = of_kind(&objects, "ServiceMonitor").collect();
        assert_eq!(monitors.len(), 1, "{overlay}");
        let monitor = monitors[0];
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], "metrics");
        assert_eq!(endpoint["path"], "/metrics");
        let wanted: BTreeMap<String, String> =
            serde_json::from_value(monitor["spec"]["selector"]["matchLabels"].clone()).unwrap();
        let deployments: BTreeMap<String, Deployment> = of_kind(&objects, "Deployment")
            .map(|d| {
                let d: Deployment = serde_json::from_value(d.clone()).unwrap();
                (d.metadata.name.clone().unwrap(), d)
            })
            .collect();
        let mut scraped = Vec::new();
        for svc in of_kind(&objects, "Service") {
            let svc: Service = serde_json::from_value(svc.clone()).unwrap();
            let labels = svc.metadata.labels.clone().unwrap_or_default();
            if !wanted.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                continue;
            }
            let spec = svc.spec.unwrap();
            let selector = spec.selector.unwrap();
            let port = spec
                .ports
                .unwrap()
                .into_iter()
                .find(|p| p.name.as_deref() == Some("metrics"))
                .expect("a metrics port");
            assert_eq!(port.port, 9898);
            // The Service selects one Deployment's pods, whose container names that port.
            let (name, d) = deployments
                .iter()
                .find(|(_, d)| {
                    let pod = d.spec.template.metadata.as_ref().unwrap();
                    let l = pod.labels.clone().unwrap();
                    selector.iter().all(|(k, v)| l.get(k) == Some(v))
                })
                .unwrap_or_else(|| panic!("{overlay}: {selector:?} selects no Deployment"));
            let container = &d.spec.template.spec.as_ref().unwrap().containers[0];
            assert!(
                container
                    .ports
                    .iter()
                    .flatten()
                    .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 9898),
                "{overlay}: {name} does not name its metrics port"
            );
            scraped.push(name.clone());
        }
        scraped.sort();
        assert_eq!(
            scraped,
            ["patchflow-gateway", "patchflow-worker"],
            "{overlay}"
        );

        // The dashboard ships for Grafana's sidecar, and every query reads a metric this
        // build exports.
        let boards: Vec<ConfigMap> = of_kind(&objects, "ConfigMap")
            .map(|m| serde_json::from_value(m.clone()).unwrap())
            .filter(|m: &ConfigMap| {
                m.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("grafana_dashboard"))
                    == Some(&"1".to_string())
            })
            .collect();
        assert_eq!(boards.len(), 1, "{overlay}");
        let json = &boards[0].data.as_ref().unwrap()["patchflow.json"];
        let board: Value = serde_json::from_str(json).unwrap();
        let panels = board["panels"].as_array().unwrap();
        assert!(panels.len() >= 8, "{overlay}: {} panels", panels.len());
        let mut read = std::collections::BTreeSet::new();
        for panel in panels {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                let names = metrics_in(expr);
                assert!(!names.is_empty(), "{expr}");
                for n in names {
                    assert!(
                        exported.contains(&n),
                        "{overlay}: the dashboard reads {n}, which nothing exports"
                    );
                    read.insert(n);
                }
            }
        }
        // The operator's essentials are on it.
        for n in [
            "patchflow_tasks_finished_total",
            "patchflow_task_step_seconds_bucket",
            "patchflow_worker_slots",
            "patchflow_llm_cost_usd_total",
        ] {
            assert!(read.contains(n), "{overlay}: no panel reads {n}");
        }
    }
    // The README's queries read real metrics too.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let block = readme
        .split("```promql")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    for n in metrics_in(block) {
        assert!(
            exported.contains(&n),
            "the README's query reads {n}, which nothing exports"
        );
    }
}

#[test]
fn only_the_gateway_takes_ingress_and_only_on_its_http_and_grpc_ports() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let pods: BTreeMap<String, BTreeMap<String, String>> =
            patchflow_pods(&objects).into_iter().collect();
        let gateway: Deployment = serde_json::from_value(
            of_kind(&objects, "Deployment")
                .find(|d| d["metadata"]["name"] == "patchflow-gateway")
                .unwrap()
                .clone(),
        )
        .unwrap();
        let container_ports: Vec<(String, i32)> = gateway.spec.template.spec.unwrap().containers[0]
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            container_ports,
            [
                ("http".to_string(), 8787),
                ("grpc".to_string(), 8788),
                ("metrics".to_string(), 9898)
            ]
        );
        let mut opened = Vec::new();
        for (name, spec) in network_policies(&objects) {
            let rules = spec.ingress.clone().unwrap_or_default();
            if rules.is_empty() {
                continue;
            }
            if name == "patchflow-metrics" {
                // The metrics port of the gateway and the workers, from the monitoring
                // namespace only; never an agent's pod.
                for (pod, labels) in &pods {
                    assert_eq!(
                        selects(spec.pod_selector.as_ref(), labels),
                        pod != "patchflow-agent",
                        "{overlay}: {name} on {pod}"
                    );
                }
                for rule in rules {
                    let from = rule.from.unwrap_or_default();
                    assert!(!from.is_empty(), "{overlay}: metrics from anywhere");
                    assert!(
                        from.iter().all(|p| namespace_of(p) == Some("monitoring")
                            && p.ip_block.is_none()
                            && p.pod_selector.is_none()),
                        "{overlay}: metrics from {from:?}"
                    );
                    let ports: Vec<_> =
                        rule.ports.unwrap_or_default().iter().map(port_of).collect();
                    assert_eq!(ports, [("TCP".to_string(), 9898)], "{overlay}");
                }
                continue;
            }
            for (pod, labels) in &pods {
                assert_eq!(
                    selects(spec.pod_selector.as_ref(), labels),
                    pod == "patchflow-gateway",
                    "{overlay}: {name} lets traffic into {pod}"
                );
            }
            for rule in rules {
                let ports = rule.ports.unwrap_or_default();
                assert!(
                    !ports.is_empty(),
                    "{overlay}: {name}: ingress on every port"
                );
                opened.extend(ports.iter().map(port_of));
            }
        }
        opened.sort();
        assert_eq!(
            opened,
            [("TCP".to_string(), 8787), ("TCP".to_string(), 8788)],
            "{overlay}"
        );
    }
}

struct Admission {
    policy: ValidatingAdmissionPolicy,
    binding: ValidatingAdmissionPolicyBinding,
}

fn admission(objects: &[Value]) -> Admission {
    let policies: Vec<&Value> = of_kind(objects, "ValidatingAdmissionPolicy").collect();
    let bindings: Vec<&Value> = of_kind(objects, "ValidatingAdmissionPolicyBinding").collect();
    assert_eq!(policies.len(), 1, "one ValidatingAdmissionPolicy");
    assert_eq!(bindings.len(), 1, "one ValidatingAdmissionPolicyBinding");
    // Cluster-scoped: kustomize's `namespace:` would stamp one on them (base/kustomization.yaml
    // takes it back).
    for o in [policies[0], bindings[0]] {
        assert!(
            o["metadata"].get("namespace").is_none(),
            "{}",
            o["metadata"]
        );
    }
    Admission {
        policy: serde_json::from_value(policies[0].clone()).unwrap(),
        binding: serde_json::from_value(bindings[0].clone()).unwrap(),
    }
}

/// Every CEL expression of the policy: match conditions, variables, validations.
fn expressions(a: &Admission) -> Vec<(String, String)> {
    let spec = a.policy.spec.as_ref().unwrap();
    let mut all = Vec::new();
    for m in spec.match_conditions.iter().flatten() {
        all.push((format!("matchConditions/{}", m.name), m.expression.clone()));
    }
    for v in spec.variables.iter().flatten() {
        all.push((format!("variables/{}", v.name), v.expression.clone()));
    }
    for (i, v) in spec.validations.iter().flatten().enumerate() {
        all.push((format!("validations[{i}]"), v.expression.clone()));
    }
    all
}

#[test]
fn the_admission_policy_holds_the_workers_jobs_to_the_agent_shape() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let a = admission(&objects);
        let spec = a.policy.spec.as_ref().unwrap();
        let bspec = &a.binding.spec;
        assert_eq!(
            Some(&bspec.policy_name),
            a.policy.metadata.name.as_ref(),
            "{overlay}"
        );
        assert_eq!(bspec.validation_actions, ["Deny"], "{overlay}");
        // batch/v1 Jobs, created or updated; nothing excluded.
        let constraints = spec.match_constraints.as_ref().unwrap();
        assert!(constraints.exclude_resource_rules.is_none());
        assert!(
            constraints.resource_rules.iter().flatten().any(|r| {
                let has = |v: &Option<Vec<String>>, s: &str| v.iter().flatten().any(|x| x == s);
                has(&r.api_groups, "batch")
                    && has(&r.api_versions, "v1")
                    && has(&r.resources, "jobs")
                    && has(&r.operations, "CREATE")
                    && has(&r.operations, "UPDATE")
            }),
            "{overlay}: {constraints:?}"
        );
        // The requests it applies to are the worker's: the service account worker.yaml runs
        // as, in the namespace the worker is rendered into, the one the Role is bound to.
        let worker = of_kind(&objects, "Deployment")
            .find(|d| d["metadata"]["name"] == "patchflow-worker")
            .unwrap();
        let ns = worker["metadata"]["namespace"].as_str().unwrap();
        let sa = worker["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let username = format!("'system:serviceaccount:{ns}:{sa}'");
        assert!(
            spec.match_conditions.iter().flatten().any(|m| {
                m.expression.contains("request.userInfo.username ==")
                    && m.expression.contains(&username)
            }),
            "{overlay}: no matchCondition names {username}"
        );
        let binding: RoleBinding =
            serde_json::from_value(of_kind(&objects, "RoleBinding").next().unwrap().clone())
                .unwrap();
        assert!(
            binding
                .subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == sa),
            "{overlay}: the Role is bound to {sa}"
        );
        if let Some(sel) = bspec
            .match_resources
            .as_ref()
            .and_then(|m| m.namespace_selector.as_ref())
        {
            assert_eq!(
                sel.match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
                ns,
                "{overlay}: the binding's namespace"
            );
        }
        // The expected values are the ConfigMap's, which the worker builds its Jobs from.
        let kind = spec.param_kind.as_ref().unwrap();
        assert_eq!(
            (kind.api_version.as_deref(), kind.kind.as_deref()),
            (Some("v1"), Some("ConfigMap"))
        );
        let param = bspec.param_ref.as_ref().unwrap();
        let config: ConfigMap =
            serde_json::from_value(of_kind(&objects, "ConfigMap").next().unwrap().clone()).unwrap();
        assert_eq!(param.name, config.metadata.name, "{overlay}: paramRef");
        assert!(param.namespace.is_none() || param.namespace.as_deref() == Some(ns));
        let data = config.data.unwrap();
        let text: String = expressions(&a)
            .into_iter()
            .map(|(_, e)| e)
            .collect::<Vec<_>>()
            .join("\n");
        for key in text.split("params.data['").skip(1) {
            let key = key.split('\'').next().unwrap();
            assert!(
                data.contains_key(key) || text.contains(&format!("'{key}' in params.data")),
                "{overlay}: the policy reads {key}, which patchflow-config does not set"
            );
        }
        for key in [
            "PATCHFLOW_KUBE_IMAGE",
            "PATCHFLOW_KUBE_SERVICE_ACCOUNT",
            "PATCHFLOW_KUBE_API_KEY_SECRET",
            "PATCHFLOW_KUBE_API_KEY_SECRET_KEY",
        ] {
            assert!(text.contains(&format!("params.data['{key}']")), "{key}");
        }
        // What it checks.
        let validations: String = spec
            .validations
            .iter()
            .flatten()
            .map(|v| v.expression.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        for needle in [
            "hostPath",
            "privileged",
            "allowPrivilegeEscalation",
            "capabilities.add",
            "serviceAccountName",
            "automountServiceAccountToken",
            "hostNetwork",
            "hostPID",
            "hostIPC",
            "hostPort",
            "c.image",
            "ephemeralContainers",
            "emptyDir",
            "secretKeyRef",
            "envFrom",
            "'app.kubernetes.io/name'",
            "'patchflow-agent'",
        ] {
            assert!(
                validations.contains(needle),
                "{overlay}: no validation mentions {needle}"
            );
        }
        // Init containers are checked with the others.
        assert!(text.contains("initContainers"), "{overlay}");
    }
}

/// Brackets and quotes of a CEL expression pair up (outside string literals).
fn balanced(expr: &str) -> bool {
    let mut open = Vec::new();
    let mut quote = None;
    let mut escaped = false;
    for ch in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == q {
                quote = None;
            }
            continue;
        }
        match ch {
            '\'' | '"' => quote = Some(ch),
            '(' | '[' | '{' => open.push(ch),
            ')' | ']' | '}' => {
                let want = match ch {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if open.pop() != Some(want) {
                    return false;
                }
            }
            _ => {}
        }
    }
    quote.is_none() && open.is_empty()
}

/// Hostile reading, with no cluster to evaluate against: the policy must fail closed.
/// An error in an expression, a missing ConfigMap or a policy nobody enforces must deny the
/// worker's Job, never let it through.
#[test]
fn the_admission_policy_fails_closed() {
    assert!(balanced("a.all(c, has(c.x) && c.y == ')')"));
    assert!(!balanced("a.all(c, has(c.x)"));
    assert!(!balanced("c.y == 'x"));
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let a = admission(&objects);
        let spec = a.policy.spec.as_ref().unwrap();
        assert_eq!(spec.failure_policy.as_deref(), Some("Fail"), "{overlay}");
        let bspec = &a.binding.spec;
        let actions = &bspec.validation_actions;
        assert!(
            actions.iter().any(|x| x == "Deny"),
            "{overlay}: {actions:?}"
        );
        assert_eq!(
            bspec
                .param_ref
                .as_ref()
                .and_then(|p| p.parameter_not_found_action.as_deref()),
            Some("Deny"),
            "{overlay}: a missing ConfigMap must deny"
        );
        assert!(
            bspec
                .param_ref
                .as_ref()
                .is_some_and(|p| p.selector.is_none()),
            "{overlay}: one named ConfigMap, not whichever a selector finds"
        );
        assert!(!spec.match_conditions.clone().unwrap_or_default().is_empty());
        let validations = spec.validations.clone().unwrap_or_default();
        assert!(validations.len() >= 5, "{overlay}: {}", validations.len());
        for v in &validations {
            assert!(
                v.message.as_ref().is_some_and(|m| !m.trim().is_empty()),
                "{overlay}: a validation without a message: {}",
                v.expression
            );
        }
        for (at, e) in expressions(&a) {
            let e = e.trim();
            assert!(!e.is_empty(), "{overlay}: {at} is empty");
            assert!(balanced(e), "{overlay}: {at} is not well formed: {e}");
            if at.starts_with("validations") {
                assert!(
                    !["true", "1 == 1", "!false"].contains(&e),
                    "{overlay}: {at} always passes"
                );
            }
        }
    }
}
