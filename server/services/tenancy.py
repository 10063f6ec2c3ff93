"""Tenants: who is calling, and which forget targets apply to them.

    API key ──(keys file: `KEY TENANT`)──> Caller(key digest, tenant)
    target options["tenant_scope"] = {"api_keys": [sha256 hex], "tenants": [names]}
        absent (or both lists empty): the target applies to all traffic
        else: to callers whose key digest is listed or whose tenant is listed

Keys are never stored: a registration's `scope.api_keys` are hashed before they reach the
registry, and callers carry only their key's digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SCOPE_OPTION = "tenant_scope"


def key_digest(key: str) -> str:
    """The sha256 hex of an API key (what scopes and callers carry)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """The identity of a /v1 request: its API key's digest and its tenant (both optional)."""

    key_digest: str | None = None
    tenant: str | None = None
    end_user: str | None = None
    """The request's own `user` / `safety_identifier` (for the audit log only)."""

    @property
    def label(self) -> str:
        """What the audit log and metrics show: the tenant, else `-` (open /v1 or no tenant)."""
        return self.tenant or "-"


@dataclass(frozen=True)
class TenantScope:
    """Which callers a target applies to; empty lists on both sides mean everyone."""

    api_keys: frozenset[str] = frozenset()
    """sha256 hex digests of API keys."""
    tenants: frozenset[str] = frozenset()

    @property
    def everyone(self) -> bool:
        return not self.api_keys and not self.tenants

    def applies_to(self, caller: Caller | None) -> bool:
        if self.everyone:
            return True
        if caller is None:
            return False
        if caller.key_digest is not None and caller.key_digest in self.api_keys:
            return True
        return caller.tenant is not None and caller.tenant in self.tenants

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TenantScope:
        """The scope stored in a target's options (absent: everyone)."""
        raw = options.get(SCOPE_OPTION) or {}
        return cls(frozenset(raw.get("api_keys") or ()), frozenset(raw.get("tenants") or ()))

    @classmethod
    def from_request(cls, api_keys: Iterable[str] = (), tenants: Iterable[str] = ()) -> TenantScope:
        """A registration's scope: the keys as given (hashed here), the tenants by name."""
        return cls(frozenset(key_digest(k) for k in api_keys), frozenset(tenants))

    def to_option(self) -> dict[str, list[str]]:
        return {"api_keys": sorted(self.api_keys), "tenants": sorted(self.tenants)}
