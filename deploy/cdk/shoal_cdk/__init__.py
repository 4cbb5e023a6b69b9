"""CDK constructs for running shoal clusters on ECS Fargate."""

from shoal_cdk.hi_stack import ExistingVpc, HiStack
from shoal_cdk.service import ShoalFargateService, TimeoutChain

__all__ = ["ExistingVpc", "HiStack", "ShoalFargateService", "TimeoutChain"]
