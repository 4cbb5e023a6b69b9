"""Kubernetes: the manifest of docs/kubernetes.md, and DNS discovery through a headless Service.

No cluster runs here. The manifest is checked against Kubernetes' own schema
(kubernetes-validate), and the DNS shape a headless Service gives, one A record
per pod under `<service>.<namespace>.svc.cluster.local`, is served by the test
DNS server to real `hi` processes configured with the Deployment's environment.
Loopback aliases 127.0.85.x (the pods' IPs) belong to this module.
"""

from __future__ import annotations

import re
import signal
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_helpers import REPO
from tests.support.dns_server import LocalDNSServer
from tests.support.hi import COOKIE, HiNode
from tests.support.procs import Procs, wait_until

MANIFEST = REPO / "deploy" / "k8s" / "hi.yaml"
PAGE = REPO / "docs" / "kubernetes.md"
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifest promises to fit


def documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def resource(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def headless_service() -> dict[str, Any]:
    (service,) = [
        d for d in documents() if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"
    ]
    return service


def container() -> dict[str, Any]:
    (found,) = resource("Deployment", "hi")["spec"]["template"]["spec"]["containers"]
    return found


def pod_env(pod_ip: str) -> dict[str, str]:
    """The container's environment as the kubelet gives it to a pod with this IP."""
    env: dict[str, str] = {}
    for item in container()["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[item["name"]] = pod_ip
        elif item["valueFrom"].get("secretKeyRef", {}).get("key") == "RELEASE_COOKIE":
            env[item["name"]] = COOKIE
        else:
            raise AssertionError(f"unexpected env source: {item}")
    return env


def test_the_page_shows_the_manifest() -> None:
    text = PAGE.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert MANIFEST.read_text() in blocks
    assert f"kubectl apply -f {MANIFEST.relative_to(REPO)}" in text


def test_the_manifest_fits_the_kubernetes_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")  # the dev group has it
    for document in documents():
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_discovery_polls_the_headless_service_of_the_deployment() -> None:
    service = headless_service()
    deployment = resource("Deployment", "hi")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # A pod is in DNS before it is ready: it joins the mesh first, then turns ready.
    assert service["spec"]["publishNotReadyAddresses"] is True
    env = pod_env("10.1.2.3")
    namespace = service["metadata"]["namespace"]
    assert env["TOPOLOGY_TYPE"] == "dns"
    fqdn = f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert env["SERVICE_DISCOVERY_ENDPOINT"] == fqdn
    assert env["NODE_HOST"] == "10.1.2.3" and env["NODE_NAME_QUERY"] == env["NODE_NAME"]
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports["mesh"] == int(env["SHOAL_PORT"]) and ports["http"] == int(env["PORT"])
    assert container()["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container()["livenessProbe"]["httpGet"]["path"] == "/health"
    # Longer than the drain: lame duck + longest request + handover (10 s).
    drain_s = (int(env["SHOAL_LAME_DUCK_MS"]) + int(env["SHOAL_MAX_REQUEST_MS"])) / 1000 + 10
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain_s


def test_pods_find_each_other_through_the_headless_service_records(procs: Procs) -> None:
    env = pod_env("unused")
    fqdn = env["SERVICE_DISCOVERY_ENDPOINT"]
    pods = [f"127.0.85.{i}" for i in range(2, 5)]

    def start(pod_ip: str, dns: LocalDNSServer) -> HiNode:
        pod = pod_env(pod_ip)
        # HTTP on a free port (all "pods" share one machine); the pod's resolver is
        # the cluster DNS, here the test server; no load balancer: no lame duck.
        del pod["PORT"]
        pod |= {"SHOAL_DNS_SERVER": dns.address_text, "SHOAL_LAME_DUCK_MS": "0"}
        return HiNode.start(procs, pod_ip, basename=pod["NODE_NAME"], env=pod)

    def wait_mesh(nodes: list[HiNode]) -> None:
        for node in nodes:
            node.wait_nodes([other.name for other in nodes if other is not node], timeout=20)

    with LocalDNSServer() as dns:
        # The endpoints controller lists every pod of the selector, ready or not.
        dns.set_records(fqdn, pods)
        nodes = [start(ip, dns) for ip in pods]
        for node in nodes:
            node.wait_ready(timeout=30)
        wait_mesh(nodes)

        # Scale up: the new pod's record appears, everyone finds it.
        dns.set_records(fqdn, [*pods, "127.0.85.5"])
        nodes.append(start("127.0.85.5", dns))
        nodes[-1].wait_ready(timeout=30)
        wait_mesh(nodes)

        # Scale down: SIGTERM, then the record goes; the others see it leave.
        gone = nodes.pop(0)
        gone.proc.signal(signal.SIGTERM)
        dns.set_records(fqdn, [node.host for node in nodes])
        wait_until(lambda: not gone.proc.alive(), 30, message=f"{gone.name} exits on SIGTERM")
        assert gone.proc.returncode == 0, gone.proc.output()
        wait_mesh(nodes)
