"""`ShoalFargateService`: make an ECS Fargate service a shoal cluster.

Drop it into any CDK app. It wires what the shoal contract (DESIGN.md) needs
and what the seed got wrong: one Cloud Map discovery service per ECS service
(so its DNS name returns only its own tasks), the cookie as an ECS secret
from Secrets Manager, the mesh port open only inside the service, a stop
timeout longer than the node's drain, and health checks on `/ready`.
"""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration, RemovalPolicy, Stack
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
# The node's graceful handover (SHOAL_DRAIN_TIMEOUT_MS); ECS waits STOP_TIMEOUT
# after SIGTERM before SIGKILL, so the latter must be longer.
DRAIN_TIMEOUT = Duration.seconds(10)
STOP_TIMEOUT = Duration.seconds(30)
# Long enough for in-flight requests, short enough for quick rolling deploys.
DEREGISTRATION_DELAY = Duration.seconds(15)

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
        drain_timeout: Duration = DRAIN_TIMEOUT,
        stop_timeout: Duration = STOP_TIMEOUT,
        log_retention: logs.RetentionDays = logs.RetentionDays.ONE_MONTH,
        allow_all_outbound: bool = False,
        vpc_subnets: ec2.SubnetSelection | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        if stop_timeout.to_seconds() <= drain_timeout.to_seconds():
            # ECS sends SIGKILL after stop_timeout; the handover must finish first.
            raise ValueError(
                f"stop_timeout ({stop_timeout.to_seconds()} s) must exceed "
                f"drain_timeout ({drain_timeout.to_seconds()} s)"
            )
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
            "SHOAL_DRAIN_TIMEOUT_MS": str(int(drain_timeout.to_milliseconds())),
            "PORT": str(http_port),
            **(environment or {}),
        }
        for forbidden in ("RELEASE_COOKIE", "NODE_HOST"):
            if forbidden in cluster_env:
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
            stop_timeout=stop_timeout,
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

    def target_group(
        self,
        construct_id: str = "TargetGroup",
        *,
        deregistration_delay: Duration = DEREGISTRATION_DELAY,
    ) -> elbv2.ApplicationTargetGroup:
        """An ALB target group for the HTTP port that only routes to ready nodes.

        `/ready` answers 503 while a node drains, so the load balancer stops
        sending to it before it exits; the short deregistration delay keeps
        rolling deploys fast.
        """
        return elbv2.ApplicationTargetGroup(
            self,
            construct_id,
            vpc=self.service.cluster.vpc,
            port=self.http_port,
            protocol=elbv2.ApplicationProtocol.HTTP,
            target_type=elbv2.TargetType.IP,
            deregistration_delay=deregistration_delay,
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
