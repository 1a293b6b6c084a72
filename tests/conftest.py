"""Shared fixtures: tiny pipelines are built once per family and session (building is the slow part)."""

import os
from pathlib import Path

import pytest
import torch

from diffusers_attn_ext import uninstall
from diffusers_attn_ext.testing import FAMILIES, tiny_call_kwargs, tiny_pipeline


@pytest.fixture
def interpreter_env():
    """The environment of a subprocess that runs Triton's CPU interpreter on this checkout: TRITON_INTERPRET=1 (it
    must be set before Triton is imported) and the checkout first on PYTHONPATH, the caller's path kept after it
    (where diffusers may come from)."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}


@pytest.fixture(scope="session")
def tiny_pipes():
    """family -> tiny pipeline, built lazily."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_pipeline(family)[0]
        return cache[family]

    return get


@pytest.fixture(scope="session")
def stock_outputs(tiny_pipes):
    """family -> output of the stock pipeline with the default tiny call arguments."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = run(tiny_pipes(family), family)
        return cache[family]

    return get


@pytest.fixture
def pipe_for(tiny_pipes):
    """A tiny pipeline that is restored to stock processors after the test."""
    used = []

    def get(family):
        pipe = tiny_pipes(family)
        used.append(pipe)
        return pipe

    yield get
    for pipe in used:
        uninstall(pipe)


def run(pipe, family, **overrides):
    """Output tensor of one pipeline call with fresh, seeded call arguments."""
    output = pipe(**tiny_call_kwargs(family, **overrides))[0]
    return torch.as_tensor(output)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
