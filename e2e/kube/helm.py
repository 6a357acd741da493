#!/usr/bin/env python3
"""A `helm` command for machines without the helm binary: the subset of its
CLI that Shoal's docs and tests use, carried out by Helm itself (Helm 4,
through the helm-python-sdk library). Nothing here renders templates.

    helm.py install NAME CHART [-n NS] [--create-namespace] [--set K=V]... [--wait] [--timeout 300s]
    helm.py upgrade NAME CHART [-n NS] [--set K=V]... [--reuse-values] [--wait] [--timeout 300s]
    helm.py uninstall NAME [-n NS] [--wait]
    helm.py status NAME [-n NS]
    helm.py lint CHART

The cluster comes from KUBECONFIG (or --kubeconfig).
"""

import argparse
import json
import sys

import helm_python


def parse_duration(text: str) -> int:
    """Seconds in a Helm duration such as 300s or 5m."""
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def merge(into: dict, new: dict) -> dict:
    """Deep merge, later --set winning, as helm merges them."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def values(sets: list[str]) -> dict:
    """--set K=V expressions, parsed by Helm."""
    merged: dict = {}
    for expression in sets:
        merge(merged, helm_python.parse_set_string(expression))
    return merged


def main() -> int:
    p = argparse.ArgumentParser(prog="helm", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("install", "upgrade"):
        c = sub.add_parser(name)
        c.add_argument("release")
        c.add_argument("chart")
        c.add_argument("-n", "--namespace", default="default")
        c.add_argument("--set", action="append", default=[])
        c.add_argument("--wait", action="store_true")
        c.add_argument("--timeout", default="300s")
        if name == "install":
            c.add_argument("--create-namespace", action="store_true")
        else:
            c.add_argument("--reuse-values", action="store_true")
    c = sub.add_parser("uninstall")
    c.add_argument("release")
    c.add_argument("-n", "--namespace", default="default")
    c.add_argument("--wait", action="store_true")
    c = sub.add_parser("status")
    c.add_argument("release")
    c.add_argument("-n", "--namespace", default="default")
    c = sub.add_parser("lint")
    c.add_argument("chart")
    a = p.parse_args()

    if a.command == "lint":
        report = helm_python.lint(a.chart, strict=True)
        print(json.dumps(report, indent=2))
        return 1 if report.get("errors") else 0
    config = helm_python.Config(kubeconfig_path=a.kubeconfig, namespace=a.namespace)
    try:
        if a.command == "install":
            release = config.install(
                a.chart, a.release, values(a.set), namespace=a.namespace,
                create_namespace=a.create_namespace, wait="watcher" if a.wait else None,
                timeout=parse_duration(a.timeout))
        elif a.command == "upgrade":
            release = config.upgrade(
                a.chart, a.release, values(a.set), namespace=a.namespace,
                reuse_values=a.reuse_values, wait="watcher" if a.wait else None,
                timeout=parse_duration(a.timeout))
        elif a.command == "uninstall":
            release = config.uninstall(a.release, wait="watcher" if a.wait else None)
        else:
            release = config.status(a.release)
    except helm_python.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if a.command == "uninstall":
        print(f"release \"{a.release}\" uninstalled")
    else:
        print(f"NAME: {release['name']}\nNAMESPACE: {release['namespace']}\n"
              f"STATUS: {release['status']}\nREVISION: {release['revision']}")
        if release.get("notes"):
            print(f"NOTES:\n{release['notes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
