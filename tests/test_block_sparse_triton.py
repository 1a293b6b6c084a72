"""The block-sparse Triton kernel, run by Triton's CPU interpreter against a float64 reference.

The interpreter needs TRITON_INTERPRET=1 before Triton is imported, so the check runs in a subprocess.
On a GPU, benchmarks/block_sparse_kernel.py checks the compiled kernel the same way.
"""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch, triton
    from diffusers_attn_ext.kernels import block_sparse_triton as bst
    from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_rule, ultravico_score_mod

    def reference(q, k, v, blocks, window=None):
        n = q.shape[1]
        keep = blocks.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :n, :n]
        q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if window is not None:
            idx = torch.arange(n)
            scores = ultravico_score_mod(window, 0.7)(scores, 0, 0, idx[:, None], idx[None, :])
        out = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0) @ v  # empty rows: 0
        return out.transpose(1, 2)

    g = torch.Generator().manual_seed(0)
    # 300 tokens: a partial last block; per-head tables; one query block that keeps nothing; UltraViCo's
    # rule inside the kept blocks (30 tokens per frame, 3 trained frames, 10 frames).
    for n, heads, batch_wide, window in [(300, 2, True, None), (256, 2, False, None),
                                         (300, 2, True, ExtrapolationWindow(30, 3, 0, 300))]:
        q, k, v = (torch.randn(2, n, heads, 64, generator=g) for _ in range(3))
        nb = triton.cdiv(n, 128)
        blocks = torch.rand(1 if batch_wide else 2, heads, nb, nb, generator=g) < 0.5
        blocks[..., -1, -1] = True
        blocks[0, 0, 0] = False
        rule = ultravico_rule(window, 0.7, True) if window else None
        out = bst.launch_block_sparse(q, k, v, blocks, rule=rule)
        ref = reference(q, k, v, blocks, window)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (n, heads, batch_wide, err)
    print("ok")
    """
)


def test_kernel_matches_reference_in_interpreter(interpreter_env):
    env = interpreter_env
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_static_tables_are_compressed_once_and_others_every_call():
    import torch

    from diffusers_attn_ext.kernels.block_sparse_table import compressed_table, mark_static

    blocks = torch.tensor([[[[True, False, True], [False, False, True], [True, True, True]]]])
    counts, indices, order = compressed_table(blocks)
    assert counts.tolist() == [[[2, 1, 3]]]
    assert indices[0, 0, 0, :2].tolist() == [0, 2] and indices[0, 0, 1, :1].tolist() == [2]
    assert order.tolist() == [[[2, 0, 1]]]  # longest row first
    assert compressed_table(blocks)[0] is not counts  # not marked: compressed again at every call
    blocks[0, 0, 1, 0] = True
    assert compressed_table(blocks)[0].tolist() == [[[2, 2, 3]]]
    mark_static(blocks)
    static_counts = compressed_table(blocks)[0]
    assert compressed_table(blocks)[0] is static_counts  # marked: once


def test_kernels_reject_bad_tables_and_shapes():
    import torch

    from diffusers_attn_ext.kernels.block_sparse_triton import launch_block_sparse
    from diffusers_attn_ext.kernels.decay_triton import launch_decay
    from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_rule

    q = torch.randn(2, 300, 4, 64)
    good = torch.ones(1, 4, 3, 3, dtype=torch.bool)
    for bad in (good[:, :2], good[0], good.to(torch.uint8), torch.ones(3, 4, 3, 3, dtype=torch.bool), good[..., :2, :2]):
        with pytest.raises(ValueError, match="block table"):
            launch_block_sparse(q, q, q, bad)
    window = ExtrapolationWindow(30, 3, 0, 300)
    with pytest.raises(ValueError, match="alpha=1.5 is outside the allowed range"):
        launch_block_sparse(q, q, q, good, rule=ultravico_rule(window, 1.5, True))
    with pytest.raises(ValueError, match="one shape"):
        launch_decay(q, q[:, :128], q[:, :128], ultravico_rule(window, 0.9))
    with pytest.raises(ValueError, match="alpha=0 is outside"):
        launch_decay(q, q, q, ultravico_rule(window, 0))


COMPILED_OPS = textwrap.dedent(
    """
    import torch, triton
    from diffusers_attn_ext.kernels import block_sparse_triton as bst, decay_triton as dt, triton_ops
    from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_rule

    g = torch.Generator().manual_seed(0)
    n, heads = 256, 2
    q, k, v = (torch.randn(1, n, heads, 64, generator=g) for _ in range(3))
    blocks = torch.rand(1, heads, 2, 2, generator=g) < 0.6
    blocks[..., 1, 1] = True
    rule = ultravico_rule(ExtrapolationWindow(32, 3, 0, n), 0.7, True)

    def attention(q, k, v, blocks):
        sparse = triton_ops.block_sparse(q, k, v, blocks)
        sparse_rule = triton_ops.block_sparse(q, k, v, blocks, 0.1, rule)
        decayed = triton_ops.decay(q, k, v, rule)
        return sparse, sparse_rule, decayed

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    compiled = torch.compile(attention, fullgraph=True, backend="eager")
    outs = compiled(q, k, v, blocks)
    again = compiled(q, k, v, blocks)
    expected = (bst.launch_block_sparse(q, k, v, blocks), bst.launch_block_sparse(q, k, v, blocks, 0.1, rule=rule),
                dt.launch_decay(q, k, v, rule))
    for out, second, ref in zip(outs, again, expected):
        assert out.shape == ref.shape and out.is_contiguous()
        assert torch.equal(out, ref) and torch.equal(second, ref)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    print("ok")
    """
)


def test_kernels_are_single_custom_ops_under_fullgraph_compile(interpreter_env):
    """The launch code (descriptors test data_ptr() alignment) is not traced: each kernel is one custom op, so a
    fullgraph compile of code calling them makes one graph with no break and the kernels' own results."""
    env = interpreter_env
    result = subprocess.run([sys.executable, "-c", COMPILED_OPS], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "ok", result.stderr[-3000:]
