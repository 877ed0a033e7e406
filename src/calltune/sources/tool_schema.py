"""JSON-Schema checks of tool-call arguments, shared by cleaning, augmentation and evaluation.

Owns `SchemaValidators` (one validator per distinct tool schema, ``$ref`` resolved only inside the
schema), `first_error` (the most relevant error of an instance, with its path) and
`defaults_not_required` (a parameter with a ``default`` becomes optional, as xLAM intends).
Validation uses the `jsonschema` library, with the validator the schema's ``$schema`` names
(Draft 2020-12 when it names none).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import referencing
from jsonschema.exceptions import SchemaError as JSONSchemaError
from jsonschema.exceptions import best_match
from referencing.exceptions import Unresolvable


class SchemaValidators:
    """JSON-Schema validators of tool parameter schemas, built once per distinct schema.

    A schema comes from a dataset or a request, so it is untrusted: its ``$ref`` resolve only inside
    the schema itself (a `referencing.Registry` with no retriever). jsonschema would otherwise fetch
    an ``http(s)://`` reference; here an external one is unresolvable, see `first_error`.
    """

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, schema: dict[str, Any]) -> Any:
        """A validator for `schema`, or the `jsonschema.SchemaError` saying why it is not a valid schema."""
        key = json.dumps(schema, sort_keys=True, default=str)
        if key not in self._cache:
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            try:
                cls.check_schema(schema)
                self._cache[key] = cls(schema, registry=referencing.Registry())
            except JSONSchemaError as err:
                self._cache[key] = err
        return self._cache[key]


def first_error(validator: Any, instance: Any) -> tuple[str, str] | None:
    """``(message, "arguments.path")`` of the most relevant JSON-Schema error of `instance`, or None.

    A ``$ref`` that points outside the schema (a URL or a file) is reported as an error of its own
    (``external $ref ... is not resolved``): nothing is fetched or opened.
    """
    try:
        error = best_match(validator.iter_errors(instance))
    except Unresolvable as err:
        return f"external $ref {getattr(err, 'ref', str(err))!r} is not resolved (only references inside the " \
               "schema are)", "arguments"
    return None if error is None else (error.message, _where_in(error))


def _where_in(error: jsonschema.ValidationError) -> str:
    return "arguments" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def defaults_not_required(schema: Any) -> Any:
    """`schema` with every property that has a ``default`` removed from ``required``, at every depth."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    properties = schema.get("properties")
    if isinstance(properties, dict):
        out["properties"] = {k: defaults_not_required(v) for k, v in properties.items()}
        if isinstance(schema.get("required"), list):
            out["required"] = [r for r in schema["required"]
                               if not (isinstance(properties.get(r), dict) and "default" in properties[r])]
    if isinstance(schema.get("items"), dict):
        out["items"] = defaults_not_required(schema["items"])
    return out
