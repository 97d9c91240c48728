"""JSON Schema helpers shared by structured output (`runtime.constraint`) and tool calls (`model.tools`):
the layout constrained JSON is written in, OpenAI's strict mode as a schema transform, and the walk over
sub-schemas that both the transform and the error reporting use.

Pure Python: no schema library, no llguidance. The options dict is llguidance's JSON compile options
(`x-guidance` inside a schema), kept here because tool grammars embed it in their Lark text.
"""

from __future__ import annotations

from llamaexport import whole_number

# Keywords whose value is a map of sub-schemas, a list of them, or one.
_CHILD_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_CHILD_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_CHILD_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")


def json_layout(max_whitespace: int = 0) -> dict:
    """llguidance JSON options for how constrained JSON is spelled.

    0 (the default): one line, separators ", " and ": ", as `json.dumps` writes it, and nothing else. A
    compiler default of free whitespace lets a weak model (or random logits) spend its whole budget on
    blanks between tokens, so whitespace is never free. k > 0 allows runs of at most k blanks/newlines
    around each token (pretty-printed output within that bound).
    """
    k = whole_number(max_whitespace, "max_whitespace", at_least=0)
    if k == 0:
        return {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
    return {"whitespace_flexible": True, "whitespace_pattern": f"[\\x20\\x0A\\x0D\\x09]{{0,{k}}}"}


def subschemas(node, path: str = "") -> list[tuple[str, dict]]:
    """The direct sub-schemas of schema `node` as (JSON pointer, schema) pairs, e.g. ("/properties/n", {...})."""
    if not isinstance(node, dict):
        return []
    kids = [(f"{path}/{k}/{_escape(n)}", v) for k in _CHILD_MAPS if isinstance(node.get(k), dict)
            for n, v in node[k].items()]
    kids += [(f"{path}/{k}/{i}", v) for k in _CHILD_LISTS if isinstance(node.get(k), list) for i, v in enumerate(node[k])]
    kids += [(f"{path}/{k}", node[k]) for k in _CHILD_ONE if isinstance(node.get(k), dict)]
    return [(p, v) for p, v in kids if isinstance(v, dict)]


def strict_schema(schema: dict) -> dict:
    """A copy of `schema` where every object schema that does not say otherwise refuses undeclared keys
    (`additionalProperties: false`), as OpenAI's strict mode means it. OpenAI refuses a strict schema
    without that keyword; this applies it instead, so a client's strict schema and its non-strict twin
    generate the same keys. Objects with `additionalProperties` or `patternProperties` keep them."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _CHILD_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {n: strict_schema(v) for n, v in out[key].items()}
    for key in _CHILD_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(v) for v in out[key]]
    for key in _CHILD_ONE:
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"])
    if (is_object or "properties" in out) and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _escape(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")  # RFC 6901
