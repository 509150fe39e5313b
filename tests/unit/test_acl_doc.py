"""docs/acl.md's rule tables say exactly what the policy templates in docs/acl/ grant."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
RULE_RE = re.compile(
    r"^(key_prefix|key|session_prefix|session|agent_prefix|agent|event)"
    r' "([^"]*)" \{\n\s*policy = "(\w+)"',
    re.M,
)
APP = "${KV_PREFIX}/apps/${APP}/"


def template_rules(role: str) -> list[tuple[str, str, str]]:
    text = (DOCS / "acl" / f"{role}-policy.hcl.tmpl").read_text()
    rules = RULE_RE.findall(text)
    assert rules, f"no rules found in the {role} template"
    return rules


def doc_rows(role: str) -> list[str]:
    """The table rows under 'The rules, rule by rule' that follow the role's heading line."""
    text = (DOCS / "acl.md").read_text()
    section = text.split("## The rules, rule by rule", 1)[1].split("\n## ", 1)[0]
    label = {"watcher": "Watcher (", "operator": "Operator (", "ci": "CI (", "web": "Web ("}[role]
    block = section.split(label, 1)[1]
    rows = []
    for line in block.splitlines()[1:]:
        if line.startswith("| `"):
            rows.append(line)
        elif rows and not line.startswith("|"):
            break
    return rows


def doc_form(kind: str, path: str) -> str:
    """How the doc's tables write a rule's path: ``.../progress/<node>/`` and the like."""
    if path == APP:
        return '"<p>/apps/<app>/"'
    if path.startswith(APP):
        path = ".../" + path[len(APP) :]
    return '"' + path.replace("${NODE}", "<node>") + '"'


@pytest.mark.parametrize("role", ["watcher", "operator", "ci", "web"])
def test_every_template_rule_is_in_the_doc(role: str) -> None:
    rows = doc_rows(role)
    for kind, path, policy in template_rules(role):
        form = doc_form(kind, path)
        # a row lists one or more rules of one kind and names the policy after them
        matching = [r for r in rows if form in r.split("|")[1] and f" {policy}" in r.split("|")[1]]
        assert matching, f"{role}: {kind} {form} {policy} is not in docs/acl.md's table"
        assert any(kind in r.split("|")[1] for r in matching), (role, kind, form)


@pytest.mark.parametrize("role", ["watcher", "operator", "ci", "web"])
def test_the_doc_names_no_rule_the_template_lacks(role: str) -> None:
    granted = {doc_form(kind, path) for kind, path, _ in template_rules(role)}
    for row in doc_rows(role):
        for named in re.findall(r'"[^"]*"', row.split("|")[1]):
            assert named in granted, f"{role}: docs/acl.md names {named}, the template does not"
