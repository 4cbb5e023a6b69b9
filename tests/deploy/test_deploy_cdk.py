"""The CDK stack: every property the deployment issue asks for, on the synthesized template.

Each test reads the CloudFormation that `cdk deploy` would submit, so a
regression in the construct or the stack shows up as a changed template.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Match

from tests.deploy.cdk_synth import CERTIFICATE_ARN, EXISTING_VPC, Synthesis, load_cdk_app
from tests.deploy.deploy_helpers import CDK_DIR, clean_env

SERVICES = {"vegeta": "vegeta-service-dbz", "krillin": "krillin-service-dbz"}


# --- helpers over the raw template -------------------------------------------------


def resources(raw: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in raw["Resources"].items() if v["Type"] == type_}


def only(raw: dict[str, Any], type_: str, **match: Any) -> tuple[str, dict[str, Any]]:
    """The single resource of `type_` whose properties include `match`."""
    found = [
        (k, v["Properties"])
        for k, v in resources(raw, type_).items()
        if all(v["Properties"].get(p) == want for p, want in match.items())
    ]
    assert len(found) == 1, f"{type_} {match}: {len(found)} found"
    return found[0]


def ecs_service(raw: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """The ECS service whose Cloud Map registration is the discovery service `name`."""
    discovery_id, _ = only(raw, "AWS::ServiceDiscovery::Service", Name=name)
    for logical_id, props in resources(raw, "AWS::ECS::Service").items():
        registries = props["Properties"].get("ServiceRegistries", [])
        if any(r["RegistryArn"] == {"Fn::GetAtt": [discovery_id, "Arn"]} for r in registries):
            return logical_id, props["Properties"]
    raise AssertionError(f"no ECS service registers with discovery service {name}")


def container(raw: dict[str, Any], service_name: str) -> dict[str, Any]:
    _, service = ecs_service(raw, service_name)
    task_def = raw["Resources"][service["TaskDefinition"]["Ref"]]["Properties"]
    (definition,) = task_def["ContainerDefinitions"]
    return dict(definition)


def task_definition(raw: dict[str, Any], service_name: str) -> dict[str, Any]:
    _, service = ecs_service(raw, service_name)
    return dict(raw["Resources"][service["TaskDefinition"]["Ref"]]["Properties"])


def env_of(definition: dict[str, Any]) -> dict[str, Any]:
    return {e["Name"]: e["Value"] for e in definition.get("Environment", [])}


def sg_id(ref: Any) -> str:
    """Logical id of a security group from `Fn::GetAtt [id, GroupId]`."""
    assert isinstance(ref, dict) and "Fn::GetAtt" in ref, ref
    return str(ref["Fn::GetAtt"][0])


def sg_rules(raw: dict[str, Any], group: str, direction: str) -> set[tuple[str, int, int, str]]:
    """All rules of one security group, inline or standalone, as (proto, from, to, peer)."""
    inline_key = "SecurityGroupIngress" if direction == "in" else "SecurityGroupEgress"
    peer_key = "SourceSecurityGroupId" if direction == "in" else "DestinationSecurityGroupId"
    rules = list(raw["Resources"][group]["Properties"].get(inline_key, []))
    standalone = (
        "AWS::EC2::SecurityGroupIngress" if direction == "in" else ("AWS::EC2::SecurityGroupEgress")
    )
    rules += [
        r["Properties"]
        for r in resources(raw, standalone).values()
        if sg_id(r["Properties"]["GroupId"]) == group
    ]
    out = set()
    for rule in rules:
        peer = rule.get("CidrIp") or rule.get("CidrIpv6") or sg_id(rule[peer_key])
        out.add((rule["IpProtocol"], rule.get("FromPort", -1), rule.get("ToPort", -1), peer))
    return out


# --- Cloud Map discovery -----------------------------------------------------------


def test_each_service_has_its_own_discovery_service(default_synth: Synthesis) -> None:
    """One Cloud Map service per ECS service, so a DNS name returns only its own tasks."""
    raw = default_synth.raw
    template = default_synth.template
    template.resource_count_is("AWS::ServiceDiscovery::Service", 2)
    for name in SERVICES:
        template.has_resource_properties(
            "AWS::ServiceDiscovery::Service",
            {
                "Name": name,
                "DnsConfig": {
                    "DnsRecords": [{"TTL": 10, "Type": "A"}],
                    "RoutingPolicy": "MULTIVALUE",
                    "NamespaceId": Match.any_value(),
                },
            },
        )
    (namespace,) = resources(raw, "AWS::ServiceDiscovery::PrivateDnsNamespace").values()
    assert namespace["Properties"]["Name"] == "shoalhi.internal"
    seen_ecs = set()
    for name in SERVICES:
        _, discovery = only(raw, "AWS::ServiceDiscovery::Service", Name=name)
        assert discovery["DnsConfig"]["DnsRecords"] == [{"TTL": 10, "Type": "A"}]
        assert discovery["DnsConfig"]["RoutingPolicy"] == "MULTIVALUE"
        seen_ecs.add(ecs_service(raw, name)[0])
    assert len(seen_ecs) == 2


def test_nodes_poll_their_own_service_name_with_dns(default_synth: Synthesis) -> None:
    for name, node_name in SERVICES.items():
        env = env_of(container(default_synth.raw, name))
        assert env["TOPOLOGY_TYPE"] == "dns"
        assert env["SERVICE_DISCOVERY_ENDPOINT"] == f"{name}.shoalhi.internal"
        assert env["NODE_NAME"] == env["NODE_NAME_QUERY"] == node_name
        assert env["SHOAL_PORT"] == "4370" and env["PORT"] == "4000"
        assert "HI_JOB_SCHEDULE" in env and "POLLING_INTERVAL" in env
        # The node reads its address from the ECS task metadata endpoint v4.
        assert "NODE_HOST" not in env


# --- the cookie --------------------------------------------------------------------


def test_cookie_is_an_ecs_secret_from_secrets_manager(default_synth: Synthesis) -> None:
    raw = default_synth.raw
    secrets = resources(raw, "AWS::SecretsManager::Secret")
    assert len(secrets) == 2, "one cookie per cluster"
    for secret in secrets.values():
        assert "GenerateSecretString" in secret["Properties"]
        assert "SecretString" not in secret["Properties"]
    used = set()
    for name in SERVICES:
        definition = container(raw, name)
        assert "RELEASE_COOKIE" not in env_of(definition)
        (entry,) = [s for s in definition["Secrets"] if s["Name"] == "RELEASE_COOKIE"]
        used.add(entry["ValueFrom"]["Ref"])
    assert used == set(secrets)
    assert "RELEASE_COOKIE" not in json.dumps(raw.get("Outputs", {}))


# --- networking --------------------------------------------------------------------


def test_security_groups_allow_exactly_alb_to_http_and_mesh_within_service(
    default_synth: Synthesis,
) -> None:
    """Ingress: the ALB to 4000 and the service itself to 4370; nothing else."""
    raw = default_synth.raw
    (alb,) = resources(raw, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    (alb_sg,) = [sg_id(ref) for ref in alb["Properties"]["SecurityGroups"]]
    service_sgs = {}
    for name in SERVICES:
        _, service = ecs_service(raw, name)
        (group,) = service["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]
        service_sgs[name] = sg_id(group)
    assert len(set(service_sgs.values())) == 2, "each service has its own security group"

    for sg in service_sgs.values():
        assert sg_rules(raw, sg, "in") == {("tcp", 4000, 4000, alb_sg), ("tcp", 4370, 4370, sg)}
        assert sg_rules(raw, sg, "out") == {
            ("tcp", 443, 443, "0.0.0.0/0"),
            ("tcp", 4370, 4370, sg),
        }
    assert sg_rules(raw, alb_sg, "in") == {("tcp", 80, 80, "0.0.0.0/0")}
    assert sg_rules(raw, alb_sg, "out") == {("tcp", 4000, 4000, sg) for sg in service_sgs.values()}


def test_linking_two_services_opens_the_mesh_both_ways() -> None:
    """`connect_mesh_with` adds one ingress rule each way (the seed's duplicate rule didn't)."""
    import aws_cdk as cdk
    from aws_cdk import aws_ec2 as ec2
    from aws_cdk import aws_ecs as ecs
    from aws_cdk import aws_servicediscovery as servicediscovery
    from aws_cdk.assertions import Template

    load_cdk_app()
    from shoal_cdk import ShoalFargateService

    stack = cdk.Stack(cdk.App(), "Linked")
    vpc = ec2.Vpc(
        stack,
        "Vpc",
        nat_gateways=0,
        subnet_configuration=[
            ec2.SubnetConfiguration(name="p", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)
        ],
    )
    cluster = ecs.Cluster(stack, "Cluster", vpc=vpc)
    namespace = servicediscovery.PrivateDnsNamespace(stack, "Ns", name="linked.internal", vpc=vpc)
    image = ecs.ContainerImage.from_registry("example/hi:1")
    subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)
    a, b = (
        ShoalFargateService(
            stack,
            name,
            cluster=cluster,
            image=image,
            namespace=namespace,
            discovery_name=name.lower(),
            node_name=name.lower(),
            vpc_subnets=subnets,
        )
        for name in ("A", "B")
    )
    a.connect_mesh_with(b)
    raw = Template.from_stack(stack).to_json()
    sg_a = stack.resolve(a.security_group.security_group_id)["Fn::GetAtt"][0]
    sg_b = stack.resolve(b.security_group.security_group_id)["Fn::GetAtt"][0]
    assert sg_rules(raw, sg_a, "in") == {("tcp", 4370, 4370, sg_a), ("tcp", 4370, 4370, sg_b)}
    assert sg_rules(raw, sg_b, "in") == {("tcp", 4370, 4370, sg_b), ("tcp", 4370, 4370, sg_a)}
    assert ("tcp", 4370, 4370, sg_b) in sg_rules(raw, sg_a, "out")


def test_a_longest_request_beyond_fargates_stop_timeout_is_refused() -> None:
    load_cdk_app()
    from shoal_cdk import TimeoutChain

    with pytest.raises(ValueError, match="Fargate allows at most 120 s"):
        TimeoutChain(longest_request_s=110)


def test_a_polling_interval_the_nodes_would_refuse_is_refused_at_synth() -> None:
    import aws_cdk as cdk

    load_cdk_app()
    from shoal_cdk import ShoalFargateService

    with pytest.raises(ValueError, match="polling_interval must be at least 100 ms"):
        ShoalFargateService(  # refused before any of its parts is used
            cdk.Stack(cdk.App(), "Polling"),
            "Svc",
            cluster=None,
            image=None,
            namespace=None,
            discovery_name="svc",
            node_name="svc",
            polling_interval=cdk.Duration.millis(50),
        )


@pytest.mark.parametrize("longest", [1, 30, 60, 99])
def test_timeout_chain_orders_every_timeout(longest: int) -> None:
    """keep-alive > ALB idle > longest request; in-flight requests finish within the
    deregistration delay and the drain; the drain and handover within the stop timeout."""
    load_cdk_app()
    from shoal_cdk import TimeoutChain

    from shoal.drain import Drain

    chain = TimeoutChain(longest_request_s=longest)
    assert chain.keep_alive_s > chain.idle_timeout_s > chain.longest_request_s
    assert chain.deregistration_delay_s > chain.longest_request_s
    assert chain.drain_period_s >= chain.lame_duck_s + chain.longest_request_s
    assert chain.stop_timeout_s > chain.drain_period_s + chain.handover_s
    assert chain.stop_timeout_s <= 120
    # The app derives the same keep-alive and drain from the settings the chain passes.
    drain = Drain.from_env(chain.environment())
    assert drain.keep_alive == chain.keep_alive_s
    assert drain.idle_timeout == chain.idle_timeout_s
    assert drain.shutdown_time <= chain.drain_period_s


def test_the_deployed_timeouts_follow_one_setting(default_synth: Synthesis) -> None:
    raw = default_synth.raw
    (alb,) = resources(raw, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    alb_attributes = {a["Key"]: a["Value"] for a in alb["Properties"]["LoadBalancerAttributes"]}
    idle = int(alb_attributes["idle_timeout.timeout_seconds"])
    for name in SERVICES:
        env = env_of(container(raw, name))
        longest = int(env["SHOAL_MAX_REQUEST_MS"]) / 1000
        lame_duck = int(env["SHOAL_LAME_DUCK_MS"]) / 1000
        handover = int(env["SHOAL_DRAIN_TIMEOUT_MS"]) / 1000
        assert (longest, lame_duck, handover) == (60, 5, 10)
        from shoal.drain import Drain

        keep_alive = Drain.from_env(env).keep_alive
        assert keep_alive > idle > longest
        group = raw["Resources"][target_group_of(raw, name)]["Properties"]
        attributes = {a["Key"]: a["Value"] for a in group["TargetGroupAttributes"]}
        assert int(attributes["deregistration_delay.timeout_seconds"]) > longest
        stop = container(raw, name)["StopTimeout"]
        assert lame_duck + longest + handover < stop <= 120


def test_deployment_alarms_roll_back_beside_the_circuit_breaker(default_synth: Synthesis) -> None:
    raw = default_synth.raw
    alarms = resources(raw, "AWS::CloudWatch::Alarm")
    for name in SERVICES:
        _, service = ecs_service(raw, name)
        deployment = service["DeploymentConfiguration"]
        assert deployment["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
        config = deployment["Alarms"]
        assert config["Enable"] is True and config["Rollback"] is True
        watched = {ref["Ref"] for ref in config["AlarmNames"]}
        metrics = {alarms[a]["Properties"]["MetricName"] for a in watched}
        assert metrics == {"HTTPCode_Target_5XX_Count", "UnHealthyHostCount"}
        group = target_group_of(raw, name)
        for alarm in watched:
            props = alarms[alarm]["Properties"]
            assert props["Threshold"] == 1
            dims = {d["Name"]: d["Value"] for d in props["Dimensions"]}
            assert dims["TargetGroup"] == {"Fn::GetAtt": [group, "TargetGroupFullName"]}


def test_one_nat_gateway_per_az_by_default(default_synth: Synthesis) -> None:
    raw = default_synth.raw
    assert len(resources(raw, "AWS::EC2::NatGateway")) == 2
    assert not resources(raw, "AWS::EC2::VPCEndpoint")


def test_endpoints_instead_of_nat(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.deploy.cdk_synth import synthesize

    synth = synthesize({"egress": "endpoints"}, tmp_path_factory.mktemp("cdk-endpoints"))
    raw = synth.raw
    assert not resources(raw, "AWS::EC2::NatGateway")
    endpoints = resources(raw, "AWS::EC2::VPCEndpoint").values()
    names = {json.dumps(e["Properties"]["ServiceName"]) for e in endpoints}
    for service in ("ecr.api", "ecr.dkr", "logs", "secretsmanager", "ssmmessages", "s3"):
        assert any(service in name for name in names), (service, names)
    for endpoint in endpoints:
        props = endpoint["Properties"]
        if props.get("VpcEndpointType") == "Interface":
            assert props["PrivateDnsEnabled"] is True
            assert len(props["SubnetIds"]) == 2, "one per AZ"
    assert synth.nag_violations == []


def test_feature_flags_are_all_decided() -> None:
    """Every flag this aws-cdk-lib recommends is set in cdk.json."""
    import tarfile

    import aws_cdk

    (bundle,) = (Path(aws_cdk.__file__).parent / "_jsii").glob("aws-cdk-lib@*.jsii.tgz")
    with tarfile.open(bundle) as archive:
        member = archive.extractfile("package/recommended-feature-flags.json")
        assert member is not None
        recommended = json.load(member)
    context = json.loads((CDK_DIR / "cdk.json").read_text())["context"]
    assert set(recommended) <= set(context)


# --- ECS services and tasks --------------------------------------------------------


def test_services_roll_out_without_downtime_and_roll_back(default_synth: Synthesis) -> None:
    default_synth.template.all_resources_properties(
        "AWS::ECS::Service",
        {
            "DeploymentConfiguration": Match.object_like(
                {
                    "MinimumHealthyPercent": 100,
                    "MaximumPercent": 200,
                    "DeploymentCircuitBreaker": {"Enable": True, "Rollback": True},
                }
            ),
            "EnableExecuteCommand": True,
        },
    )
    for name in SERVICES:
        _, service = ecs_service(default_synth.raw, name)
        deployment = service["DeploymentConfiguration"]
        assert deployment["MinimumHealthyPercent"] == 100
        assert deployment["MaximumPercent"] == 200
        assert deployment["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
        assert service["DesiredCount"] == 2
        assert service["LaunchType"] == "FARGATE"
        assert service["EnableExecuteCommand"] is True
        assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == (
            "DISABLED"
        )


def test_tasks_size_stop_timeout_and_health(default_synth: Synthesis) -> None:
    for name in SERVICES:
        task = task_definition(default_synth.raw, name)
        assert (task["Cpu"], task["Memory"]) == ("256", "512")
        assert task["RequiresCompatibilities"] == ["FARGATE"]
        definition = container(default_synth.raw, name)
        # Longer than the node's drain and handover (see the timeout chain tests).
        drain_s = int(env_of(definition)["SHOAL_DRAIN_TIMEOUT_MS"]) / 1000
        assert definition["StopTimeout"] == 81 > drain_s
        assert definition["LinuxParameters"]["InitProcessEnabled"] is True
        assert "/health" in " ".join(definition["HealthCheck"]["Command"])
        assert {p["ContainerPort"] for p in definition["PortMappings"]} == {4000, 4370}


def test_image_is_built_from_the_dockerfile_as_an_asset(default_synth: Synthesis) -> None:
    """Image and services deploy together; the asset holds what the Dockerfile copies."""
    manifest = json.loads(next(default_synth.outdir.glob("*.assets.json")).read_text())
    (image,) = manifest["dockerImages"].values()
    assert image["source"]["dockerFile"] == "deploy/docker/Dockerfile"
    assert image["source"]["platform"] == "linux/amd64"
    context = default_synth.outdir / image["source"]["directory"]
    staged = {p.relative_to(context).as_posix() for p in context.rglob("*")}
    assert {"pyproject.toml", "deploy/docker/Dockerfile", "src/shoal"} <= staged
    assert any(p.startswith("examples/hi/src") for p in staged)
    assert "examples/hi/pyproject.toml" in staged
    assert not any(p.startswith((".venv", ".git/", "tests", "deploy/cdk")) for p in staged)
    for name in SERVICES:
        assert "Fn::Sub" in json.dumps(container(default_synth.raw, name)["Image"])


def test_cluster_has_container_insights_and_logged_exec(default_synth: Synthesis) -> None:
    _, cluster = next(iter(resources(default_synth.raw, "AWS::ECS::Cluster").items()))
    props = cluster["Properties"]
    assert {"Name": "containerInsights", "Value": "enabled"} in props["ClusterSettings"]
    assert props["Configuration"]["ExecuteCommandConfiguration"]["Logging"] == "OVERRIDE"


def test_every_log_group_has_a_retention(default_synth: Synthesis) -> None:
    default_synth.template.all_resources_properties("AWS::Logs::LogGroup", {"RetentionInDays": 30})
    groups = resources(default_synth.raw, "AWS::Logs::LogGroup")
    assert len(groups) >= 3  # two services, ECS exec sessions, VPC flow logs
    for group in groups.values():
        assert group["Properties"]["RetentionInDays"] == 30
    for name in SERVICES:
        log = container(default_synth.raw, name)["LogConfiguration"]
        assert log["LogDriver"] == "awslogs"
        assert log["Options"]["awslogs-group"]["Ref"] in groups


# --- the load balancer -------------------------------------------------------------


def target_group_of(raw: dict[str, Any], name: str) -> str:
    _, service = ecs_service(raw, name)
    (lb,) = service["LoadBalancers"]
    assert (lb["ContainerName"], lb["ContainerPort"]) == ("app", 4000)
    return str(lb["TargetGroupArn"]["Ref"])


def test_alb_routes_krillin_paths_and_defaults_to_vegeta(default_synth: Synthesis) -> None:
    raw = default_synth.raw
    (alb,) = resources(raw, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    assert alb["Properties"]["Scheme"] == "internet-facing"
    listener_id, listener = only(raw, "AWS::ElasticLoadBalancingV2::Listener", Port=80)
    assert listener["Protocol"] == "HTTP"
    assert listener["DefaultActions"] == [
        {"TargetGroupArn": {"Ref": target_group_of(raw, "vegeta")}, "Type": "forward"}
    ]
    (rule,) = resources(raw, "AWS::ElasticLoadBalancingV2::ListenerRule").values()
    props = rule["Properties"]
    assert props["ListenerArn"] == {"Ref": listener_id}
    assert props["Priority"] == 10
    assert props["Conditions"] == [
        {"Field": "path-pattern", "PathPatternConfig": {"Values": ["/krillin", "/krillin/*"]}}
    ]
    assert props["Actions"] == [
        {"TargetGroupArn": {"Ref": target_group_of(raw, "krillin")}, "Type": "forward"}
    ]


def test_target_groups_check_ready_and_let_requests_finish(default_synth: Synthesis) -> None:
    default_synth.template.all_resources_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {"HealthCheckPath": "/ready", "Matcher": {"HttpCode": "200"}},
    )
    for name in SERVICES:
        group = default_synth.raw["Resources"][target_group_of(default_synth.raw, name)]
        props = group["Properties"]
        assert props["HealthCheckPath"] == "/ready"
        assert props["Matcher"] == {"HttpCode": "200"}
        assert (props["Port"], props["TargetType"]) == (4000, "ip")
        attributes = {a["Key"]: a["Value"] for a in props["TargetGroupAttributes"]}
        assert int(attributes["deregistration_delay.timeout_seconds"]) == 65


def test_load_balancer_url_is_an_output(default_synth: Synthesis) -> None:
    default_synth.template.has_output("LoadBalancerUrl", {"Value": Match.any_value()})
    output = default_synth.raw["Outputs"]["LoadBalancerUrl"]["Value"]
    assert output["Fn::Join"][1][0] == "http://"
    assert output["Fn::Join"][1][1]["Fn::GetAtt"][1] == "DNSName"
    # What the README's ECS exec and log commands read.
    for key in ("ClusterName", "VegetaServiceName", "KrillinServiceName", "VegetaLogGroup"):
        assert key in default_synth.raw["Outputs"]


def test_https_when_a_certificate_is_given(variant_synth: Synthesis) -> None:
    raw = variant_synth.raw
    _, https = only(raw, "AWS::ElasticLoadBalancingV2::Listener", Port=443)
    assert https["Protocol"] == "HTTPS"
    assert https["Certificates"] == [{"CertificateArn": CERTIFICATE_ARN}]
    assert https["SslPolicy"].startswith("ELBSecurityPolicy-TLS13")
    _, http = only(raw, "AWS::ElasticLoadBalancingV2::Listener", Port=80)
    (redirect,) = http["DefaultActions"]
    assert redirect["Type"] == "redirect"
    assert redirect["RedirectConfig"]["Port"] == "443"
    (rule,) = resources(raw, "AWS::ElasticLoadBalancingV2::ListenerRule").values()
    assert rule["Properties"]["Priority"] == 10
    assert raw["Outputs"]["LoadBalancerUrl"]["Value"]["Fn::Join"][1][0] == "https://"


def test_existing_vpc_by_id_synthesizes_offline(variant_synth: Synthesis) -> None:
    raw = variant_synth.raw
    assert not resources(raw, "AWS::EC2::VPC")
    private = EXISTING_VPC["vpc_private_subnet_ids"].split(",")
    public = EXISTING_VPC["vpc_public_subnet_ids"].split(",")
    for name in SERVICES:
        _, service = ecs_service(raw, name)
        assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["Subnets"] == private
    (alb,) = resources(raw, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    assert alb["Properties"]["Subnets"] == public
    for group in resources(raw, "AWS::EC2::SecurityGroup").values():
        assert group["Properties"]["VpcId"] == EXISTING_VPC["vpc_id"]


def test_vpc_id_alone_is_looked_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With only `vpc_id`, the app asks the CLI for a lookup (needs an account)."""
    import aws_cdk as cdk

    monkeypatch.setenv("CDK_DEFAULT_ACCOUNT", "123456789012")
    monkeypatch.setenv("CDK_DEFAULT_REGION", "eu-west-1")
    app = cdk.App(outdir=str(tmp_path), context={"vpc_id": EXISTING_VPC["vpc_id"]})
    load_cdk_app().build(app)
    app.synth()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert any(m["provider"] == "vpc-provider" for m in manifest.get("missing", []))


# --- two stacks in one account -----------------------------------------------------

NAMED = {
    "AWS::ECS::Cluster": "ClusterName",
    "AWS::ECS::TaskDefinition": "Family",
    "AWS::ECS::Service": "ServiceName",
    "AWS::Logs::LogGroup": "LogGroupName",
    "AWS::SecretsManager::Secret": "Name",
    "AWS::ServiceDiscovery::PrivateDnsNamespace": "Name",
    "AWS::ElasticLoadBalancingV2::LoadBalancer": "Name",
    "AWS::ElasticLoadBalancingV2::TargetGroup": "Name",
    "AWS::IAM::Role": "RoleName",
}


def physical_names(raw: dict[str, Any]) -> set[str]:
    """Names AWS requires unique per account/region that the template sets itself."""
    names = set()
    for type_, prop in NAMED.items():
        for resource in resources(raw, type_).values():
            value = resource["Properties"].get(prop)
            if value is not None:
                names.add(json.dumps(value, sort_keys=True))
    return names


def test_two_stacks_can_live_in_one_account(
    default_synth: Synthesis, variant_synth: Synthesis
) -> None:
    default_names = physical_names(default_synth.raw)
    assert default_names, "the namespace name at least is set explicitly"
    assert not default_names & physical_names(variant_synth.raw)
    assert default_synth.stack.stack_name != variant_synth.stack.stack_name
    namespaces = {
        json.dumps(r["Properties"]["Name"])
        for s in (default_synth, variant_synth)
        for r in resources(s.raw, "AWS::ServiceDiscovery::PrivateDnsNamespace").values()
    }
    assert namespaces == {'"shoalhi.internal"', '"shoalhistaging.internal"'}


# --- linters -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "variant"])
def test_cdk_nag_aws_solutions_findings_are_all_acknowledged(
    which: str, request: pytest.FixtureRequest
) -> None:
    synth: Synthesis = request.getfixturevalue(f"{which}_synth")
    assert synth.nag_violations == []


@pytest.mark.parametrize("which", ["default", "variant"])
def test_cfn_lint_finds_no_errors(which: str, request: pytest.FixtureRequest) -> None:
    from cfnlint.api import lint_file

    synth: Synthesis = request.getfixturevalue(f"{which}_synth")
    template = next(p for p in synth.outdir.glob("*.template.json"))
    matches = lint_file(template)
    errors = [f"{m.rule.id} {m.message}" for m in matches if m.rule.severity == "error"]
    warnings = [
        f"{m.rule.id} {m.message}"
        for m in matches
        if m.rule.severity == "warning"
        # A redundant DependsOn inside the custom resource that CDK itself generates
        # for @aws-cdk/aws-ec2:restrictDefaultSecurityGroup (kept: it empties the
        # VPC's default security group).
        and not (m.rule.id == "W3005" and "CustomVpcRestrictDefaultSG" in m.message)
    ]
    assert errors == []
    assert warnings == []


def test_app_py_synthesizes_offline_as_the_cli_runs_it(tmp_path: Path) -> None:
    """`cdk synth` runs app.py with CDK_OUTDIR set; no credentials, nag enforced."""
    context = json.loads((CDK_DIR / "cdk.json").read_text())["context"]
    env = clean_env(
        CDK_OUTDIR=str(tmp_path),
        CDK_CONTEXT_JSON=json.dumps(context),
        JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="18,20",
    )
    result = subprocess.run(
        [sys.executable, str(CDK_DIR / "app.py")],
        cwd=CDK_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ShoalHi.template.json").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert not manifest.get("missing"), "no context lookups"
