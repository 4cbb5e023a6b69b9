"""The `hi` reference deployment: two shoal clusters behind one ALB.

`vegeta` takes the default route, `krillin` takes `/krillin` and
`/krillin/*`; each is its own cluster (own discovery name, own cookie, mesh
port open only within itself). Every name AWS needs unique per account is
derived from the stack name, so two stacks can live side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from aws_cdk import CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_logs as logs
from aws_cdk import aws_servicediscovery as servicediscovery
from constructs import Construct

from shoal_cdk.nag import acknowledge
from shoal_cdk.service import ShoalFargateService, TimeoutChain

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = "deploy/docker/Dockerfile"
LOG_RETENTION = logs.RetentionDays.ONE_MONTH
# How tasks in private subnets reach ECR, CloudWatch Logs and Secrets Manager
# (what a deploy or a rollback needs), each surviving the loss of one AZ:
# "nat": one NAT gateway per AZ; "endpoints": no NAT, VPC endpoints per AZ.
EGRESS_MODES = ("nat", "endpoints")


@dataclass(frozen=True)
class ExistingVpc:
    """An existing VPC described by ids, so synthesis needs no AWS account.

    `Vpc.from_lookup` would find the subnets itself but needs credentials
    and an account/region at synth time; these attributes make the same
    stack synthesize offline (and in tests).
    """

    vpc_id: str
    availability_zones: list[str]
    public_subnet_ids: list[str]
    private_subnet_ids: list[str]


def dns_label(name: str) -> str:
    """A DNS-safe lower-case label made from a stack name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "shoal"


class HiStack(Stack):
    """VPC, ECS cluster, Cloud Map namespace, ALB and the two `hi` services."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        existing_vpc: ExistingVpc | None = None,
        vpc_id_to_look_up: str | None = None,
        certificate_arn: str | None = None,
        image: ecs.ContainerImage | None = None,
        egress: str = "nat",
        timeouts: TimeoutChain | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)  # type: ignore[arg-type]
        if egress not in EGRESS_MODES:
            raise ValueError(f"egress={egress!r}: use one of {', '.join(EGRESS_MODES)}")
        self.timeouts = timeouts = timeouts or TimeoutChain()
        vpc = self._vpc(existing_vpc, vpc_id_to_look_up, egress)
        # New VPC with endpoints: the tasks' subnets are isolated (no route out).
        task_subnets = (
            ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)
            if egress == "endpoints" and existing_vpc is None and not vpc_id_to_look_up
            else None
        )

        exec_logs = logs.LogGroup(
            self, "ExecLogs", retention=LOG_RETENTION, removal_policy=RemovalPolicy.DESTROY
        )
        cluster = ecs.Cluster(
            self,
            "Cluster",
            vpc=vpc,
            container_insights_v2=ecs.ContainerInsights.ENABLED,
            # Every `aws ecs execute-command` session is recorded.
            execute_command_configuration=ecs.ExecuteCommandConfiguration(
                logging=ecs.ExecuteCommandLogging.OVERRIDE,
                log_configuration=ecs.ExecuteCommandLogConfiguration(
                    cloud_watch_log_group=exec_logs
                ),
            ),
        )
        namespace = servicediscovery.PrivateDnsNamespace(
            self,
            "Namespace",
            name=f"{dns_label(self.stack_name)}.internal",
            vpc=vpc,
            description=f"shoal discovery for {self.stack_name}",
        )

        if image is None:
            # Built and pushed by `cdk deploy` itself, so the services never
            # start before their image exists (the seed raced an ECR push).
            asset = ecr_assets.DockerImageAsset(
                self,
                "Image",
                directory=str(REPO_ROOT),
                file=DOCKERFILE,
                platform=ecr_assets.Platform.LINUX_AMD64,
            )
            image = ecs.ContainerImage.from_docker_image_asset(asset)

        self.vegeta = ShoalFargateService(
            self,
            "Vegeta",
            cluster=cluster,
            image=image,
            namespace=namespace,
            discovery_name="vegeta",
            node_name="vegeta-service-dbz",
            environment={"HI_JOB_SCHEDULE": "*/5 * * * * *", "HI_JOB_MISFIRE": "run_once"},
            log_retention=LOG_RETENTION,
            timeouts=timeouts,
            vpc_subnets=task_subnets,
        )
        self.krillin = ShoalFargateService(
            self,
            "Krillin",
            cluster=cluster,
            image=image,
            namespace=namespace,
            discovery_name="krillin",
            node_name="krillin-service-dbz",
            environment={"HI_JOB_SCHEDULE": "*/7 * * * * *", "HI_JOB_MISFIRE": "run_once"},
            log_retention=LOG_RETENTION,
            timeouts=timeouts,
            vpc_subnets=task_subnets,
        )

        alb = elbv2.ApplicationLoadBalancer(
            self,
            "LoadBalancer",
            vpc=vpc,
            internet_facing=True,
            drop_invalid_header_fields=True,
            # Above the longest request, below the app's keep-alive (TimeoutChain).
            idle_timeout=Duration.seconds(timeouts.idle_timeout_s),
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
        )
        acknowledge(
            alb,
            "AwsSolutions-ELB2",
            "Access logs need a region-bound S3 bucket; the reference stack stays "
            "region-agnostic. Enable with alb.log_access_logs(bucket) in production.",
        )
        acknowledge(
            alb,
            "AwsSolutions-EC23",
            "A public web entry point: the load balancer accepts HTTP(S) from anyone.",
        )

        if certificate_arn:
            listener = alb.add_listener(
                "Https",
                port=443,
                certificates=[elbv2.ListenerCertificate.from_arn(certificate_arn)],
                ssl_policy=elbv2.SslPolicy.RECOMMENDED_TLS,
                open=True,
            )
            alb.add_redirect(source_port=80, target_port=443)
            scheme = "https"
        else:
            listener = alb.add_listener("Http", port=80, open=True)
            scheme = "http"

        vegeta_targets = self.vegeta.target_group()
        krillin_targets = self.krillin.target_group()
        listener.add_target_groups("Vegeta", target_groups=[vegeta_targets])
        listener.add_target_groups(
            "Krillin",
            priority=10,
            conditions=[elbv2.ListenerCondition.path_patterns(["/krillin", "/krillin/*"])],
            target_groups=[krillin_targets],
        )
        self.vegeta.deployment_alarms(vegeta_targets)
        self.krillin.deployment_alarms(krillin_targets)

        CfnOutput(self, "LoadBalancerUrl", value=f"{scheme}://{alb.load_balancer_dns_name}")
        CfnOutput(self, "ClusterName", value=cluster.cluster_name)
        CfnOutput(self, "VegetaServiceName", value=self.vegeta.service.service_name)
        CfnOutput(self, "KrillinServiceName", value=self.krillin.service.service_name)
        CfnOutput(self, "VegetaLogGroup", value=self.vegeta.log_group.log_group_name)
        CfnOutput(self, "KrillinLogGroup", value=self.krillin.log_group.log_group_name)

    def _vpc(
        self, existing: ExistingVpc | None, vpc_id_to_look_up: str | None, egress: str
    ) -> ec2.IVpc:
        """A new two-AZ VPC, or an existing one (by attributes, or looked up by id)."""
        if existing is not None:
            return ec2.Vpc.from_vpc_attributes(
                self,
                "Vpc",
                vpc_id=existing.vpc_id,
                availability_zones=existing.availability_zones,
                public_subnet_ids=existing.public_subnet_ids,
                private_subnet_ids=existing.private_subnet_ids,
            )
        if vpc_id_to_look_up:
            # Needs an account and region on the stack and AWS credentials at synth;
            # the CLI caches the answer in cdk.context.json.
            return ec2.Vpc.from_lookup(self, "Vpc", vpc_id=vpc_id_to_look_up)
        private = (
            ec2.SubnetType.PRIVATE_ISOLATED
            if egress == "endpoints"
            else ec2.SubnetType.PRIVATE_WITH_EGRESS
        )
        vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=2,
            # Per AZ, so losing one AZ leaves the other's tasks their way out.
            nat_gateways=2 if egress == "nat" else 0,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="Public", subnet_type=ec2.SubnetType.PUBLIC),
                ec2.SubnetConfiguration(name="Private", subnet_type=private),
            ],
        )
        if egress == "endpoints":
            self._endpoints(vpc)
        vpc.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(
                logs.LogGroup(
                    self,
                    "FlowLogs",
                    retention=LOG_RETENTION,
                    removal_policy=RemovalPolicy.DESTROY,
                )
            ),
        )
        return vpc

    def _endpoints(self, vpc: ec2.Vpc) -> None:
        """What a task needs without NAT: image pulls (ECR API, registry, and S3 for
        the layers), logs, the cookie, and ECS exec's channels; in every AZ."""
        vpc.add_gateway_endpoint("S3", service=ec2.GatewayVpcEndpointAwsService.S3)
        services = {
            "EcrApi": ec2.InterfaceVpcEndpointAwsService.ECR,
            "EcrDocker": ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER,
            "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
            "SecretsManager": ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER,
            "SsmMessages": ec2.InterfaceVpcEndpointAwsService.SSM_MESSAGES,
        }
        for name, service in services.items():
            endpoint = vpc.add_interface_endpoint(name, service=service, private_dns_enabled=True)
            acknowledge(
                endpoint,
                "AwsSolutions-EC23",
                "The endpoint accepts HTTPS from the VPC's own CIDR only (a token that "
                "cdk-nag cannot resolve), not from the internet.",
            )
