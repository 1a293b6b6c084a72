"""FluxMultiSubjectPipeline and StableDiffusion3MultiSubjectPipeline on tiny pipelines."""

import pytest
import torch

from diffusers_attn_ext.pipelines.multi_subject import (
    FluxMultiSubjectPipeline,
    MultiSubjectMixin,
    StableDiffusion3MultiSubjectPipeline,
)
from diffusers_attn_ext.processors.isolation_reposition import IsolationRepositionProcessor
from diffusers_attn_ext.testing import TEXT_COMPONENTS, tiny_call_kwargs

CLASSES = {"flux": FluxMultiSubjectPipeline, "sd3": StableDiffusion3MultiSubjectPipeline}
BOXES = [
    {"dog": (0.0, 0.25, 0.5, 1.0), "cat": (0.5, 0.25, 1.0, 1.0)},
    {"dog": (0.5, 0.0, 1.0, 0.5), "cat": (0.0, 0.5, 0.25, 1.0)},
    {"dog": (0.25, 0.25, 0.75, 0.75), "cat": (0.75, 0.0, 1.0, 0.25)},
]


@pytest.fixture
def multi(tiny_pipes):
    def get(family):
        pipe = CLASSES[family].from_pipe(tiny_pipes(family))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return get


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_image_without_subjects_equals_stock(family, multi, stock_outputs):
    pipe = multi(family)
    assert torch.equal(pipe(**tiny_call_kwargs(family)).images, stock_outputs(family))
    assert torch.equal(pipe(subject_boxes=[{}], **tiny_call_kwargs(family)).images, stock_outputs(family))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_reference_is_stock_and_targets_change(family, multi, tiny_pipes):
    pipe = multi(family)
    stock = tiny_pipes(family)(**tiny_call_kwargs(family, batch_size=3)).images
    ours = pipe(subject_boxes=BOXES, **tiny_call_kwargs(family, batch_size=3)).images
    torch.testing.assert_close(ours[0], stock[0], rtol=0, atol=1e-5)
    assert not torch.allclose(ours[1:], stock[1:], atol=1e-4)
    again = pipe(subject_boxes=BOXES, **tiny_call_kwargs(family, batch_size=3)).images
    assert torch.equal(ours, again)  # per-generation state (dropout draws, plans) does not leak between calls


def test_another_size_after_a_call_works_and_processors_are_restored(multi):
    pipe = multi("flux")
    before = dict(pipe.transformer.attn_processors)
    pipe(subject_boxes=BOXES, **tiny_call_kwargs("flux", batch_size=3))
    out = pipe(subject_boxes=BOXES, **tiny_call_kwargs("flux", batch_size=3, height=48, width=32)).images
    assert out.shape == (3, 3, 48, 32)
    assert dict(pipe.transformer.attn_processors) == before


def test_from_pretrained_round_trip(multi, tmp_path):
    pipe = multi("flux")
    pipe.save_pretrained(tmp_path)
    loaded = FluxMultiSubjectPipeline.from_pretrained(tmp_path, **dict.fromkeys(TEXT_COMPONENTS["flux"]))
    loaded.set_progress_bar_config(disable=True)
    a = pipe(subject_boxes=BOXES, **tiny_call_kwargs("flux", batch_size=3)).images
    b = loaded(subject_boxes=BOXES, **tiny_call_kwargs("flux", batch_size=3)).images
    assert torch.equal(a, b)


def test_processor_carries_the_authors_defaults(multi):
    pipe = multi("flux")
    processor = pipe.multi_subject_processor(BOXES, prompt_embeds=torch.zeros(3, 4, 8))
    assert isinstance(processor, IsolationRepositionProcessor)
    assert (processor.start_step, processor.end_step, processor.interpolation, processor.reference_dropout,
            processor.dropout_mode) == (0, None, "nearest", 0.5, "queries")
    keys = pipe.multi_subject_processor(BOXES, prompt_embeds=torch.zeros(3, 4, 8), ir_dropout_mode="keys")
    assert keys.dropout_mode == "keys"


def test_bad_batches_are_value_errors(multi):
    pipe = multi("flux")
    with pytest.raises(ValueError, match="subject_boxes has 2 entries for 3 images"):
        pipe(subject_boxes=BOXES[:2], **tiny_call_kwargs("flux", batch_size=3))
    with pytest.raises(ValueError, match="num_images_per_prompt=2"):
        pipe.multi_subject_processor(BOXES, prompt_embeds=torch.zeros(3, 4, 8), num_images_per_prompt=2)
    with pytest.raises(ValueError, match="subject 'cat' is not named in prompt"):
        pipe.multi_subject_processor(BOXES[:2], prompt=["a dog and a cat", "a dog"])
    with pytest.raises(ValueError, match="subject 'cat' has a region in image"):
        pipe(subject_boxes=[BOXES[0], {"dog": (0, 0, 0.5, 0.5)}, BOXES[2]], **tiny_call_kwargs("flux", batch_size=3))


def test_both_pipelines_share_the_mixin_call():
    assert FluxMultiSubjectPipeline.__call__ is StableDiffusion3MultiSubjectPipeline.__call__
    assert FluxMultiSubjectPipeline.__call__ is MultiSubjectMixin.__call__
