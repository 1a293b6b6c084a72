"""Methods under diffusers' context parallelism: index mapping (hand-computed), the ring path's shifted masks
against full-sequence attention in one process, and a real 2-process gloo run of a tiny Wan transformer
(Ulysses and ring) against the single-process output.

diffusers 0.42.1's CP runs on CPU/gloo for Ulysses (``all_to_all_single`` works on gloo). Its ring attention
needs a backend that returns the log-sum-exp, which no CPU backend does: the worker gives diffusers' native op
one (explicit scores, :func:`_native_op_with_lse`) so that diffusers' own ring loop and LSE merge run for the
dense calls. Our methods' ring path all-gathers K/V and runs our kernel, as it does on GPUs. Two more
test-only shims: ``torch.accelerator.device_count`` returns 1 (diffusers computes ``rank % device_count()``)
and the mesh is built on "cpu".
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import socket
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.attention.flex_attention import flex_attention

from diffusers_attn_ext import install
from diffusers_attn_ext.call import FUSED_RULE, AttentionCall
from diffusers_attn_ext.context import get_context
from diffusers_attn_ext.kernels.flex import flex_block_mask
from diffusers_attn_ext.masks import ExtrapolationWindow, radial_block_mask, ultravico_rule, ultravico_score_mod
from diffusers_attn_ext.parallel import (
    ParallelLayout,
    global_index_score_mod,
    offset_block_mask,
    sequence_range,
    ulysses_head_owner,
    ulysses_head_range,
)
from diffusers_attn_ext.processors.adaptive_sparse import AdaptiveSparseProcessor
from diffusers_attn_ext.processors.radial_sparse import RadialSparseProcessor
from diffusers_attn_ext.processors.softpag import SoftPAGProcessor
from diffusers_attn_ext.processors.std_rope import STDRoPEProcessor
from diffusers_attn_ext.processors.ultravico import UltraViCoProcessor
from diffusers_attn_ext.testing import tiny_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----- index mapping, by hand -----

def test_ulysses_heads_split_contiguously():
    # 12 heads, 2 ranks: 0-5 | 6-11; 40 heads (Wan-14B), 4 ranks: 10 each.
    assert ulysses_head_range(12, 2, 0) == range(0, 6)
    assert ulysses_head_range(12, 2, 1) == range(6, 12)
    assert ulysses_head_range(40, 4, 3) == range(30, 40)
    assert ulysses_head_owner(0, 12, 2) == (0, 0)
    assert ulysses_head_owner(5, 12, 2) == (0, 5)
    assert ulysses_head_owner(6, 12, 2) == (1, 0)
    assert ulysses_head_owner(11, 12, 2) == (1, 5)
    assert ulysses_head_owner(27, 40, 4) == (2, 7)


def test_ulysses_anything_pads_heads_on_the_last_rank():
    # 30 heads over 8 ranks: padded to 32, 4 per rank; rank 7 holds 28, 29 (diffusers' example).
    assert ulysses_head_range(30, 8, 0, anything=True) == range(0, 4)
    assert ulysses_head_range(30, 8, 7, anything=True) == range(28, 30)
    assert ulysses_head_owner(29, 30, 8, anything=True) == (7, 1)
    with pytest.raises(ValueError, match="num_heads=30 is not a multiple of ulysses_degree=8"):
        ulysses_head_range(30, 8, 0)
    with pytest.raises(ValueError, match="the pad 2 must be smaller than the padded heads per rank 2"):  # 30 over 16
        ulysses_head_range(30, 16, 0, anything=True)
    with pytest.raises(ValueError, match="head=12 is outside the allowed range: an integer in 0..11"):
        ulysses_head_owner(12, 12, 2)
    with pytest.raises(ValueError, match="rank=2 is outside the allowed range: an integer in 0..1"):
        ulysses_head_range(12, 2, 2)


def test_sequence_ranges_even_and_uneven():
    # Wan2.1 480p, 81 frames: 21 x 30 x 52 = 32760 tokens; 2 ranks: 16380 each.
    assert sequence_range(32760, 2, 0) == range(0, 16380)
    assert sequence_range(32760, 2, 1) == range(16380, 32760)
    assert sequence_range(12, 4, 2) == range(6, 9)
    # tensor_split (the *_anything modes): 10 tokens in 4 parts -> 3, 3, 2, 2.
    assert [sequence_range(10, 4, i, anything=True) for i in range(4)] == [
        range(0, 3), range(3, 6), range(6, 8), range(8, 10)
    ]
    assert [len(part) for part in torch.arange(10).tensor_split(4)] == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="num_tokens=10 is not a multiple of the 4 context-parallel ranks"):
        sequence_range(10, 4, 0)
    with pytest.raises(ValueError, match="num_tokens=3 is outside the allowed range: at least parts=4"):
        sequence_range(3, 4, 0, anything=True)


def _fake_config(ring=1, ulysses=1, ring_rank=0, ulysses_rank=0, anything=False):
    """The attributes of a set-up ContextParallelConfig that ParallelLayout reads (no process group)."""
    cp = SimpleNamespace(
        ring_degree=ring, ulysses_degree=ulysses, _ring_local_rank=ring_rank, _ulysses_local_rank=ulysses_rank,
        ulysses_anything=anything, ring_anything=False, _mesh=object(),
    )
    return SimpleNamespace(context_parallel_config=cp)


def test_layout_from_config():
    assert ParallelLayout.from_config(None) is None
    assert ParallelLayout.from_config(SimpleNamespace(context_parallel_config=None)) is None
    ring = ParallelLayout.from_config(_fake_config(ring=2, ring_rank=1))
    assert (ring.rank, ring.world_size, ring.ring_rank, ring.ulysses_rank) == (1, 2, 1, 0)
    assert ring.token_range(32760) == ring.segment_range(32760) == range(16380, 32760)
    assert ring.head_range(12) == range(0, 12)
    ulysses = ParallelLayout.from_config(_fake_config(ulysses=2, ulysses_rank=1))
    assert ulysses.token_range(32760) == range(16380, 32760)
    assert ulysses.segment_range(32760) == range(0, 32760)  # after the all-to-all: every token
    assert ulysses.head_range(12) == range(6, 12)
    # ring 2 x ulysses 2: flattened rank = ring_rank * 2 + ulysses_rank; Ulysses gathers the ring segment.
    both = ParallelLayout.from_config(_fake_config(ring=2, ulysses=2, ring_rank=1, ulysses_rank=0))
    assert both.rank == 2
    assert both.token_range(16) == range(8, 12)
    assert both.segment_range(16) == range(8, 16)
    assert both.head_range(12) == range(0, 6)


def test_grid_methods_check_the_rank_share_and_refuse_others():
    grid_call = AttentionCall(
        module=torch.nn.Identity(), family="wan", kind="self", query=torch.zeros(1, 64, 2, 4), key=None,
        value=None, text=None, visual=slice(0, 64),
        context=SimpleNamespace(grid=SimpleNamespace(num_tokens=128, frames=8, height=4, width=4)),
        parallel_config=_fake_config(ring=2, ring_rank=1),
    )
    assert grid_call.require_grid(UltraViCoProcessor).num_tokens == 128
    with pytest.raises(ValueError, match="STDRoPEProcessor does not support diffusers' context parallelism"):
        grid_call.require_grid(STDRoPEProcessor)
    grid_call.visual = slice(0, 60)
    with pytest.raises(ValueError, match="holds 60 visual tokens, but its share of the grid 8x4x4 is 64"):
        grid_call.require_grid(RadialSparseProcessor)


# ----- the ring path in one process: local queries at global indices vs the full sequence -----

@pytest.mark.parametrize("query_offset", [48, 64, 100])
def test_offset_block_mask_and_score_mod_match_full_sequence_rows(query_offset):
    torch.manual_seed(0)
    n, heads, dim, block = 128, 3, 8, 12
    q, k, v = (torch.randn(1, heads, n, dim, dtype=torch.float64) for _ in range(3))
    blocks = radial_block_mask(8, 16, block, 1.0)[None, None]
    window = ExtrapolationWindow(frame_tokens=16, train_frames=4, video_start=0, video_tokens=n)
    mod = ultravico_score_mod(window, 0.5, True)
    full = flex_attention(q, k, v, score_mod=mod, block_mask=flex_block_mask(blocks, block, n, n))
    local_len = min(28, n - query_offset)
    rows = slice(query_offset, query_offset + local_len)
    local = flex_attention(
        q[:, :, rows], k, v, score_mod=global_index_score_mod(mod, 0, query_offset),
        block_mask=offset_block_mask(blocks, block, query_offset, local_len, n),
    )
    torch.testing.assert_close(local, full[:, :, rows], rtol=1e-12, atol=1e-12)


def test_head_offset_reaches_head_dependent_mods_only():
    def by_head(score, b, h, q_idx, kv_idx):
        return score + h

    shifted = global_index_score_mod(by_head, 6, 0)
    assert shifted(torch.tensor(0.0), 0, torch.tensor(1), 0, 0) == 7
    assert global_index_score_mod(by_head, 6, 0) is shifted  # one closure per layout (compiled Flex guards on it)
    assert global_index_score_mod(by_head, 0, 0) is by_head
    window = ExtrapolationWindow(frame_tokens=16, train_frames=4, video_start=0, video_tokens=128)
    call = AttentionCall(module=torch.nn.Identity(), family="wan", kind="self", query=torch.zeros(1, 128, 2, 4),
                         key=torch.zeros(1, 128, 2, 4), value=torch.zeros(1, 128, 2, 4), text=None,
                         visual=slice(0, 128), context=None)
    call.add_score_mod(ultravico_score_mod(window, 0.5, True), rule=ultravico_rule(window, 0.5, True))
    ulysses = dataclasses.replace(call, score_mods=[global_index_score_mod(m, 6, 0) for m in call.score_mods])
    assert ulysses.kernel_request().kind == FUSED_RULE  # head-independent: the fused kernel stays eligible


# ----- a real 2-process run: diffusers' enable_parallelism on gloo vs one process -----

FRAMES, SIDE, BATCH = 8, 8, 2  # latents: 8 frames of 8x8 -> 8 x 4 x 4 = 128 tokens, 64 per rank
BLOCK = 12  # rank 1 starts at token 64 = 5 * 12 + 4: its query blocks straddle two global blocks

METHODS = {
    "stock": lambda: (),
    "ultravico": lambda: (UltraViCoProcessor(alpha=0.5, train_frames=4),),
    "radial": lambda: (RadialSparseProcessor(block_size=BLOCK),),
    "adaptive": lambda: (AdaptiveSparseProcessor(density=0.4, block_size=BLOCK),),
    "softpag": lambda: (SoftPAGProcessor({"blocks.1": [1, 2]}, alpha=0.7),),
    "ultravico+radial": lambda: (UltraViCoProcessor(alpha=0.5, train_frames=4), RadialSparseProcessor(block_size=BLOCK)),
}
CASES = [(mode, name) for mode in ("ulysses", "ring") for name in METHODS]


def _transformer():
    pipe, _ = tiny_pipeline("wan", transformer_config={"num_attention_heads": 4, "attention_head_dim": 8})
    return pipe.transformer


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(BATCH, 16, FRAMES, SIDE, SIDE, generator=generator),
        timestep=torch.tensor([700.0] * BATCH),
        encoder_hidden_states=torch.randn(BATCH, 8, 32, generator=generator),
        return_dict=False,
    )


def _forward(transformer, method, mode=None, mesh=None):
    transformer = copy.deepcopy(transformer)
    processors = METHODS[method]()
    if processors:
        install(transformer, *processors)
        get_context(transformer.blocks[0].attn1).set_branch_labels(("cond", "perturbed"))
    if mesh is not None:
        from diffusers import ContextParallelConfig

        transformer.enable_parallelism(config=ContextParallelConfig(mesh=mesh, **{f"{mode}_degree": 2}))
    with torch.no_grad():
        return transformer(**_inputs())[0]


def _native_op_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' native attention op plus the log-sum-exp its ring merge needs (CPU has no kernel that
    returns one): softmax(s) v and logsumexp(s) over the keys, ``[B, S, H, D]`` and ``[B, S, H]``."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    out = (scores.softmax(-1) @ v).transpose(1, 2)
    return (out, scores.logsumexp(-1).transpose(1, 2)) if return_lse else out


def _worker(rank, port, transformer, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # diffusers picks the device as rank % torch.accelerator.device_count(), which is 0 on a CPU-only host.
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        meshes = {
            mode: init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))
            for mode, shape in (("ulysses", (1, 2)), ("ring", (2, 1)))
        }
        for mode, method in CASES:
            if mode == "ring":  # diffusers' ring loop on dense calls (after the Ulysses cases, which use SDPA)
                from diffusers.models import attention_dispatch

                attention_dispatch._native_attention_forward_op = _native_op_with_lse
            out = _forward(transformer, method, mode, meshes[mode])
            results.put((rank, mode, method, out.numpy().copy()))
    except Exception:
        results.put((rank, "error", traceback.format_exc(), None))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def parallel_outputs():
    """(mode, method) -> (output of rank 0, output of rank 1) of the 2-process run, and single-process outputs."""
    torch.manual_seed(0)
    transformer = _transformer()
    single = {method: _forward(transformer, method) for method in METHODS}
    context = mp.get_context("fork")  # the children inherit the built transformer: no re-import, no rebuild
    results = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, port, transformer, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    outputs = {}
    try:
        for _ in range(2 * len(CASES)):
            rank, mode, method, out = results.get(timeout=120)
            if mode == "error":
                pytest.fail(f"rank {rank} failed:\n{method}")
            outputs.setdefault((mode, method), [None, None])[rank] = torch.from_numpy(out)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    return outputs, single


def test_stock_ulysses_on_gloo_equals_one_process(parallel_outputs):
    outputs, single = parallel_outputs
    rank0, rank1 = outputs[("ulysses", "stock")]
    assert torch.equal(rank0, single["stock"])
    assert torch.equal(rank1, single["stock"])


def test_stock_ring_on_gloo_matches_one_process(parallel_outputs):
    outputs, single = parallel_outputs
    for out in outputs[("ring", "stock")]:  # diffusers' LSE merge of the two K/V chunks: rounding only
        torch.testing.assert_close(out, single["stock"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, method", [case for case in CASES if case[1] != "stock"])
def test_method_under_context_parallelism_equals_one_process(parallel_outputs, mode, method):
    outputs, single = parallel_outputs
    rank0, rank1 = outputs[(mode, method)]
    assert not torch.allclose(single[method], single["stock"], atol=1e-4)  # the method changes the output
    torch.testing.assert_close(rank0, single[method], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rank1, single[method], rtol=1e-4, atol=1e-5)
