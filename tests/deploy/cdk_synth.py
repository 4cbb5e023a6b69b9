"""Synthesize the CDK app as `cdk synth` would, for the deployment tests."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.deploy.deploy_helpers import CDK_DIR

# jsii prints a banner on every start when Node.js is past its end of life.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "18,20")
os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")

CERTIFICATE_ARN = (
    "arn:aws:acm:eu-west-1:123456789012:certificate/0f2e8a8c-1111-2222-3333-444455556666"
)
EXISTING_VPC = {
    "vpc_id": "vpc-0a1b2c3d4e5f60718",
    "vpc_azs": "eu-west-1a,eu-west-1b",
    "vpc_public_subnet_ids": "subnet-0aaaaaaaaaaaaaaa1,subnet-0aaaaaaaaaaaaaaa2",
    "vpc_private_subnet_ids": "subnet-0bbbbbbbbbbbbbbb1,subnet-0bbbbbbbbbbbbbbb2",
}


@dataclass
class Synthesis:
    """One synthesized app: the stack, its template (raw and for assertions), the nag report."""

    stack: Any
    template: Any
    raw: dict[str, Any]
    outdir: Path
    nag_violations: list[str]
    app: Any


def load_cdk_app() -> ModuleType:
    """deploy/cdk/app.py as a module, with its `shoal_cdk` package importable."""
    if str(CDK_DIR) not in sys.path:
        sys.path.insert(0, str(CDK_DIR))
    spec = importlib.util.spec_from_file_location("shoal_cdk_app", CDK_DIR / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cdk_json_context() -> dict[str, Any]:
    """The feature flags of cdk.json, which the CDK CLI passes to the app."""
    context: dict[str, Any] = json.loads((CDK_DIR / "cdk.json").read_text())["context"]
    return context


def synthesize(context: dict[str, Any], outdir: Path) -> Synthesis:
    """Build the app as `cdk synth` would with this context; run cdk-nag over it."""
    import aws_cdk as cdk
    from aws_cdk.assertions import Template
    from cdk_nag import AwsSolutionsChecks

    app = cdk.App(outdir=str(outdir), context={**cdk_json_context(), **context})
    stack = load_cdk_app().build(app)
    assembly = app.synth()
    artifact = assembly.get_stack_artifact(stack.artifact_id)
    raw = json.loads((outdir / artifact.template_file).read_text())
    report = AwsSolutionsChecks().validate_scope(app)
    violations = [
        f"{v.rule_name}: {[r.construct_path for r in v.violating_resources]}"
        for v in report.violations
    ]
    return Synthesis(stack, Template.from_json(raw), raw, outdir, violations, app)
