"""The quantized kernel as an opt-in of the kernel dispatcher (kernels.use_quantized_attention): which requests it
takes, that it takes none unless asked, the setting's validation and report, and the kernel as one custom operator
under ``torch.compile(fullgraph=True)``.

Routing is checked on fake CUDA tensors (``FakeTensorMode``: shapes, dtypes and devices without a GPU), where the
custom operators run their fake implementations, so a dispatch mode sees which operator the dispatcher launched.
The operator's numbers are checked in Triton's CPU interpreter (a subprocess: TRITON_INTERPRET=1 must be set before
Triton is imported) against the direct launch, which tests/test_quantized.py holds to the float64 reference.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_attn_ext import kernels
from diffusers_attn_ext.call import BLOCK_SPARSE, DENSE, FUSED_RULE, SCORE_MOD, DecayRule, KernelRequest

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def quantized_off():
    """Every test starts and ends with the opt-in off (the process-wide default)."""
    kernels.use_quantized_attention(False)
    yield
    kernels.use_quantized_attention(False)


def _request(kind, n=256, heads=2, dim=64, dtype=torch.bfloat16, device="cuda", keys=None, block_size=128,
             rule=None, attn_mask=None, parallel_config=None):
    q = torch.randn(1, n, heads, dim, dtype=dtype, device=device)
    k = torch.randn(1, keys or n, heads, dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    nb = -(-n // block_size)
    blocks = torch.ones(1, heads, nb, nb, dtype=torch.bool, device=device) if kind in (BLOCK_SPARSE, "rule+blocks") \
        else None
    if kind in (FUSED_RULE, "rule+blocks"):
        rule = rule or DecayRule(start=0, length=n, far=64, alpha=0.5)
    return KernelRequest(
        kind=FUSED_RULE if kind == "rule+blocks" else kind, query=q, key=k, value=v, scale=None, attn_mask=attn_mask,
        score_mods=(lambda s, b, h, i, j: s,) if kind in (SCORE_MOD, FUSED_RULE, "rule+blocks") else (),
        block_mask=blocks, block_size=block_size, rule=rule, dense_via="dispatch", backend=None,
        parallel_config=parallel_config,
    )


class _Call:
    """What :func:`kernels.attend` reads of an AttentionCall: its request."""

    def __init__(self, request):
        self.request = request

    def kernel_request(self):
        return self.request


class _Ops(TorchDispatchMode):
    """The operators run inside it: their names and arguments."""

    def __init__(self):
        super().__init__()
        self.names, self.args = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        self.args.append(args)
        return func(*args, **(kwargs or {}))


def _launched(build, **kwargs):
    """(choose_kernel's answer, the operators attend ran, the request) for a request built on fake CUDA tensors."""
    with FakeTensorMode():
        request = build(**kwargs)
        chosen = kernels.choose_kernel(request)
        with _Ops() as ops:
            out = kernels.attend(_Call(request))
        assert out.shape == request.query.shape and out.dtype == request.query.dtype
    return chosen, ops, request


QUANTIZED_OP = "diffusers_attn_ext.quantized_attention"
SUPPORTED = {  # request -> the kernel chosen without the opt-in, and the operator it runs (None: aten's SDPA)
    "dense self-attention": (dict(kind=DENSE), DENSE, None),
    "block-sparse": (dict(kind=BLOCK_SPARSE), kernels.BLOCK_SPARSE, "diffusers_attn_ext.block_sparse_attention"),
    "fused rule": (dict(kind=FUSED_RULE), kernels.FUSED, "diffusers_attn_ext.decay_attention"),
    "fused rule + blocks": (dict(kind="rule+blocks"), kernels.FUSED, "diffusers_attn_ext.block_sparse_attention"),
    "partial last block": (dict(kind=BLOCK_SPARSE, n=300, dim=128, dtype=torch.float16), kernels.BLOCK_SPARSE,
                           "diffusers_attn_ext.block_sparse_attention"),
}
UNSUPPORTED = {  # request -> the kernel chosen with and without the opt-in
    "cross-attention": (dict(kind=DENSE, keys=512), DENSE),
    "dense with a mask": (dict(kind=DENSE, attn_mask=torch.zeros(256, 256, dtype=torch.bool)), DENSE),
    "dense, context parallel": (dict(kind=DENSE, parallel_config=object()), DENSE),
    "float32": (dict(kind=BLOCK_SPARSE, dtype=torch.float32), kernels.FLEX),
    "head dim 80": (dict(kind=FUSED_RULE, dim=80), kernels.FLEX),
    "64-token blocks": (dict(kind=BLOCK_SPARSE, block_size=64), kernels.FLEX),
    "rule on part of the sequence": (dict(kind=FUSED_RULE, rule=DecayRule(start=16, length=240, far=64, alpha=0.5)),
                                     kernels.FLEX),
    "score_mod": (dict(kind=SCORE_MOD), kernels.FLEX),
}


@pytest.mark.parametrize("name", SUPPORTED)
def test_quantized_kernel_runs_supported_requests_only_when_asked(name):
    kwargs, default, default_op = SUPPORTED[name]
    ours = [op for op in _launched(_request, **kwargs)[1].names if op.startswith("diffusers_attn_ext.")]
    assert _launched(_request, **kwargs)[0] == default and ours == ([default_op] if default_op else []), ours
    for pv in ("fp8", "bf16"):
        with kernels.use_quantized_attention(pv=pv):
            chosen, ops, request = _launched(_request, **kwargs)
        assert chosen == kernels.QUANTIZED and ops.names.count(QUANTIZED_OP) == 1, (pv, ops.names)
        args = ops.args[ops.names.index(QUANTIZED_OP)]
        query, key, value, blocks, scale, pv_dtype, has_rule, *rule = args
        assert (query, key, value, blocks) == (request.query, request.key, request.value, request.block_mask)
        assert (scale, pv_dtype, has_rule) == (request.query.shape[-1] ** -0.5, pv, request.rule is not None)
        if request.rule is not None:
            assert rule == [getattr(request.rule, f) for f in ("start", "length", "far", "alpha", "horizon_queries",
                                                               "horizon_keys", "blocked")]
    chosen, ops, _ = _launched(_request, **kwargs)  # off again after the context
    assert chosen == default and QUANTIZED_OP not in ops.names


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_requests_keep_their_kernel_when_quantized_is_on(name):
    kwargs, default = UNSUPPORTED[name]
    with FakeTensorMode():
        assert kernels.choose_kernel(_request(**kwargs)) == default
        with kernels.use_quantized_attention():
            assert kernels.choose_kernel(_request(**kwargs)) == default


def test_cpu_requests_never_take_the_quantized_kernel():
    with kernels.use_quantized_attention(pv="bf16"):
        for kind, expected in ((DENSE, DENSE), (BLOCK_SPARSE, kernels.FLEX), (FUSED_RULE, kernels.FLEX)):
            assert kernels.choose_kernel(_request(kind, n=128, dtype=torch.float16, device="cpu")) == expected


def test_setting_works_as_setter_and_as_context_manager():
    assert kernels.quantized_setting() is None
    with kernels.use_quantized_attention(pv="bf16"):
        assert kernels.quantized_setting() == "bf16"
        with kernels.use_quantized_attention(False):
            assert kernels.quantized_setting() is None
        assert kernels.quantized_setting() == "bf16"  # the outer setting back
    assert kernels.quantized_setting() is None
    kernels.use_quantized_attention()  # a setter: on until turned off, 16-bit PV by default
    assert kernels.quantized_setting() == "bf16"
    kernels.use_quantized_attention(False)
    assert kernels.quantized_setting() is None


def test_bad_arguments_raise_and_leave_the_setting_unchanged(monkeypatch):
    kernels.use_quantized_attention(pv="bf16")
    with pytest.raises(ValueError, match="enabled=1 is not allowed: allowed values are True and False"):
        kernels.use_quantized_attention(1)
    with pytest.raises(ValueError, match=r"pv='fp16' is not one of \('fp8', 'bf16'\)"):
        kernels.use_quantized_attention(pv="fp16")
    with pytest.raises(ValueError, match="pv=None is not one of"):
        kernels.use_quantized_attention(False, pv=None)
    # A GPU without FP8 tensor cores: fp8 PV is refused, naming the device and its capability; bf16 PV is taken.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"pv='fp8' needs FP8 tensor cores \(compute capability 8.9 or higher\): "
                                         r"NVIDIA A100-SXM4-80GB has 8.0; use pv='bf16'"):
        kernels.use_quantized_attention(pv="fp8")
    assert kernels.quantized_setting() == "bf16"
    kernels.use_quantized_attention(pv="bf16")
    kernels.use_quantized_attention(False, pv="fp8")  # turning it off needs no FP8
    assert kernels.quantized_setting() is None
    # Off, the report judges the opt-in's default (16-bit PV), which this GPU runs; on by default, it is taken.
    from diffusers_attn_ext.kernels.quantized_choice import quantized_report

    assert quantized_report("available") == "off (opt-in: diffusers_attn_ext.kernels.use_quantized_attention; available)"
    kernels.use_quantized_attention()
    assert kernels.quantized_setting() == "bf16"
    assert quantized_report("available").endswith("(available)")
    kernels.use_quantized_attention(False)


def test_kernel_report_shows_the_setting():
    assert kernels.kernel_report()["quantized"].startswith("off (opt-in: diffusers_attn_ext.kernels."
                                                           "use_quantized_attention")
    with kernels.use_quantized_attention(pv="bf16"):
        report = kernels.kernel_report()["quantized"]
    assert report.startswith("on: INT8 QK + 16-bit PV") and "dense self-attention, block-sparse, fused rule" in report
    if not torch.cuda.is_available():
        assert report.endswith("(needs CUDA: these calls run the kernels above)")


def test_compiled_region_guards_on_the_setting():
    """The dispatcher reads the setting while tracing (before it looks at the device, so on CPU too): one graph per
    setting, none per call."""

    def attention(q, k, v):
        request = KernelRequest(kind=BLOCK_SPARSE, query=q, key=k, value=v, scale=None, attn_mask=None,
                                score_mods=(), block_mask=None, block_size=128, rule=None, dense_via="dispatch",
                                backend=None, parallel_config=None)
        return q * (2.0 if kernels.choose_kernel(request) == kernels.QUANTIZED else 1.0)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(attention, fullgraph=True, backend="eager")
    q = torch.randn(1, 8, 1, 4)
    results = {}
    for setting in (None, "bf16", None, "bf16", "bf16", None):
        kernels.use_quantized_attention(setting is not None, pv=setting or "fp8")
        results.setdefault(setting, []).append(compiled(q, q, q))
    assert all(torch.equal(out, q) for outs in results.values() for out in outs)  # CPU: never the quantized kernel
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


COMPILED_OP = textwrap.dedent(
    """
    import torch
    from diffusers_attn_ext.kernels import quantized_triton as qt, triton_ops
    from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_rule

    g = torch.Generator().manual_seed(0)
    n, heads = 256, 1
    base = [torch.randn(1, n, heads, 64, generator=g) for _ in range(3)]
    blocks = torch.tensor([[[[True, False], [True, True]]]])
    rule = ultravico_rule(ExtrapolationWindow(32, 3, 0, n), 0.7, True)
    # fp8 PV on bf16 inputs, 16-bit PV on float32 ones (the interpreter's 16-bit dot: tests/test_quantized.py)
    q8, k8, v8 = (x.to(torch.bfloat16) for x in base)
    q, k, v = base

    def attention(q8, k8, v8, q, k, v, blocks):
        return (triton_ops.quantized(q8, k8, v8, pv_dtype="fp8"),
                triton_ops.quantized(q8, k8, v8, blocks, 0.1, rule, pv_dtype="fp8"),
                triton_ops.quantized(q, k, v, blocks, pv_dtype="bf16"))

    graphs = []

    def backend(graph, example_inputs):  # the eager backend, keeping the graph
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    compiled = torch.compile(attention, fullgraph=True, backend=backend)
    outs = compiled(q8, k8, v8, q, k, v, blocks)
    again = compiled(q8, k8, v8, q, k, v, blocks)
    expected = (qt.launch_quantized(q8, k8, v8, pv_dtype="fp8"),
                qt.launch_quantized(q8, k8, v8, blocks, 0.1, pv_dtype="fp8", rule=rule),
                qt.launch_quantized(q, k, v, blocks, pv_dtype="bf16"))
    for out, second, ref in zip(outs, again, expected):
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
        assert torch.equal(out, ref) and torch.equal(second, ref)
    assert not torch.equal(expected[0], expected[1])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    calls = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert calls == [torch.ops.diffusers_attn_ext.quantized_attention.default] * 3, calls
    print("ok")
    """
)


def test_quantized_kernel_is_one_custom_op_under_fullgraph_compile(interpreter_env):
    """The launch code (descriptors test ``data_ptr() % 16``) is not traced: a fullgraph compile of code calling the
    quantized kernel makes one graph with no break, and gives the direct launch's results bit for bit."""
    env = interpreter_env
    result = subprocess.run([sys.executable, "-c", COMPILED_OP], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "ok", result.stderr[-3000:]
