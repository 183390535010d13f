"""Schemathesis hooks for the gq-serve runs (tests/openapi_fuzz/runner.py).

positive_data_acceptance is configured (schemathesis.toml) to let a schema-valid request be
answered 400, because one limit cannot be written in a schema: prompt tokens + max_tokens must fit
the model's context. This check takes that freedom back for everything else: a 400 to
schema-valid data must say context_length_exceeded.
"""
import schemathesis


@schemathesis.check
def positive_400_is_only_context_length(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        code = response.json()["error"]["code"]
    except Exception:  # noqa: BLE001 -- any other body is a failure below
        code = None
    if code != "context_length_exceeded":
        raise AssertionError(f"schema-valid request answered 400 with code {code!r}: {response.text[:300]}")
    return None
