#!/usr/bin/env python3
"""Write fuzz/corpus/upcasters/: one input per event type and version, an
instance of its JSON Schema (events/schema), as `Type\\nversion\\n{json}`.
Run from the repository root after the schemas change."""
import json, pathlib

root = pathlib.Path(__file__).resolve().parents[2]
out = root / "fuzz/corpus/upcasters"
out.mkdir(parents=True, exist_ok=True)

def instance(s, defs):
    if "$ref" in s:
        return instance(defs[s["$ref"].split("/")[-1]], defs)
    for key in ("oneOf", "anyOf"):
        if key in s:
            return instance(s[key][0], defs)
    if "enum" in s:
        return s["enum"][0]
    if "const" in s:
        return s["const"]
    t = s.get("type")
    if isinstance(t, list):
        t = [x for x in t if x != "null"][0]
    fmt = s.get("format")
    if t == "object":
        props = s.get("properties", {})
        return {k: instance(v, defs) for k, v in props.items()}
    if t == "array":
        return [instance(s.get("items", {}), defs)]
    if t == "string":
        if fmt == "uuid":
            return "0190f0e4-7c1a-7000-8000-00000000000a"
        if fmt == "date-time":
            return "2026-11-01T12:00:00Z"
        return "x"
    if t == "integer":
        return 1
    if t == "number":
        return 1.5
    if t == "boolean":
        return True
    return None

for f in sorted((root / "events/schema").glob("*.v*.schema.json")):
    s = json.loads(f.read_text())
    name, version = s["x-event-type"], s["x-schema-version"]
    body = json.dumps(instance(s, s.get("$defs", {})), separators=(",", ":"))
    (out / f"{name}.v{version}").write_text(f"{name}\n{version}\n{body}")
