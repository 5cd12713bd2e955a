"""Putting a past champion back: `landcover-champion action=restore to=previous` (or a version
number), with a promotion's guards and a line in the champion's history.

A restore is a deliberate step back (the new champion draws worse maps than the one before),
so it does not ask for a better metric; it does ask what a promotion asks: the version exists,
its run finished with a model, and it was measured on the same data as the champion it
replaces (`force=true` overrides), so the history's two values compare like with like.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from landcover import locks
from landcover.registry import history
from landcover.registry.promotion import (
    FINGERPRINT_TAG,
    Promotion,
    PromotionError,
    aliases_of,
    candidate_of_run,
    metric_of,
    move_alias,
    resolve_version,
)


def _target_uri(name: str, to: str, previous_alias: str) -> str:
    """`previous`, an alias, a version number or a models:/ URI -> a models:/ URI."""
    if to.startswith("models:/"):
        return to
    if to == "previous":
        return f"models:/{name}@{previous_alias}"
    if to.isdigit():
        return f"models:/{name}/{to}"
    return f"models:/{name}@{to}"


def restore(
    client: MlflowClient,
    *,
    name: str,
    to: str,
    metric: str,
    alias: str = "champion",
    previous_alias: str = "previous",
    reason: str = "",
    force: bool = False,
) -> Promotion:
    """Move `alias` back to the version `to` names; the version it leaves becomes
    `previous_alias`. Decided and moved under the registry lock, recorded in the history."""
    with locks.store_lock(str(client._registry_uri), "registry"):
        uri = _target_uri(name, str(to), previous_alias)
        target = resolve_version(client, uri)
        if target is None:
            raise PromotionError(f"to={to!r} ({uri}) names no registered version of {name!r}")
        current = resolve_version(client, f"models:/{name}@{alias}")
        candidate = candidate_of_run(client, str(target.run_id), metric)
        current_value = None
        if current is not None and str(current.version) == str(target.version):
            raise PromotionError(f"version {target.version} is already {alias}: nothing to restore")
        if current is not None:
            current_run = client.get_run(str(current.run_id))
            current_value = metric_of(client, current_run, metric)
            fingerprint = current_run.data.tags.get(FINGERPRINT_TAG)
            if fingerprint != candidate.fingerprint and not force:
                message = (
                    f"version {target.version} was evaluated on other data than {alias} version "
                    f"{current.version} (dataset fingerprint {candidate.fingerprint} vs "
                    f"{fingerprint}); force=true restores anyway"
                )
                history.record(
                    client, action="refused", alias=alias, model=name,
                    from_version=str(current.version), to_version=str(target.version),
                    metric=metric, from_value=current_value, to_value=candidate.value,
                    reason=reason, decision=f"restore refused: {message}", moved=False,
                )  # fmt: skip
                raise PromotionError(message)
        left = move_alias(client, name, alias, previous_alias, current, str(target.version))
        decision = f"restored version {target.version} ({uri})" + (" forced" if force else "")
        client.set_model_version_tag(name, target.version, "landcover.promotion", decision)
        history.record(
            client, action="restored", alias=alias, model=name,
            from_version=str(current.version) if current else None,
            to_version=str(target.version), metric=metric, from_value=current_value,
            to_value=candidate.value, reason=reason, decision=decision, moved=True,
        )  # fmt: skip
        result = Promotion(name, str(target.version), candidate, False, True, decision)
        result.previous_version = left
        result.aliases = aliases_of(client, name)
        return result
