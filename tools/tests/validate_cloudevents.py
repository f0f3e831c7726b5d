#!/usr/bin/env python3
"""Validates CloudEvents with an independent implementation, the CloudEvents Python SDK.

Reads a file of JSON lines (the sink's --out file, one structured-mode CloudEvent per line),
parses and validates each line with the SDK and checks it is a CloudEvents 1.0 event. Exits 0
when every line is valid (and, with --expect N, there are exactly N events), 1 otherwise, 2
when the SDK is not installed (`pip install cloudevents`).

Usage: validate_cloudevents.py FILE [--expect N] [--unique]
"""

import argparse
import sys


def load_reader():
    """Returns (api name, function line -> attributes dict) for the installed SDK version."""
    try:
        # cloudevents >= 2.0: the core API.
        from cloudevents.core.formats.json import JSONFormat
        from cloudevents.core.v1.event import CloudEvent

        json_format = JSONFormat()

        def read_core(line):
            return json_format.read(CloudEvent, line).get_attributes()

        return "cloudevents.core (v2 API)", read_core
    except ImportError:
        pass
    # cloudevents 1.x: the http module (validates the required attributes as well).
    from cloudevents.http import from_json

    def read_http(line):
        return dict(from_json(line).get_attributes())

    return "cloudevents.http (v1 API)", read_http


def check_attributes(attributes):
    """What the SDK may leave to the caller: the version and the required attributes' values."""
    if attributes.get("specversion") != "1.0":
        raise ValueError(f"specversion is {attributes.get('specversion')!r}, not '1.0'")
    for name in ("id", "source", "type"):
        value = attributes.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--expect", type=int, help="exact number of events required")
    parser.add_argument(
        "--unique", action="store_true", help="require distinct source + id pairs"
    )
    args = parser.parse_args()

    try:
        api, read = load_reader()
    except ImportError as error:
        print(f"the CloudEvents SDK is not installed ({error}): pip install cloudevents")
        return 2

    failures = 0
    seen = set()
    count = 0
    with open(args.file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            count += 1
            try:
                attributes = read(line)
                check_attributes(attributes)
            except Exception as error:  # the SDK raises several exception types
                failures += 1
                print(f"{args.file}:{number}: invalid CloudEvent: {error}")
                continue
            key = (attributes["source"], attributes["id"])
            if args.unique and key in seen:
                failures += 1
                print(f"{args.file}:{number}: duplicate source + id {key}")
            seen.add(key)

    if args.expect is not None and count != args.expect:
        failures += 1
        print(f"{args.file}: {count} events, expected {args.expect}")
    print(f"{count} events checked with {api}: {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
