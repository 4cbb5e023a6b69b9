#!/usr/bin/env python3
"""CDK entry point for the `hi` reference deployment.

Synthesizes offline: no AWS credentials and no context lookups unless
`vpc_id` is given without its subnets. Context keys (`-c key=value`):

- `stack_name`: default `ShoalHi`; a second name gives an independent copy.
- `certificate_arn`: serve HTTPS with this ACM certificate, redirect HTTP.
- `egress`: `nat` (default, one NAT gateway per AZ) or `endpoints` (no NAT;
  VPC endpoints for ECR, S3, CloudWatch Logs, Secrets Manager, SSM messages).
- `longest_request_s`: the longest request the app serves (default 60); every
  deploy timeout derives from it (see `TimeoutChain`).
- `vpc_id` with `vpc_azs`, `vpc_public_subnet_ids`, `vpc_private_subnet_ids`
  (comma-separated): use that VPC as given, offline. `vpc_id` alone: look it
  up (needs credentials; the answer is cached in cdk.context.json).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shoal_cdk import ExistingVpc, HiStack, TimeoutChain


def _list(app: cdk.App, key: str) -> list[str]:
    value = app.node.try_get_context(key) or ""
    items = value if isinstance(value, list) else str(value).split(",")
    return [item.strip() for item in items if item.strip()]


def build(app: cdk.App) -> HiStack:
    """Create the stack that the context describes."""
    ctx = app.node.try_get_context
    stack_name = ctx("stack_name") or "ShoalHi"
    vpc_id = ctx("vpc_id")
    existing = None
    env = None
    if vpc_id and _list(app, "vpc_private_subnet_ids"):
        existing = ExistingVpc(
            vpc_id=vpc_id,
            availability_zones=_list(app, "vpc_azs"),
            public_subnet_ids=_list(app, "vpc_public_subnet_ids"),
            private_subnet_ids=_list(app, "vpc_private_subnet_ids"),
        )
    elif vpc_id:
        # Vpc.from_lookup needs a concrete account and region.
        env = cdk.Environment(
            account=os.environ.get("CDK_DEFAULT_ACCOUNT"),
            region=os.environ.get("CDK_DEFAULT_REGION"),
        )
    return HiStack(
        app,
        stack_name,
        existing_vpc=existing,
        vpc_id_to_look_up=vpc_id if existing is None else None,
        certificate_arn=ctx("certificate_arn") or None,
        egress=str(ctx("egress") or "nat"),
        timeouts=TimeoutChain(longest_request_s=int(ctx("longest_request_s") or 60)),
        env=env,
        description="shoal reference app hi: vegeta and krillin on ECS Fargate",
    )


def main() -> None:
    app = cdk.App()
    build(app)
    # Synthesis fails on any AwsSolutions finding that is not acknowledged in code.
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    app.synth()


if __name__ == "__main__":
    main()
