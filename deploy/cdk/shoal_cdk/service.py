"""`ShoalFargateService`: make an ECS Fargate service a shoal cluster.

Drop it into any CDK app. It wires what the shoal contract (DESIGN.md) needs
and what the seed got wrong: one Cloud Map discovery service per ECS service
(so its DNS name returns only its own tasks), the cookie as an ECS secret
from Secrets Manager, the mesh port open only inside the service, a stop
timeout longer than the node's drain, and health checks on `/ready`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_servicediscovery as servicediscovery
from constructs import Construct

from shoal_cdk.nag import acknowledge

HTTP_PORT = 4000
MESH_PORT = 4370
CONTAINER_NAME = "app"
POLLING_INTERVAL = Duration.seconds(1)
MIN_POLLING_MS = 100  # shoal.config.MIN_POLLING_MS: nodes refuse less
# Fargate sends SIGKILL at most 120 s after SIGTERM.
FARGATE_MAX_STOP_TIMEOUT_S = 120


@dataclass(frozen=True)
class TimeoutChain:
    """Every timeout of a deploy, derived from the longest request the app serves.

    keep-alive (app) > ALB idle timeout > longest request, so the ALB, never
    the app, closes an idle connection and no request outlives the ALB's
    patience; the deregistration delay lets requests in flight finish
    before ECS sends SIGTERM; after SIGTERM the node serves through its lame
    duck, lets requests finish, hands its singletons over (`handover`) and
    exits within the stop timeout. The app derives its keep-alive the same
    way from `SHOAL_MAX_REQUEST_MS` (see `shoal.drain`).
    """

    longest_request_s: int = 60
    lame_duck_s: int = 5
    handover_s: int = 10

    def __post_init__(self) -> None:
        if self.longest_request_s < 1 or self.lame_duck_s < 0 or self.handover_s < 1:
            raise ValueError("timeouts must be positive")
        if self.stop_timeout_s > FARGATE_MAX_STOP_TIMEOUT_S:
            raise ValueError(
                f"longest request {self.longest_request_s} s gives a stop timeout of "
                f"{self.stop_timeout_s} s; Fargate allows at most {FARGATE_MAX_STOP_TIMEOUT_S} s"
            )

    @property
    def idle_timeout_s(self) -> int:
        """The ALB's idle timeout: above the longest request (as `Drain.idle_timeout`)."""
        return self.longest_request_s + 10

    @property
    def keep_alive_s(self) -> int:
        """The app's HTTP keep-alive: above the ALB's idle timeout (as `Drain.keep_alive`)."""
        return self.longest_request_s + 20

    @property
    def deregistration_delay_s(self) -> int:
        """Requests in flight when ECS deregisters a task finish before its SIGTERM."""
        return self.longest_request_s + 5

    @property
    def drain_period_s(self) -> int:
        """After SIGTERM: the lame duck, then requests in flight (the app's `Drain`)."""
        return self.lame_duck_s + self.longest_request_s + 1

    @property
    def stop_timeout_s(self) -> int:
        """SIGTERM to SIGKILL: the drain, the handover, and a margin."""
        return self.drain_period_s + self.handover_s + 5

    def environment(self) -> dict[str, str]:
        """The app's settings that carry the chain."""
        return {
            "SHOAL_LAME_DUCK_MS": str(self.lame_duck_s * 1000),
            "SHOAL_MAX_REQUEST_MS": str(self.longest_request_s * 1000),
            "SHOAL_DRAIN_TIMEOUT_MS": str(self.handover_s * 1000),
        }


# The container's own liveness probe. The image has no curl; Python is there.
_HEALTH_PROBE = (
    "import os,urllib.request;"
    "urllib.request.urlopen('http://127.0.0.1:'+os.environ.get('PORT','4000')+'/health',timeout=3)"
)


class ShoalFargateService(Construct):
    """A Fargate service whose tasks find each other through Cloud Map DNS.

    Each instance gets its own Cloud Map discovery service (A records,
    TTL 10 s, MULTIVALUE) named `discovery_name` in `namespace`, and its
    tasks poll that name (`TOPOLOGY_TYPE=dns`). `NODE_HOST` is left unset:
    the node reads its address from the ECS task metadata endpoint v4.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        cluster: ecs.ICluster,
        image: ecs.ContainerImage,
        namespace: servicediscovery.INamespace,
        discovery_name: str,
        node_name: str,
        cookie_secret: secretsmanager.ISecret | None = None,
        environment: Mapping[str, str] | None = None,
        desired_count: int = 2,
        cpu: int = 256,
        memory_limit_mib: int = 512,
        http_port: int = HTTP_PORT,
        mesh_port: int = MESH_PORT,
        polling_interval: Duration = POLLING_INTERVAL,
        timeouts: TimeoutChain | None = None,
        log_retention: logs.RetentionDays = logs.RetentionDays.ONE_MONTH,
        allow_all_outbound: bool = False,
        vpc_subnets: ec2.SubnetSelection | None = None,
    ) -> None:
        if polling_interval.to_milliseconds() < MIN_POLLING_MS:
            raise ValueError(
                f"polling_interval must be at least {MIN_POLLING_MS} ms "
                "(nodes refuse a shorter POLLING_INTERVAL)"
            )
        super().__init__(scope, construct_id)
        self.timeouts = timeouts = timeouts or TimeoutChain()
        self.http_port = http_port
        self.mesh_port = mesh_port

        if cookie_secret is None:
            cookie_secret = secretsmanager.Secret(
                self,
                "Cookie",
                description=f"shoal RELEASE_COOKIE of {node_name}",
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    password_length=64, exclude_punctuation=True
                ),
            )
            acknowledge(
                cookie_secret,
                "AwsSolutions-SMG4",
                "Rotating the cookie needs every node restarted at once (old and new "
                "nodes could not handshake), so it is rotated by a deploy, not by a Lambda.",
            )
        self.cookie_secret = cookie_secret

        # Own discovery service: its name resolves to this service's tasks only.
        self.discovery_service = servicediscovery.Service(
            self,
            "Discovery",
            namespace=namespace,
            name=discovery_name,
            dns_record_type=servicediscovery.DnsRecordType.A,
            dns_ttl=Duration.seconds(10),
            routing_policy=servicediscovery.RoutingPolicy.MULTIVALUE,
            custom_health_check=servicediscovery.HealthCheckCustomConfig(failure_threshold=1),
        )
        self.discovery_endpoint = f"{discovery_name}.{namespace.namespace_name}"

        self.log_group = logs.LogGroup(
            self, "Logs", retention=log_retention, removal_policy=RemovalPolicy.DESTROY
        )

        self.task_definition = ecs.FargateTaskDefinition(
            self,
            "TaskDefinition",
            cpu=cpu,
            memory_limit_mib=memory_limit_mib,
            runtime_platform=ecs.RuntimePlatform(
                cpu_architecture=ecs.CpuArchitecture.X86_64,
                operating_system_family=ecs.OperatingSystemFamily.LINUX,
            ),
        )
        cluster_env = {
            "NODE_NAME": node_name,
            "NODE_NAME_QUERY": node_name,
            "TOPOLOGY_TYPE": "dns",
            "SERVICE_DISCOVERY_ENDPOINT": self.discovery_endpoint,
            "POLLING_INTERVAL": str(int(polling_interval.to_milliseconds())),
            "SHOAL_PORT": str(mesh_port),
            **timeouts.environment(),
            "PORT": str(http_port),
            **(environment or {}),
        }
        for forbidden in ("RELEASE_COOKIE", "NODE_HOST", *timeouts.environment()):
            if forbidden in (environment or {}):
                raise ValueError(f"{forbidden} is managed by ShoalFargateService; do not pass it")
        self.container = self.task_definition.add_container(
            CONTAINER_NAME,
            image=image,
            environment=cluster_env,
            secrets={"RELEASE_COOKIE": ecs.Secret.from_secrets_manager(cookie_secret)},
            port_mappings=[
                ecs.PortMapping(container_port=http_port, name="http"),
                ecs.PortMapping(container_port=mesh_port, name="mesh"),
            ],
            logging=ecs.LogDrivers.aws_logs(stream_prefix=discovery_name, log_group=self.log_group),
            stop_timeout=Duration.seconds(timeouts.stop_timeout_s),
            # A real init as PID 1 reaps the ECS exec agent's children.
            linux_parameters=ecs.LinuxParameters(
                self, "LinuxParameters", init_process_enabled=True
            ),
            health_check=ecs.HealthCheck(
                command=["CMD", "python", "-c", _HEALTH_PROBE],
                interval=Duration.seconds(10),
                timeout=Duration.seconds(5),
                retries=3,
                start_period=Duration.seconds(30),
            ),
        )
        acknowledge(
            self.task_definition,
            "AwsSolutions-ECS2",
            "The environment holds only non-secret cluster settings; the cookie "
            "arrives as an ECS secret from Secrets Manager.",
        )

        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=cluster.vpc,
            description=f"shoal service {discovery_name}: HTTP from its load balancer, "
            "mesh within the service",
            allow_all_outbound=allow_all_outbound,
        )
        if not allow_all_outbound:
            # Image pulls, Secrets Manager, CloudWatch Logs and ECS exec all speak HTTPS.
            self.security_group.add_egress_rule(
                ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "AWS APIs over HTTPS"
            )
        self.connect_mesh_with(self)

        self.service = ecs.FargateService(
            self,
            "Service",
            cluster=cluster,
            task_definition=self.task_definition,
            desired_count=desired_count,
            min_healthy_percent=100,
            max_healthy_percent=200,
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            enable_execute_command=True,
            security_groups=[self.security_group],
            assign_public_ip=False,
            vpc_subnets=vpc_subnets
            or ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            health_check_grace_period=Duration.seconds(30),
        )
        self.service.associate_cloud_map_service(service=self.discovery_service)
        acknowledge(
            self.task_definition,
            "AwsSolutions-IAM5[Resource::*]",
            "IAM offers no resource-level scoping for these actions: ECS exec's "
            "ssmmessages channels (task role) and ecr:GetAuthorizationToken (execution role).",
        )
        self._acknowledge_exec_logging(cluster)

    def _acknowledge_exec_logging(self, cluster: ecs.ICluster) -> None:
        """Accept the task role's `log-group:NAME:*` grant that ECS exec logging adds."""
        config = getattr(cluster, "execute_command_configuration", None)
        log_config = config.log_configuration if config else None
        log_group = log_config.cloud_watch_log_group if log_config else None
        if log_group is None:
            return
        stack = Stack.of(log_group)
        logical_id = stack.resolve(stack.get_logical_id(log_group.node.default_child))
        resource = (
            f"arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:<{logical_id}>:*"
        )
        acknowledge(
            self.task_definition,
            f"AwsSolutions-IAM5[Resource::{resource}]",
            "ECS exec writes one log stream per session; stream names are not known "
            "in advance, so the grant covers the streams of the exec log group only.",
        )

    def connect_mesh_with(self, other: ShoalFargateService) -> None:
        """Open the mesh port between this service's tasks and `other`'s, both ways.

        Called with `self` at construction (a service's own tasks mesh
        together). Call it with another service only when its nodes should
        connect to this one; they must then share `cookie_secret`.
        """
        port = ec2.Port.tcp(self.mesh_port)
        if other is self:
            self.security_group.connections.allow_internally(port, "shoal mesh within the service")
            return
        if other.mesh_port != self.mesh_port:
            raise ValueError("linked shoal services must use the same SHOAL_PORT")
        self.security_group.connections.allow_from(other.security_group, port, "shoal mesh")
        other.security_group.connections.allow_from(self.security_group, port, "shoal mesh")

    def target_group(self, construct_id: str = "TargetGroup") -> elbv2.ApplicationTargetGroup:
        """An ALB target group for the HTTP port that only routes to ready nodes.

        `/ready` answers 503 while a node drains; the deregistration delay
        (from the timeout chain) lets requests in flight finish. Once it is
        attached to a listener, pass it to `deployment_alarms`.
        """
        group = elbv2.ApplicationTargetGroup(
            self,
            construct_id,
            vpc=self.service.cluster.vpc,
            port=self.http_port,
            protocol=elbv2.ApplicationProtocol.HTTP,
            target_type=elbv2.TargetType.IP,
            deregistration_delay=Duration.seconds(self.timeouts.deregistration_delay_s),
            health_check=elbv2.HealthCheck(
                path="/ready",
                healthy_http_codes="200",
                interval=Duration.seconds(10),
                timeout=Duration.seconds(5),
                healthy_threshold_count=2,
                unhealthy_threshold_count=2,
            ),
            targets=[
                self.service.load_balancer_target(
                    container_name=CONTAINER_NAME, container_port=self.http_port
                )
            ],
        )
        return group

    def deployment_alarms(
        self, group: elbv2.ApplicationTargetGroup
    ) -> tuple[cloudwatch.Alarm, cloudwatch.Alarm]:
        """Alarms on `group` (attached to a listener) that roll a deployment back,
        beside the circuit breaker: any 5xx answered by a task (a clean deploy has
        none), or an unhealthy target within a minute."""
        period = Duration.minutes(1)
        errors = cloudwatch.Alarm(
            self,
            f"{group.node.id}Target5xx",
            alarm_description="HTTP 5xx answered by tasks: rolls the deployment back",
            metric=group.metrics.http_code_target(
                elbv2.HttpCodeTarget.TARGET_5XX_COUNT, period=period, statistic="Sum"
            ),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        unhealthy = cloudwatch.Alarm(
            self,
            f"{group.node.id}UnhealthyHosts",
            alarm_description="Targets failing /ready: rolls the deployment back",
            metric=group.metrics.unhealthy_host_count(period=period, statistic="Maximum"),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.service.enable_deployment_alarms(
            [errors.alarm_name, unhealthy.alarm_name],
            behavior=ecs.AlarmBehavior.ROLLBACK_ON_ALARM,
        )
        return errors, unhealthy
