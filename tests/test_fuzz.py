"""Schema-driven fuzzing without a cluster (the HTTP fuzzing of the running app is in
tests/test_reliability.py::test_fuzz_openapi_with_schemathesis; its long run:
`FUZZ_EXAMPLES=5000 pytest tests/test_reliability.py -k fuzz -s`).

Every body our OpenAPI spec allows, once the ingress has accepted it, must turn into sampling
parameters that the engine's sampler can run on any logits: the HTTP fuzzing found two that killed a
replica's whole engine (temperature 5e-324 -> inf logits; top_p 5e-324 -> 0 in float32, no token kept).
"""
import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.ingress import ChatRequest, CompletionRequest, api
from fineserve_core.sampling import SamplingParams, sample

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
VOCAB = 4096                  # the failure modes do not depend on the vocabulary size


@pytest.fixture(scope="module")
def ops():
    import schemathesis
    schema = schemathesis.openapi.from_dict(api.openapi())
    return {(o.method.upper(), o.path): o for o in (r.ok() for r in schema.get_all_operations())}


def logits_strategy():
    """Ordinary, peaked, flat and extreme logits (the model's float32 output)."""
    return st.sampled_from(["randn", "peaked", "flat", "huge", "tiny", "one-hot"]).map(_logits)


@functools.lru_cache(maxsize=None)
def _logits(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(kind))
    x = torch.randn(VOCAB, generator=g)
    return {"randn": x, "peaked": x * 50, "flat": torch.zeros(VOCAB), "huge": x * 1e4,
            "tiny": x * 1e-30, "one-hot": torch.full((VOCAB,), -1e30).index_fill(0, torch.tensor([7]), 0.0)}[kind]


@pytest.mark.parametrize("path,model", [("/v1/completions", CompletionRequest),
                                        ("/v1/chat/completions", ChatRequest)])
def test_every_accepted_body_samples_a_valid_token(ops, path, model):
    strategy = ops[("POST", path)].as_strategy()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy, logits=logits_strategy())
    def run(case, logits):
        try:
            body = model.model_validate(case.body)
        except ValidationError:
            assume(False)                 # the spec is a little looser than the model (e.g. surrogates)
            return
        params = SamplingParams(**body.params(16))
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        token = sample(logits.clone(), params, gen)
        assert 0 <= token < VOCAB
    run()


@pytest.mark.parametrize("temperature,top_p", [(5e-324, 1.0), (1e-300, 0.5), (1e-6, 1.0), (1.0, 5e-324),
                                               (2.0, 1e-300), (5e-324, 5e-324)])
def test_denormal_sampling_parameters_found_by_fuzzing(temperature, top_p):
    body = CompletionRequest(model="m", prompt="x", temperature=temperature, top_p=top_p)
    params = SamplingParams(**body.params(4))
    for kind in ("randn", "peaked", "huge", "one-hot"):
        logits = _logits(kind)
        assert sample(logits.clone(), params, torch.Generator().manual_seed(0)) == int(logits.argmax())
