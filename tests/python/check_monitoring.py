"""Checks deploy/monitoring: the alert rules parse, every rule is an alert with expr, for,
labels.severity (warning or critical) and annotations.summary; the Grafana dashboard parses and
every panel has at least one target with an expr. Prints the problems, then one line
`metrics: <JSON list>` of the sigil_* series the rules and the dashboard use (which
tests/tests/monitoring.rs looks for on a running server and agent), then `N problems`."""

import json
import re
import sys
from pathlib import Path

import yaml

directory = Path(sys.argv[1])
problems = []
used = set()
# Series Prometheus itself makes, which no Sigil process exports.
PROMETHEUS_SERIES = {"up"}
SIGIL_SERIES = re.compile(r"\bsigil_[a-z0-9_]+\b")


def expect(condition, message):
    if not condition:
        problems.append(message)


def series_of(expr, where):
    names = set(SIGIL_SERIES.findall(expr))
    expect(names or any(re.search(rf"\b{n}\b", expr) for n in PROMETHEUS_SERIES), f"{where}: uses no Sigil series: {expr}")
    used.update(names)


rules = yaml.safe_load((directory / "sigil-alerts.yaml").read_text())
alerts = set()
for group in rules.get("groups", []):
    expect(group.get("name"), f"a rule group without a name: {group}")
    for rule in group.get("rules", []):
        name = rule.get("alert")
        expect(name, f"group {group.get('name')}: a rule that is not an alert: {rule}")
        expect(name not in alerts, f"alert {name} twice")
        alerts.add(name)
        expect(isinstance(rule.get("expr"), str) and rule["expr"].strip(), f"alert {name}: no expr")
        expect(re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"alert {name}: no `for` duration")
        expect(rule.get("labels", {}).get("severity") in ("warning", "critical"), f"alert {name}: labels.severity is not warning or critical")
        expect(rule.get("annotations", {}).get("summary"), f"alert {name}: no annotations.summary")
        expect(set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, f"alert {name}: unknown keys {set(rule)}")
        if isinstance(rule.get("expr"), str):
            series_of(rule["expr"], f"alert {name}")
expect(len(alerts) > 0, "no alerts")

dashboard = json.loads((directory / "sigil-dashboard.json").read_text())
panels = dashboard.get("panels", [])
expect(panels, "the dashboard has no panels")
for panel in panels:
    title = panel.get("title")
    expect(title, f"a panel without a title: {panel.get('id')}")
    targets = [t for t in panel.get("targets", []) if isinstance(t.get("expr"), str) and t["expr"].strip()]
    expect(targets, f"panel {title}: no target with an expr")
    for target in targets:
        series_of(target["expr"], f"panel {title}")

# docs/operations.md says what each alert means.
operations = (directory / "../../docs/operations.md").read_text()
for name in sorted(alerts):
    expect(name in operations, f"alert {name} is not explained in docs/operations.md")

for problem in problems:
    print(problem)
print("metrics: " + json.dumps(sorted(used)))
print(f"{len(problems)} problems")
sys.exit(1 if problems else 0)
