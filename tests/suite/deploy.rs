//! deploy/: the Kustomize base and overlays render (`kubectl kustomize`, offline) and every
//! object parses into its typed k8s-openapi struct; every pod template is locked down, the
//! worker's Role grants nothing beyond what the kube runner needs, agent pods may only reach
//! DNS and the two allowed address blocks, and no secret is written inline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
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
        // The worker's Role: Jobs create/get/list/watch/delete, pods get/list/watch,
        // pods/log get. Nothing more.
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
                "/pods:get",
                "/pods:list",
                "/pods:watch",
                "batch/jobs:create",
                "batch/jobs:delete",
                "batch/jobs:get",
                "batch/jobs:list",
                "batch/jobs:watch",
            ]
        );
        // Agent pods: no ingress; egress to DNS and the two address blocks only.
        let np: NetworkPolicy =
            serde_json::from_value(of_kind(&objects, "NetworkPolicy").next().unwrap().clone())
                .unwrap();
        let spec = np.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/name"],
            "patchflow-agent"
        );
        assert_eq!(spec.policy_types.unwrap(), ["Ingress", "Egress"]);
        assert!(spec.ingress.unwrap_or_default().is_empty());
        let egress = spec.egress.unwrap();
        assert_eq!(egress.len(), 2);
        let dns_ports: Vec<i32> = egress[0]
            .ports
            .iter()
            .flatten()
            .filter_map(|p| match &p.port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(dns_ports, [53, 53]);
        assert!(
            egress[1]
                .to
                .iter()
                .flatten()
                .all(|peer| peer.ip_block.is_some())
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
    }
}
