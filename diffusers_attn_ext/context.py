"""Per-forward facts that attention methods read: token layout, denoising step, batch branches.

A :class:`ContextHook` (a ``diffusers.hooks`` ``ModelHook``) sits on the transformer. Before each forward it
reads the transformer's inputs and fills one :class:`AttnContext` object; every attention module of that
transformer holds a reference to the same object, so a processor reaches it from the ``attn`` module it is
called with. Nothing lives in globals.

Per-generation state (``AttnContext.state``) is cleared when a generation ends: diffusers pipelines call
``maybe_free_model_hooks()`` at the end of ``__call__``, which resets every stateful hook, ours included
(for transformers with diffusers' ``CacheMixin``); and when the hook knows the pipeline, a new
``scheduler.timesteps`` tensor (``set_timesteps`` runs once at the start of every pipeline call) starts a
new generation too, so transformers without ``CacheMixin`` (SD3) reset at the start of each call.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

CONTEXT_HOOK_NAME = "diffusers_attn_ext.context"
CONTEXT_ATTR = "_attn_ext_context"
MODULE_NAME_ATTR = "_attn_ext_module_name"

# Transformer class name -> family name. Explicit, one line per supported model class.
TRANSFORMER_FAMILIES = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "CogVideoXTransformer3DModel": "cogvideox",
    "WanTransformer3DModel": "wan",
}
BRANCHES = ("uncond", "cond", "perturbed")


@dataclass(frozen=True)
class TokenGrid:
    """Latent token grid after patching: ``frames x height x width`` visual tokens, frame-major order."""

    frames: int
    height: int
    width: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclass
class AttnContext:
    """What one transformer forward looks like, as attention methods need to know it.

    Attributes:
        family: "sd3", "flux", "cogvideox" or "wan".
        grid: visual token grid after patching (images have ``frames == 1``).
        text_len: number of text tokens in the joint sequence (0 for Wan self-attention, whose text
            enters through cross-attention only).
        text_first: whether text tokens precede visual tokens in the joint sequence (FLUX, CogVideoX).
        batch_size: rows in this forward.
        branch: the diffusers cache-context name of this forward ("cond", "uncond", "cond_uncond"...)
            when the pipeline gives one.
        step_index: denoising step of this forward, counted from 0 within a generation.
        timestep: the timestep tensor given to the transformer.
        num_steps: steps of this generation when the pipeline tells it, else None.
        generation: counts generations; processors key per-generation caches on it.
        state: scratch space for per-generation state of processors, cleared at each generation.
        branch_labels: how the batch splits into guidance branches, when a pipeline declares it.
        config: the transformer's config (model facts such as its training length derive from it).
    """

    family: str
    grid: TokenGrid | None = None
    text_len: int = 0
    text_first: bool = False
    batch_size: int = 0
    branch: str | None = None
    step_index: int = -1
    timestep: torch.Tensor | None = None
    num_steps: int | None = None
    generation: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    branch_labels: tuple[str, ...] | None = None
    config: Any = None
    _last_timestep: float | None = None
    _fresh: bool = True

    def set_branch_labels(self, labels: tuple[str, ...] | None) -> None:
        """Declare how the batch splits into guidance branches, in equal chunks: e.g.
        ``("uncond", "cond", "perturbed")`` for a PAG batch. ``None`` returns to inference from the
        cache context (a whole forward is "cond" or "uncond") or, failing that, all rows "cond"."""
        if labels is not None:
            unknown = [label for label in labels if label not in BRANCHES]
            if unknown:
                raise ValueError(f"branch labels {unknown} are not among the allowed {BRANCHES}")
        self.branch_labels = tuple(labels) if labels is not None else None

    def rows(self, branch: str) -> list[int]:
        """Batch rows of this forward that belong to ``branch`` ("uncond", "cond" or "perturbed")."""
        if branch not in BRANCHES:
            raise ValueError(f"branch={branch!r} is not one of {BRANCHES}")
        labels = self.branch_labels
        if labels is None:
            whole = "uncond" if self.branch == "uncond" else "cond"
            return list(range(self.batch_size)) if branch == whole else []
        if self.batch_size % len(labels):
            raise ValueError(
                f"batch_size={self.batch_size} does not split into the {len(labels)} branches {labels}"
            )
        chunk = self.batch_size // len(labels)
        return [i * chunk + r for i, label in enumerate(labels) if label == branch for r in range(chunk)]

    def new_generation(self) -> None:
        """Forget everything that belongs to the generation that just ended (once: a second call before
        the next forward changes nothing)."""
        if self._fresh:
            return
        self._fresh = True
        self.generation += 1
        self.state.clear()
        self.step_index = -1
        self.num_steps = None
        self.branch = None
        self._last_timestep = None

    def advance(self, timestep: torch.Tensor | None, step_index: int | None, num_steps: int | None) -> None:
        """Record the timestep of a new forward. The step index comes from the pipeline's cache context
        when it gives one, else it advances whenever the timestep changes (so separate cond and uncond
        forwards of one step share a step index)."""
        self._fresh = False
        self.timestep = timestep
        if num_steps is not None:
            self.num_steps = num_steps
        if step_index is not None:
            self.step_index = step_index
            return
        value = None if timestep is None else float(timestep.flatten()[0])
        if self.step_index < 0 or value != self._last_timestep:
            self.step_index += 1
        self._last_timestep = value


class _CacheContextListener(StateManager):
    """Receives the ``CacheContext`` that pipelines set with ``transformer.cache_context(name, ...)``."""

    def __init__(self):
        super().__init__(state_cls=None)


def _grid_and_text(family: str, module: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[TokenGrid | None, int]:
    """Token grid and text length of one forward, read from the transformer's inputs."""
    hidden = kwargs["hidden_states"]
    text = kwargs.get("encoder_hidden_states")
    text_len = 0 if text is None else text.shape[1]
    config = module.config
    if family == "sd3":
        p = config.patch_size
        return TokenGrid(1, hidden.shape[-2] // p, hidden.shape[-1] // p), text_len
    if family == "flux":
        img_ids = kwargs.get("img_ids")
        if img_ids is None:
            return None, text_len
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        height, width = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
        grid = TokenGrid(1, height, width) if height * width == hidden.shape[1] else None
        return grid, text_len
    if family == "cogvideox":
        p, p_t = config.patch_size, config.patch_size_t or 1
        frames = hidden.shape[1] // p_t
        return TokenGrid(frames, hidden.shape[-2] // p, hidden.shape[-1] // p), text_len
    if family == "wan":
        p_t, p_h, p_w = config.patch_size
        return TokenGrid(hidden.shape[2] // p_t, hidden.shape[3] // p_h, hidden.shape[4] // p_w), 0
    raise ValueError(f"family={family!r} is not one of {sorted(set(TRANSFORMER_FAMILIES.values()))}")


def _forward_kwargs(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's arguments by name (pipelines pass keywords; positional ones are named here)."""
    if not args:
        return kwargs
    bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs)
    return dict(bound.arguments)


class ContextHook(ModelHook):
    """Fills the transformer's :class:`AttnContext` before each forward; resets it after each generation."""

    _is_stateful = True

    def __init__(self, context: AttnContext, pipeline: Any = None):
        super().__init__()
        self.context = context
        self.cache_context = _CacheContextListener()
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._seen_timesteps = None

    def _pipeline_started_new_call(self) -> bool:
        """Whether the pipeline's scheduler got new timesteps since the last forward."""
        pipeline = self._pipeline() if self._pipeline is not None else None
        timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        if timesteps is None or timesteps is self._seen_timesteps:
            return False
        started = self._seen_timesteps is not None
        self._seen_timesteps = timesteps
        return started

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        ctx = self.context
        if self._pipeline_started_new_call():
            ctx.new_generation()
        named = _forward_kwargs(module, args, kwargs)
        ctx.grid, ctx.text_len = _grid_and_text(ctx.family, module, named)
        ctx.batch_size = named["hidden_states"].shape[0]
        cache = self.cache_context._context
        ctx.branch = cache.name if cache is not None else None
        num_steps = getattr(cache, "num_inference_steps", None)
        if num_steps is None and self._pipeline is not None and self._pipeline() is not None:
            num_steps = getattr(self._pipeline(), "_num_timesteps", None)
        ctx.advance(named.get("timestep"), getattr(cache, "step_index", None), num_steps)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.new_generation()
        return module


def family_of_transformer(transformer: torch.nn.Module) -> str:
    """Family name of a transformer, from its class; ValueError for an unsupported class."""
    name = type(transformer).__name__
    if name not in TRANSFORMER_FAMILIES:
        raise ValueError(
            f"transformer class {name!r} is not supported; supported classes: {sorted(TRANSFORMER_FAMILIES)}"
        )
    return TRANSFORMER_FAMILIES[name]


def attach_context(target: Any) -> AttnContext:
    """Attach the context hook to a pipeline's transformer (or a transformer) and return its context.

    Idempotent: a second call returns the context already attached. Needed by methods that read the token
    layout or the step when they are installed with plain ``set_attn_processor``; :func:`install` and the
    ready-made pipelines call it for you.
    """
    transformer, pipeline = _split_target(target)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(CONTEXT_HOOK_NAME)
    if hook is None:
        context = AttnContext(family=family_of_transformer(transformer), config=transformer.config)
        hook = ContextHook(context, pipeline)
        registry.register_hook(hook, CONTEXT_HOOK_NAME)
    for name, module in transformer.named_modules():
        if hasattr(module, "processor") and hasattr(module, "set_processor"):
            setattr(module, CONTEXT_ATTR, hook.context)
            setattr(module, MODULE_NAME_ATTR, name)
    return hook.context


def detach_context(target: Any) -> None:
    """Remove the context hook and the references that attention modules hold to the context."""
    transformer, _ = _split_target(target)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(CONTEXT_HOOK_NAME) is not None:
        registry.remove_hook(CONTEXT_HOOK_NAME, recurse=False)
    for module in transformer.modules():
        for attr in (CONTEXT_ATTR, MODULE_NAME_ATTR):
            if attr in module.__dict__:
                delattr(module, attr)


def get_context(attn: torch.nn.Module) -> AttnContext | None:
    """The context of the transformer that ``attn`` belongs to, or None when none is attached."""
    return getattr(attn, CONTEXT_ATTR, None)


def reset_context(target: Any) -> None:
    """Start a new generation by hand (for loops that call the transformer without a pipeline)."""
    attach_context(target).new_generation()


def _split_target(target: Any) -> tuple[torch.nn.Module, Any]:
    """(transformer, pipeline or None) from a pipeline or a transformer."""
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, target
    if isinstance(target, torch.nn.Module):
        return target, None
    raise ValueError(
        f"target of type {type(target).__name__!r} is neither a diffusers pipeline with a transformer "
        "nor a transformer module"
    )
