"""Acknowledging cdk-nag findings in code, each with its reason."""

from __future__ import annotations

from aws_cdk import Acknowledgment, Validations
from constructs import IConstruct


def acknowledge(construct: IConstruct, rule: str, reason: str) -> None:
    """Record that `rule` (e.g. `AwsSolutions-ELB2`) was weighed and accepted here."""
    Validations.of(construct).acknowledge(Acknowledgment(id=rule, reason=reason))
