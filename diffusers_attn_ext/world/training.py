"""Resumable training utilities shared by the world trainers (``world.train_video``, ``world.train_image``).

Every trainer indexes its batches by step (a ``Dataset`` whose item ``i`` is the batch of step ``start + i``), so a
run cut at any step and resumed sees the same batches; what it needs around that is here:

* ``loader``: the ``DataLoader`` over such a dataset (no re-batching, no shuffling, one thread per worker).
* ``learning_rate``: linear warm-up over ``warmup`` steps, constant, then a linear decay to zero over the last
  ``DECAY_FRACTION`` of the steps (so that the total can be fixed once the throughput is known without changing
  the steps already taken), times a linear re-warm over ``REWARM_STEPS`` after a resume without optimizer moments.
* ``adamw`` (betas 0.9, 0.99; fused on CUDA), ``set_lr`` and ``optimizer_step`` (zero the gradients, backward,
  clip the gradient norm, step).
* ``LossLog``: the mean loss of every ``every`` steps, appended to ``log.jsonl`` and printed.
* ``save_checkpoint`` / ``load_checkpoint`` / ``restore`` / ``resume``: weights in float32 and AdamW moments in a
  chosen dtype as safetensors shards of at most ``shard_mib`` MiB (the device tool returns files of at most
  16 MiB), with the trainer's state as JSON; written to ``ckpt.tmp`` and renamed to ``ckpt``, so an interrupted
  save leaves the previous checkpoint.
* ``moment_dtype``, ``add_config_options``: the ``--moment-dtype`` choice, one option per field of a config.
* ``plot_loss``: the loss curve of each phase in ``log.jsonl`` (log scale).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

DECAY_FRACTION = 0.2
REWARM_STEPS = 100


# ----------------------------------------------------------------------------------------------- data
def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def loader(dataset: torch.utils.data.Dataset, workers: int) -> torch.utils.data.DataLoader:
    """The batches of ``dataset`` in step order (its items are whole batches), ``workers`` processes of one
    thread each prefetching 4 batches (none: in this process)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       prefetch_factor=4 if workers else None, worker_init_fn=_one_thread,
                                       persistent_workers=False)


# ----------------------------------------------------------------------------------------------- optimisation
def learning_rate(step: int, steps: int, base: float, warmup: int, rewarm_from: int | None = None) -> float:
    """``base (step + 1) / warmup`` during the warm-up, ``base`` until ``steps (1 - DECAY_FRACTION)``, then
    ``base (steps - step) / (steps - decay_start)`` down to zero; times ``min(1, (step - rewarm_from + 1) /
    REWARM_STEPS)`` when ``rewarm_from`` is given (a resume with no optimizer moments warms up again)."""
    rewarm = 1.0 if rewarm_from is None else min(1.0, (step - rewarm_from + 1) / REWARM_STEPS)
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        decay_start = steps * (1 - DECAY_FRACTION)
        lr = base if step < decay_start else base * max(0.0, (steps - step) / max(1.0, steps - decay_start))
    return lr * rewarm


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay, fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, clip: float) -> None:
    """One step on ``loss``: gradients cleared, back-propagated, their total norm clipped to ``clip``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


class LossLog:
    """The mean loss of every ``every`` steps (and of step ``last``, or of a step added with ``force``), appended
    to ``log.jsonl`` and printed as ``{"phase", "step", "loss", "elapsed"}`` (seconds since ``started``), with
    ``steps_per_s`` since the previous entry when ``rate`` and ``kind`` (which loss, when a phase can log more
    than one kind: the plot draws one line each) when given."""

    def __init__(self, path: Path, phase: str, every: int, started: float, *, last: int | None = None,
                 kind: str = "", rate: bool = False) -> None:
        self.path, self.phase, self.every, self.started = path, phase, every, started
        self.last, self.kind, self.rate = last, kind, rate
        self.window: list[torch.Tensor] = []
        self.previous = (None, time.monotonic())  # (step, time) of the previous entry

    def add(self, steps_done: int, loss: torch.Tensor, force: bool = False) -> None:
        self.window.append(loss.detach())
        if steps_done % self.every and not force and steps_done != self.last:
            return
        now = time.monotonic()
        entry = {"phase": self.phase, "step": steps_done, "loss": torch.stack(self.window).float().mean().item(),
                 "elapsed": now - self.started}
        if self.kind:
            entry["kind"] = self.kind
        if self.rate and self.previous[0] is not None and steps_done > self.previous[0]:
            entry["steps_per_s"] = (steps_done - self.previous[0]) / (now - self.previous[1])
        self.previous = (steps_done, now)
        self.window = []
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)


# ----------------------------------------------------------------------------------------------- checkpoints
def _named_trainable(modules: dict):
    for name, module in modules.items():
        for key, p in module.named_parameters():
            if p.requires_grad:
                yield f"{name}.{key}", p


def save_checkpoint(workdir: Path, state: dict, modules: dict, optimizer, *, moment_dtype, shard_mib: float) -> None:
    """``workdir/ckpt``: the weights of ``modules`` (float32, keys ``name.parameter``) and, unless ``optimizer``
    or ``moment_dtype`` is None, the optimizer's moments (``moment_dtype``; keys ``opt.name.parameter.moment``) in
    safetensors shards of at most ``shard_mib`` MiB; ``state`` as ``state.json``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().float().cpu().clone()
    if optimizer is not None and moment_dtype is not None:
        names = {id(p): n for n, p in _named_trainable(modules)}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    dtype = torch.float32 if key == "step" else moment_dtype
                    tensors[f"opt.{names[id(p)]}.{key}"] = value.detach().to(dtype).cpu().contiguous().reshape(
                        value.shape
                    )
    limit = int(shard_mib * 2**20)
    tmp = workdir / "ckpt.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.glob("*"):
        old.unlink()
    shard, size, index = {}, 0, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shard and size + nbytes > limit:
            save_file(shard, str(tmp / f"ckpt-{index:02d}.safetensors"))
            shard, size, index = {}, 0, index + 1
        shard[key], size = tensors[key], size + nbytes
    save_file(shard, str(tmp / f"ckpt-{index:02d}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final = workdir / "ckpt"
    if final.exists():
        for old in final.glob("*"):
            old.unlink()
        final.rmdir()
    tmp.rename(final)


def load_checkpoint(workdir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(state, tensors) of ``workdir/ckpt`` as ``save_checkpoint`` wrote them; None where there is none."""
    from safetensors.torch import load_file

    final = workdir / "ckpt"
    if not (final / "state.json").exists():
        return None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(final.glob("ckpt-*.safetensors")):
        tensors.update(load_file(str(shard)))
    return json.loads((final / "state.json").read_text()), tensors


def restore(modules: dict, optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Load each module's weights from ``tensors`` (``name.``-prefixed keys) and, unless ``optimizer`` is None,
    the moments saved for its trainable parameters (float32 on the parameter's device)."""
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is None:
        return
    for full, p in _named_trainable(modules):
        keys = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{full}.")}
        if keys:
            optimizer.state[p] = {
                k: (v.to(p.device) if k == "step" else v.to(p.device, torch.float32)) for k, v in keys.items()
            }


def resume(modules: dict, optimizer, tensors: dict[str, torch.Tensor] | None, step: int) -> int | None:
    """``restore`` where there is something to restore; the step to re-warm the learning rate from (``step``)
    when ``tensors`` hold weights but no optimizer moments, else None."""
    if tensors is None:
        return None
    restore(modules, optimizer, tensors)
    return None if any(k.startswith("opt.") for k in tensors) else step


def moment_dtype(name: str) -> torch.dtype | None:
    """The ``--moment-dtype`` choice as ``save_checkpoint`` takes it: ``"none"`` (weights only) -> None."""
    return None if name == "none" else getattr(torch, name)


# ----------------------------------------------------------------------------------------------- options
def add_config_options(parser, config) -> None:
    """One option ``--a-field`` per field ``a_field`` of the dataclass ``config``, of the type of its default."""
    for f in dataclasses.fields(config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)


# ----------------------------------------------------------------------------------------------- plot
def plot_loss(log_path: Path, png: Path, panels: tuple[tuple[str, str], ...]) -> None:
    """One panel ``(phase, title)`` of ``panels`` per phase that ``log.jsonl`` has entries of: its loss against
    the step (log scale), one line per ``kind`` (a legend when there are several). Nothing without matplotlib
    or entries."""
    if not log_path.exists():
        return
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    panels = [p for p in panels if any(e["phase"] == p[0] for e in entries)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (phase, title) in zip(axes[0], panels, strict=True):
        kinds = sorted({e.get("kind", "") for e in entries if e["phase"] == phase})
        for kind in kinds:
            points = sorted({e["step"]: e["loss"] for e in entries
                             if e["phase"] == phase and e.get("kind", "") == kind}.items())
            ax.plot([p[0] for p in points], [p[1] for p in points], label=kind or "unweighted")
        if len(kinds) > 1:
            ax.legend(fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def save_pipeline(pipe, path: Path, dtype_name: str) -> None:
    """``save_pretrained`` of a trained pipeline: its diffusers models in ``dtype_name`` (the shipped size), its
    transformers text encoders in float32.

    Why the split: ``DiffusionPipeline.from_pretrained(path)`` without a dtype builds diffusers models in float32
    (casting the stored weights), while transformers builds a text encoder in the dtype its ``config.json``
    records; a bfloat16 text encoder beside float32 models makes ``FluxPipeline`` fail on mixed dtypes. Text
    encoders saved in float32 make every part load in float32 by default (they are small: well under a MB here).
    The pipeline is left in float32 on the CPU."""
    from transformers import PreTrainedModel

    dtype = getattr(torch, dtype_name)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
            module.to("cpu", torch.float32 if isinstance(module, PreTrainedModel) else dtype)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    pipe.to(torch.float32)
