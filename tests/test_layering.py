"""The layering of DESIGN.md by knowledge, not only by imports (issue 17): no family name or family layout
knowledge in ``processors/``, no method name in ``families/`` or ``kernels/``. A grep over the source, so that a
family fact written into a method file, or a method name into a family or kernel file, fails here."""

import re
from pathlib import Path

import pytest

import diffusers_attn_ext
import diffusers_attn_ext.processors

PACKAGE = Path(diffusers_attn_ext.__file__).parent

# Family names and the class names of the families' transformers, attention modules and stock processors
# (WanTransformer3DModel, FluxAttention, SD3Transformer2DModel, CogVideoXAttnProcessor2_0, ...), and the
# other video family the authors of Radial Attention name (HunyuanVideo).
FAMILY_NAMES = re.compile(
    r"(?<![A-Za-z])(?:[Ww]an|WAN|[Ff]lux|FLUX|[Ss][Dd]3)(?![a-z])|(?i:cogvideo|hunyuan)"
    r"|JointAttnProcessor"
)
# Family layout knowledge a method file could hold without naming the family.
LAYOUT_KNOWLEDGE = {
    "reads a key of the model config": re.compile(r"config\.get\(|config\[|\.config\.(?!get\b)[a-z_]"),
    "indexes a rotary table": re.compile(r"rotary\[|rotary_emb\["),
    "uses a family's code from diffusers": re.compile(r"diffusers\.models\.(?:transformers|embeddings)|apply_rotary_emb"),
    "states a family's token count": re.compile(r"(?<![\w.])(?:512|4096)(?![\w.])"),
}
# Method names: the methods' papers, authors' projects and words, and the processors' class names.
METHOD_WORDS = (
    r"ultravico|radial|softpag|(?<![a-z])pag(?![a-z])|headhunter|ditraj|std.?rope|isolation|reposition|ir.diffusion"
    r"|dreamstory|entropy|draft|adaspa|adaptive|rettention|extrapolation|trajector"
)
GENERIC_PROCESSORS = {"AttnExtProcessor", "ComposedProcessor", "StockAttnProcessor"}
METHOD_NAMES = re.compile(
    "(?i:" + METHOD_WORDS + ")|"
    + "|".join(sorted(set(diffusers_attn_ext.processors.__all__) - GENERIC_PROCESSORS))
)
# A citation of an authors' file (``radial_attn/models/wan/attention.py``) names their model in a path; it is a
# reference for the reader, not knowledge the code acts on.
CITATION = re.compile(r"``[^`\n]*/[^`\n]*``")


def sources(folder: str) -> list[Path]:
    files = sorted((PACKAGE / folder).glob("*.py"))
    assert files, f"no Python files under {folder}"
    return files


def hits(path: Path, pattern: re.Pattern, cite_ok: bool = False) -> list[str]:
    """``file:line: text`` for every line of ``path`` where ``pattern`` matches (citations removed first)."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = CITATION.sub("``…``", line) if cite_ok else line
        match = pattern.search(text)
        if match:
            found.append(f"{path.relative_to(PACKAGE)}:{number}: {match.group(0)!r} in {line.strip()}")
    return found


def test_the_patterns_find_what_they_look_for():
    """The greps below can fail: each pattern finds a planted example and passes a neutral one."""
    for planted in ("WanAttention", "wan_apply_rotary", "FLUX's RoPE", "SD3Transformer2DModel", "cogvideox",
                    "CogVideoXAttnProcessor2_0", 'model="hunyuan"', "Wan2.2"):
        assert FAMILY_NAMES.search(planted), planted
    for neutral in ("want", "swan", "influx", "sd", "a video family"):
        assert not FAMILY_NAMES.search(neutral), neutral
    for planted in ('config.get("in_channels")', "transformer.config.patch_size", "call.rotary[0]",
                    "from diffusers.models.embeddings import apply_rotary_emb", "WAN_TEXT = 512"):
        assert any(p.search(planted) for p in LAYOUT_KNOWLEDGE.values()), planted
    assert not any(p.search("call.context.config)") for p in LAYOUT_KNOWLEDGE.values())
    for planted in ("ultravico_attention", 'name != "ultravico"', "UltraViCoProcessor", "RadialSparseProcessor",
                    "PAG", "std_rope", "STD-RoPE", "entropy"):
        assert METHOD_NAMES.search(planted), planted
    for neutral in ("page", "a decay rule", "block_sparse_attention", "dense", "score_mod"):
        assert not METHOD_NAMES.search(neutral), neutral
    assert CITATION.sub("", "``radial_attn/models/wan/attention.py``") == ""


@pytest.mark.parametrize("path", sources("processors"), ids=lambda p: p.name)
def test_processors_know_no_family(path):
    found = hits(path, FAMILY_NAMES, cite_ok=True)
    for what, pattern in LAYOUT_KNOWLEDGE.items():
        found += [f"{hit} ({what})" for hit in hits(path, pattern, cite_ok=True)]
    assert not found, "family knowledge in a method file:\n" + "\n".join(found)


@pytest.mark.parametrize("path", sources("families") + sources("kernels"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_families_and_kernels_know_no_method(path):
    found = hits(path, METHOD_NAMES)
    if METHOD_NAMES.search(path.name):
        found.append(f"{path.relative_to(PACKAGE)}: the file is named after a method")
    assert not found, "method knowledge in a family or kernel file:\n" + "\n".join(found)


def test_one_box_type():
    """Trajectories (pixels) and subject layouts (fractions) hold the same Box type."""
    from diffusers_attn_ext import boxes, subjects, trajectory

    moving = trajectory.Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, 9, 64, 64)
    layout = subjects.SubjectLayout.from_boxes([{"cat": (0.5, 0.0, 1.0, 0.5)}, {"cat": (0.0, 0.5, 0.5, 1.0)}])
    assert subjects.Box is trajectory.Box is boxes.Box is diffusers_attn_ext.Box
    assert all(type(box) is boxes.Box for box in moving.boxes + moving.fractions)
    assert all(type(region) is boxes.Box for image in layout.regions for region in image)
    assert moving.boxes[4] == (16.0, 0.0, 48.0, 48.0) and moving.fractions[4] == (0.25, 0.0, 0.75, 0.75)
