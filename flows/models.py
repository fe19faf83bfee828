"""Registry operations from the command line: list versions, promote one, roll the champion back.

    llmpipe models [--json]                          # versions, metrics, aliases, how measured
    llmpipe promote VERSION [--force --reason TEXT]  # gate + serving check, then compare-and-set
    llmpipe rollback                                 # champion back to the one it replaced

`promote` applies the same gate as a run, on the numbers stored on the two versions, and only when
both were measured the same way (steps/scoring.py MEASUREMENT_KEYS; across tokenizers in bits per
byte); then it serves the version like the flow's smoke check and moves `champion` only if it
still points where it did. `--force --reason` skips the gate (not the serving check) and records
the reason on the version. Every move is kept in the registered model's `champion_history` tag.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from steps.errors import UserError
from steps.gate import Decision, Reference, promotion_decision
from steps.params import Params
from steps.promote import HISTORY_TAG, NO_CHAMPION, promote
from steps.registry import CHAMPION, alias_version, measured_from_tags
from steps.scoring import differences
from steps.tracking import check_registry, registry_exists, tracking_uri

GATE_TAGS = ("perplexity", "perplexity_ci_high", "base_perplexity", "forgetting")


def registry(project: Path, params: Params):
    """(client, tracking URI, model name) of a project whose registry has the model, else a
    one-line error."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, name = tracking_uri(project), params.registry.model_name
    if not registry_exists(uri):
        raise UserError(f"no registry at {uri}; `llmpipe run` registers the first version")
    check_registry(uri)
    client = MlflowClient(uri)
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"no registered model {name!r} at {uri}; run `llmpipe run`") from None
        raise
    return client, uri, name


def versions(client, name: str) -> list:
    found = client.search_model_versions(f"name='{name}'")
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


def version_row(mv, aliases: dict[str, str]) -> dict:
    tags = mv.tags
    return {
        "version": str(mv.version),
        "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
        **{k: tags.get(k) for k in (*GATE_TAGS, "bits_per_byte", "data_hash", "base_model")},
        "measured": measured_from_tags(tags),
        "gate": tags.get("gate"),
        "serve_p95_ms": tags.get("serve_p95_ms"),
        "promoted_over": tags.get("promoted_over"),
        "promoted_by": tags.get("promoted_by"),
        "force_reason": tags.get("force_reason"),
        "git_sha": tags.get("git_sha"),
        "mlflow_run_id": tags.get("mlflow_run_id"),
    }


def list_models(project: Path, params: Params, as_json: bool = False) -> str:
    client, uri, name = registry(project, params)
    model = client.get_registered_model(name)  # search results carry no aliases: ask the model
    rows = [version_row(mv, model.aliases) for mv in versions(client, name)]
    history = model.tags.get(HISTORY_TAG, "")
    if as_json:
        return json.dumps({"model": name, "tracking_uri": uri, "versions": rows,
                           "champion_history": history.splitlines()})  # fmt: skip
    lines = [f"{name} at {uri}: {len(rows)} version(s)"]
    for r in rows:
        ppl = "perplexity ?" if r["perplexity"] is None else (
            f"perplexity {float(r['perplexity']):.3f} (upper {float(r['perplexity_ci_high']):.3f})"
            f", base {float(r['base_perplexity']):.3f}, forgetting {float(r['forgetting']):+.1%}"
        )  # fmt: skip
        m = r["measured"]
        how = (
            f"window {m['window']}/stride {m['stride']}, {m.get('precision')} on "
            f"{m.get('device')}, tokenizer {m.get('tokenizer_hash', '?')[:8]}, split "
            f"{m.get('test_split_hash', '?')[:8]}"
            if "window" in m
            else "how measured: not recorded"
        )
        aliases = ", ".join(r["aliases"]) or "-"
        lines.append(f"  v{r['version']:<4} [{aliases}] {ppl}; created {r['created']}")
        data = (r["data_hash"] or "?")[:8]
        served = f", served p95 {float(r['serve_p95_ms']):.0f} ms" if r["serve_p95_ms"] else ""
        git = (r["git_sha"] or "?")[:8]
        lines.append(f"        data {data}, base {r['base_model']}, git {git}; {how}{served}")
        if r["gate"]:
            lines.append(f"        gate: {r['gate']}")
        if r["promoted_over"]:
            forced = f"; forced: {r['force_reason']}" if r["force_reason"] else ""
            lines.append(
                f"        promoted over {r['promoted_over']} by {r['promoted_by']}{forced}"
            )
    if history:
        lines.append("champion history (oldest first):")
        lines += [f"  {line}" for line in history.splitlines()]
    return "\n".join(lines)


def stored_decision(candidate, champion, params: Params) -> Decision:
    """The gate on the numbers stored on two versions; a one-line error when they cannot be
    compared (a number missing, or measured another way)."""
    tags = candidate.tags
    missing = [k for k in (*GATE_TAGS, "bits_per_byte_ci_high") if k not in tags]
    if missing or "window" not in measured_from_tags(tags):
        raise UserError(
            f"version {candidate.version} has no stored metrics or measurement record "
            f"({', '.join(missing) or 'measured_*'} missing): it cannot be gated; re-run it "
            "with `llmpipe run`, or pass --force --reason TEXT"
        )
    reference = None
    if champion is not None:
        ours, theirs = measured_from_tags(tags), measured_from_tags(champion.tags)
        unlike = [d for d in differences(ours, theirs) if not d.startswith("tokenizer_hash")]
        if unlike or "perplexity" not in champion.tags:
            raise UserError(
                f"version {candidate.version} and champion v{champion.version} were measured "
                f"differently ({', '.join(unlike) or 'champion has no stored perplexity'}); "
                "`llmpipe run` re-scores the champion the same way, or pass --force --reason TEXT"
            )
        note = f"stored values of v{candidate.version} and v{champion.version}, measured alike"
        if ours.get("tokenizer_hash") == theirs.get("tokenizer_hash"):
            reference = Reference(
                float(champion.tags["perplexity"]), float(tags["perplexity_ci_high"]), note=note
            )
        elif "bits_per_byte" in champion.tags:
            reference = Reference(
                float(champion.tags["bits_per_byte"]),
                float(tags["bits_per_byte_ci_high"]),
                unit="bits per byte",
                note=note + " (other tokenizers)",
            )
        else:
            raise UserError(
                f"champion v{champion.version} has another tokenizer and no stored bits per byte; "
                "`llmpipe run` re-scores it, or pass --force --reason TEXT"
            )
    return promotion_decision(
        float(tags["perplexity_ci_high"]),
        float(tags["base_perplexity"]),
        reference,
        params.registry.min_improvement,
        float(tags["forgetting"]),
        params.registry.max_forgetting,
    )


def promote_version(
    project: Path, params: Params, version: str, force: bool, reason: str | None
) -> list[str]:
    """Gate (unless forced), serve, then compare-and-set `champion` to `version`; what happened."""
    from steps.serve import record_latency, smoke_serve, within_budget

    if force and not (reason or "").strip():
        raise UserError("--force needs --reason TEXT (it is recorded on the version)")
    client, uri, name = registry(project, params)
    known = {str(mv.version): mv for mv in versions(client, name)}
    if version not in known:
        raise UserError(
            f"{name} has no version {version!r} (versions: {', '.join(known) or 'none'}); "
            "see `llmpipe models`"
        )
    candidate, champion = known[version], alias_version(client, name, CHAMPION)
    if champion is not None and str(champion.version) == version:
        return [f"version {version} is already the champion; nothing to do"]
    said = []
    if force:
        said.append(f"gate skipped (--force): {reason}")
    else:
        decision = stored_decision(candidate, champion, params)
        if not decision.promote:
            raise UserError(
                f"version {version} does not pass the gate: " + "; ".join(decision.reasons)
                + "; pass --force --reason TEXT to promote it anyway"
            )  # fmt: skip
        said.append("gate passed: " + "; ".join(decision.reasons))
    model_uri = f"models:/{name}/{version}"
    print(f"serving {model_uri} to check it answers ({params.serve.smoke_requests} requests) ...")
    report = smoke_serve(model_uri, uri, params.serve.smoke_requests)
    record_latency(uri, model_uri, report)
    fast_enough, verdict = within_budget(report, params.serve.max_p95_ms)
    said.append(verdict)
    if not fast_enough:
        raise UserError(f"version {version} not promoted: {verdict}")
    expected = NO_CHAMPION if champion is None else str(champion.version)
    how = "forced" if force else "cli"
    tags = {"force_reason": reason} if force else {}
    moved = promote(uri, name, version, expected, how=how, tags=tags)
    if not moved["promoted"]:
        raise UserError(moved["reasons"][0])
    return said + moved["reasons"]


def rollback(project: Path, params: Params) -> str:
    """Move `champion` back to the version it replaced (its `promoted_over` tag)."""
    client, uri, name = registry(project, params)
    current = alias_version(client, name, CHAMPION)
    if current is None:
        raise UserError(f"{name} has no champion; nothing to roll back")
    previous = current.tags.get("promoted_over")
    if not previous or previous == NO_CHAMPION:
        raise UserError(
            f"champion v{current.version} replaced no earlier champion; nothing to roll back to "
            "(`llmpipe promote VERSION` chooses one)"
        )
    if previous not in {str(mv.version) for mv in versions(client, name)}:
        raise UserError(f"version {previous}, the champion before v{current.version}, is gone")
    moved = promote(uri, name, previous, str(current.version), how="rollback")
    if not moved["promoted"]:
        raise UserError(moved["reasons"][0])
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    client.set_model_version_tag(name, current.version, "rolled_back_at", at)
    return f"champion rolled back from version {current.version} to version {previous}"
