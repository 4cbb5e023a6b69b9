"""Session fixtures: synthesize the CDK app once per configuration.

Synthesis runs aws-cdk-lib's JavaScript through jsii (Node.js), which is
slow to start, so every test of one configuration shares one synthesis.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.cdk_synth import CERTIFICATE_ARN, EXISTING_VPC, Synthesis, synthesize
from tests.support.fixtures import procs  # noqa: F401


@pytest.fixture(scope="session")
def default_synth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synthesis]:
    """`cdk synth` with no context: new VPC, HTTP only, stack `ShoalHi`."""
    yield synthesize({}, tmp_path_factory.mktemp("cdk-default"))


@pytest.fixture(scope="session")
def variant_synth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synthesis]:
    """A second stack name, HTTPS with a certificate, an existing VPC given by ids."""
    context = {"stack_name": "ShoalHiStaging", "certificate_arn": CERTIFICATE_ARN, **EXISTING_VPC}
    yield synthesize(context, tmp_path_factory.mktemp("cdk-variant"))
